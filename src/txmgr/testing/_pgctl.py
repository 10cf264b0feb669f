"""Thin wrappers around initdb and pg_ctl for one cluster directory."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ._errors import PgServerError
from ._runas import RunAs, chown_tree, run

__all__ = ["Cluster", "PgServerError"]


def _conf_value(value: str) -> str:
    # Quoting every value is valid for all GUC types and keeps paths with spaces intact.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class Cluster:
    """A cluster in ``base/data`` whose programs run as ``user`` (None: current user)."""

    bin_dir: Path
    base: Path
    user: RunAs | None
    timeout: float

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def initdb(self, superuser: str, password: str) -> None:
        # initdb wants an empty data directory, so the password file sits beside it;
        # it must be readable by the server user and is deleted right afterwards.
        pwfile = self.base / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        chown_tree(pwfile, self.user)
        try:
            # --locale=C: the host's locale may be unset or not installed, and C is
            # compatible with UTF8. --no-sync: durability of a throwaway cluster is moot.
            self._checked(
                "initdb", "-D", str(self.data_dir), "-U", superuser,
                "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def append_conf(self, settings: Mapping[str, str]) -> None:
        # Later lines win over earlier ones, and the file persists, so restarts keep them.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by txmgr.testing\n")
            conf.writelines(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())

    def start(self) -> subprocess.CompletedProcess[str]:
        """``pg_ctl -w start``; the caller inspects the result to decide about retrying."""
        # -l is essential: without it the postmaster would inherit our output pipes and
        # capture_output would wait for the server to exit.
        return self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-w", "-t", str(int(self.timeout)), "start",
        )  # fmt: skip

    def stop(self, mode: str) -> None:
        self._checked("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def promote(self) -> None:
        """``pg_ctl -w promote``: end recovery; returns once the server accepts writes."""
        self._checked("pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(int(self.timeout)),
                      "promote")

    def is_running(self) -> bool:
        if not self.data_dir.is_dir():
            return False
        # pg_ctl status exits 0 only when the postmaster named in postmaster.pid is alive.
        return self._run("pg_ctl", "-D", str(self.data_dir), "status").returncode == 0

    def kill(self) -> None:
        """Last resort when pg_ctl fails; the backends exit on postmaster death."""
        with suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def fail(self, what: str, output: str) -> NoReturn:
        message = f"{what} failed for {self.data_dir}:\n{output.strip()}"
        log = self.log_tail()
        if log:
            message += f"\n--- tail of {self.log_file} ---\n{log}"
        raise PgServerError(message)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        # cwd: the server user may not be allowed into the caller's working directory.
        return run(
            [self.bin_dir / program, *args], self.user, cwd=self.base, timeout=self.timeout + 30
        )

    def _checked(self, program: str, *args: str) -> None:
        proc = self._run(program, *args)
        if proc.returncode != 0:
            what = f"pg_ctl {args[-1]}" if program == "pg_ctl" else program
            self.fail(what, proc.stdout + proc.stderr)

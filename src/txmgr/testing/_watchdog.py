"""A helper process that destroys a server when the process that started it dies.

atexit handlers do not run when the test process is killed (SIGKILL, SIGTERM from a CI
timeout, os._exit); without this, every such run would leave postmasters behind.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from ._runas import RunAs, clean_env

__all__ = ["Watchdog"]

# Runs with -I -S (stdlib only): it must not depend on the caller's environment.
_SCRIPT = """
import os, shutil, subprocess, sys
pg_ctl, data_dir, base, uid, gid = sys.argv[1:]
sys.stdin.buffer.read()  # returns at EOF: the owner released us, or died
if os.path.isdir(data_dir):
    ids = {} if uid == "-" else {"user": int(uid), "group": int(gid), "extra_groups": []}
    subprocess.run([pg_ctl, "-D", data_dir, "-m", "immediate", "-w", "stop"], cwd=base,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **ids)
    shutil.rmtree(base, ignore_errors=True)
"""


class Watchdog:
    """Stops the cluster and deletes ``base`` once our end of a pipe closes."""

    def __init__(self, pg_ctl: Path, data_dir: Path, base: Path, user: RunAs | None) -> None:
        ids = ["-", "-"] if user is None else [str(user.uid), str(user.gid)]
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SCRIPT, str(pg_ctl), str(data_dir), str(base),
             *ids],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=base,
            env=clean_env(),
            # Its own session: Ctrl-C or a kill of our process group must not take the
            # watchdog down before it has cleaned up.
            start_new_session=True,
        )  # fmt: skip

    def release(self) -> None:
        """Call after a normal cleanup: the watchdog then finds nothing left to do."""
        if self._proc.stdin is not None:
            with suppress(OSError):
                self._proc.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)

"""A throwaway PgBouncer in front of a harness server (:class:`PgBouncer`).

It gets its own ini, auth file and log in a temporary directory, listens on
a free loopback port and maps every database (``* = host=… port=…``), so any
database ``make_database`` creates is reachable through it. It runs as the
same unprivileged user as the servers. A small launcher process owns it: when
the launcher's stdin closes (we stopped it, or the test process died) it
stops PgBouncer, so an aborted run leaves no pooler behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self
from urllib.parse import quote

from ._errors import PgServerError
from ._runas import chown_tree, clean_env, server_user, temp_parent

__all__ = ["PgBouncer", "PoolMode", "find_pgbouncer"]

PoolMode = Literal["session", "transaction", "statement"]
_SUPERUSER = "postgres"
_DEFAULT_BINARY = Path("/usr/sbin/pgbouncer")

# Runs with -I -S (stdlib only). Starts PgBouncer as the given user, then waits
# for EOF on stdin (released by us, or our process died) and stops it.
_LAUNCHER = """
import signal, subprocess, sys
binary, ini, uid, gid = sys.argv[1:]
ids = {} if uid == "-" else {"user": int(uid), "group": int(gid), "extra_groups": []}
proc = subprocess.Popen([binary, ini], stdin=subprocess.DEVNULL, **ids)
sys.stdout.write(str(proc.pid) + "\\n")
sys.stdout.flush()
sys.stdin.buffer.read()
proc.send_signal(signal.SIGINT)  # PgBouncer's "safe shutdown": close and exit
try:
    proc.wait(timeout=10)
except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
"""


class _Upstream(Protocol):
    """What PgBouncer needs of the server behind it (a :class:`PgServer`)."""

    host: str

    @property
    def port(self) -> int: ...

    @property
    def password(self) -> str: ...


def find_pgbouncer() -> Path | None:
    """The pgbouncer binary: $TXMGR_PGBOUNCER, the Debian package's, or on PATH."""
    env = os.environ.get("TXMGR_PGBOUNCER")
    for candidate in (env, str(_DEFAULT_BINARY), shutil.which("pgbouncer")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_ini(value: str) -> str:
    # auth_file lines are "user" "password"; a double quote is doubled.
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """PgBouncer in front of ``server``; ``start()`` (or ``with``) runs it.

    ``pool_mode``: session, transaction or statement. ``ignore_startup_parameters``:
    what PgBouncer silently drops instead of refusing (stock: nothing, so a
    client's libpq ``options`` is refused). ``auth_type``: ``md5`` (an auth
    file with the server superuser's password) or ``trust``. ``users``: further
    roles and their passwords for that file (PgBouncer logs in to the server as
    the client's role with them). ``settings``: further ``[pgbouncer]`` lines.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        server: _Upstream,
        *,
        pool_mode: PoolMode = "transaction",
        ignore_startup_parameters: Sequence[str] = (),
        auth_type: Literal["md5", "trust"] = "md5",
        pool_size: int = 20,
        users: Mapping[str, str] | None = None,
        settings: Mapping[str, str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        self._server = server
        self.pool_mode: PoolMode = pool_mode
        self._ignore = tuple(ignore_startup_parameters)
        self._auth_type = auth_type
        self._pool_size = pool_size
        self._users = {_SUPERUSER: server.password, **(users or {})}
        self._settings = dict(settings or {})
        self._binary = Path(binary) if binary is not None else find_pgbouncer()
        self._timeout = timeout
        self._port: int | None = None
        self._base: Path | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The loopback port it listens on (PgServerError before start)."""
        if self._port is None:
            raise PgServerError("PgBouncer has not been started yet")
        return self._port

    @property
    def log_file(self) -> Path:
        """PgBouncer's own log (while running)."""
        if self._base is None:
            raise PgServerError("PgBouncer has not been started yet")
        return self._base / "pgbouncer.log"

    def dsn(self, dbname: str = "postgres", user: str = _SUPERUSER,
            password: str | None = None) -> str:
        """A ``postgresql://`` URL through PgBouncer (superuser's password by default)."""
        if password is None and user == _SUPERUSER:
            password = self._server.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def route(self, server_dsn: str) -> str:
        """``server_dsn`` (a DSN of the upstream server) rewritten to go through PgBouncer."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(server_dsn)
        params.update(host=self.host, port=str(self.port))
        return make_conninfo("", **params)

    def _ini(self, base: Path) -> str:
        lines = [
            "[databases]",
            f"* = host={self._server.host} port={self._server.port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self._port}",
            "unix_socket_dir =",
            f"auth_type = {self._auth_type}",
            f"auth_file = {base / 'userlist.txt'}",
            f"pool_mode = {self.pool_mode}",
            "max_client_conn = 1000",
            f"default_pool_size = {self._pool_size}",
            f"logfile = {base / 'pgbouncer.log'}",
            f"pidfile = {base / 'pgbouncer.pid'}",
            f"ignore_startup_parameters = {', '.join(self._ignore)}",
            *(f"{k} = {v}" for k, v in self._settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Write the ini and start PgBouncer; returns once it accepts connections."""
        with self._lock:
            if self._launcher is not None:
                raise PgServerError("PgBouncer is already running")
            if self._binary is None:
                raise PgServerError(
                    "pgbouncer not found: install the Debian package pgbouncer or set "
                    "TXMGR_PGBOUNCER to its binary"
                )
            user = server_user()
            self._base = base = Path(tempfile.mkdtemp(prefix="txmgr-pgb-",
                                                      dir=temp_parent(user)))
            self._port = _free_port()
            (base / "userlist.txt").write_text("".join(
                f"{_quote_ini(user)} {_quote_ini(password)}\n"
                for user, password in self._users.items()))
            (base / "pgbouncer.ini").write_text(self._ini(base))
            (base / "userlist.txt").chmod(0o600)
            chown_tree(base, user)
            ids = ["-", "-"] if user is None else [str(user.uid), str(user.gid)]
            self._launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(self._binary),
                 str(base / "pgbouncer.ini"), *ids],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=base, env=clean_env(), start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            launcher = self._launcher
            assert launcher is not None
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                pass
            if launcher.poll() is not None or time.monotonic() > deadline:
                log = ""
                with suppress(OSError):
                    log = self.log_file.read_text()[-2000:]
                raise PgServerError(f"PgBouncer did not start on port {self._port}: {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer and delete its files; safe to call repeatedly."""
        with self._lock:
            launcher, self._launcher = self._launcher, None
            base, self._base = self._base, None
        if launcher is not None:
            if launcher.stdin is not None:
                with suppress(OSError):
                    launcher.stdin.close()
            try:
                launcher.wait(timeout=15)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            if launcher.stdout is not None:
                launcher.stdout.close()
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again (a new port): every pooled server connection is gone."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgBouncer {self.pool_mode} {self.host}:{self._port}>"

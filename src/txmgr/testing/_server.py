"""Throwaway PostgreSQL servers (:class:`PgServer`) and existing ones (:class:`ExternalServer`)."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, Self
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._admin import DatabaseAdmin, Server
from ._binaries import find_pg_bin
from ._datadir import data_parent
from ._pgctl import Cluster, PgServerError
from ._runas import chown_tree, reachable_bin_dir, server_user
from ._standby import clone_primary
from ._watchdog import Watchdog

__all__ = ["ExternalServer", "PgServer", "PgServerError", "Server"]

_STOP_MODES = ("smart", "fast", "immediate")
_SUPERUSER = "postgres"

# Servers not yet destroyed. They are destroyed at interpreter exit too, so that an
# aborted or failing test run does not leave postmasters behind (and, should the
# process be killed outright, by their Watchdog).
_live: set[PgServer] = set()
_live_lock = threading.Lock()


@atexit.register
def _destroy_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with suppress(Exception):
            server.destroy()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer(DatabaseAdmin):
    """A private PostgreSQL server in a temporary directory, listening on 127.0.0.1.

    When running as root, the server runs as the ``postgres`` OS user (or a ``txmgr-pg``
    system user created on demand), since PostgreSQL refuses to run as root. Its files
    go to a RAM file system when one has room (see :mod:`txmgr.testing._datadir`);
    ``in_ram=False`` keeps them on a disk (a benchmark of durable commits).
    """

    host = "127.0.0.1"
    can_crash = True
    _copy_by_file = True  # see DatabaseAdmin: its fsync is off

    def __init__(
        self,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        max_prepared_transactions: int = 64,
        settings: Mapping[str, str] | None = None,
        superuser_password: str | None = None,
        timeout: float = 60.0,
        in_ram: bool = True,
    ) -> None:
        self._in_ram = in_ram  # see _datadir: False keeps the files on a disk
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        self._port = port
        self._auto_port = port is None  # also after a first start() picked one
        self._password = superuser_password or secrets.token_hex(12)
        self._timeout = timeout
        self._settings: dict[str, str] = {
            "listen_addresses": self.host,
            "max_prepared_transactions": str(max_prepared_transactions),
            "max_connections": "200",
            # Durability against OS crashes is pointless for throwaway data; a crash of
            # the server process (crash()) still keeps everything written to the WAL.
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "logging_collector": "off",
            **(settings or {}),
        }
        self._cluster: Cluster | None = None
        self._watchdog: Watchdog | None = None
        self._primary: PgServer | None = None  # set by standby_of()

    @classmethod
    def standby_of(cls, primary: PgServer, *, timeout: float = 60.0) -> PgServer:
        """A hot standby of the running ``primary``, not started yet.

        ``start()`` (or ``with``) makes it with ``pg_basebackup`` instead of
        ``initdb`` and starts it streaming from ``primary``; it is read-only
        (``pg_is_in_recovery()``) and has the primary's databases, superuser
        password and settings. Destroy it before the primary.
        """
        if not primary.is_running():
            raise PgServerError("standby_of() needs a running primary")
        standby = cls(
            bin_dir=primary._bin_dir,
            # A hot standby refuses to start with max_connections,
            # max_prepared_transactions, … lower than its primary's.
            settings={**primary._settings, "hot_standby": "on"},
            superuser_password=primary.password,
            timeout=timeout,
            in_ram=primary._in_ram,
        )
        standby._primary = primary
        return standby

    @property
    def port(self) -> int:
        """The TCP port it listens on (PgServerError before the first start)."""
        if self._port is None:
            raise PgServerError("the server has not been started yet")
        return self._port

    @property
    def password(self) -> str:
        """The superuser's password (random unless given)."""
        return self._password

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (while started)."""
        return self._started().data_dir

    @property
    def log_file(self) -> Path:
        """The server's log file (while started)."""
        return self._started().log_file

    def dsn(
        self, dbname: str = "postgres", user: str | None = _SUPERUSER, password: str | None = None
    ) -> str:
        """``postgresql://`` URL; the superuser's password is filled in for the superuser."""
        user = user or _SUPERUSER
        if password is None and user == _SUPERUSER:
            password = self._password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> Self:
        """Create a fresh cluster and start it; on failure everything is cleaned up."""
        if self._cluster is not None:
            raise PgServerError("already started; use restart() to start it again")
        user = server_user()
        bin_dir = reachable_bin_dir(self._bin_dir or find_pg_bin(), user)
        base = Path(tempfile.mkdtemp(prefix="txmgr-pg-", dir=data_parent(user, ram=self._in_ram)))
        self._cluster = cluster = Cluster(bin_dir, base, user, self._timeout)
        with _live_lock:
            _live.add(self)
        try:
            # mkdtemp makes a 0700 directory owned by us: hand it to the server user.
            chown_tree(base, user)
            self._watchdog = Watchdog(bin_dir / "pg_ctl", cluster.data_dir, base, user)
            if self._auto_port:
                self._port = _free_port()
            if self._primary is None:
                cluster.initdb(_SUPERUSER, self._password)
            else:
                primary = self._primary
                clone_primary(cluster, primary.host, primary.port, _SUPERUSER, self._password)
            # The socket goes to the data dir, so no /var/run permissions are involved.
            socket_dir = {"unix_socket_directories": str(cluster.data_dir)}
            cluster.append_conf({**socket_dir, **self._settings, "port": str(self._port)})
            self._pg_ctl_start(retries=2 if self._auto_port else 0)
        except BaseException:
            self.destroy()
            raise
        return self

    def _pg_ctl_start(self, retries: int = 0) -> None:
        cluster = self._started()
        for attempt in range(retries + 1):
            proc = cluster.start()
            if proc.returncode == 0:
                return
            if attempt < retries and "already in use" in cluster.log_tail():
                # Someone took the port between our probe and the bind: pick another.
                self._port = _free_port()
                cluster.append_conf({"port": str(self._port)})
                continue
            cluster.fail("pg_ctl start", proc.stdout + proc.stderr)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); no-op if not running."""
        if mode not in _STOP_MODES:
            raise ValueError(f"mode must be one of {_STOP_MODES}, not {mode!r}")
        if self.is_running():
            self._started().stop(mode)

    def crash(self) -> None:
        """Kill the server without a checkpoint; prepared transactions survive in the WAL."""
        if not self.is_running():
            raise PgServerError("cannot crash a server that is not running")
        self._started().stop("immediate")

    def restart(self) -> None:
        """Start again on the same data directory and port (stopping it first if needed)."""
        self.stop("fast")
        self._pg_ctl_start()

    def pause_replay(self) -> None:
        """Stop a standby applying WAL (``pg_wal_replay_pause()``): it keeps receiving
        but lags from now on, as an asynchronous replica under load does."""
        self._replay_control("pg_wal_replay_pause")

    def resume_replay(self) -> None:
        """Let a paused standby apply WAL again (``pg_wal_replay_resume()``)."""
        self._replay_control("pg_wal_replay_resume")

    def promote(self) -> None:
        """Make a standby a primary (``pg_ctl promote``); returns once it accepts writes."""
        if self._primary is None:
            raise PgServerError("promote() needs a standby (made by standby_of())")
        self._started().promote()
        self._primary = None  # a primary now: a restart() must not make it a standby again

    def fence(self) -> None:
        """Fence this (old primary) server as a failover manager would: stop it at once,
        so that no client reaches it any more and only the promoted standby answers."""
        self.stop("immediate")

    def _replay_control(self, function: str) -> None:
        if self._primary is None:
            raise PgServerError(f"{function}() needs a standby (made by standby_of())")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("SELECT {}()").format(sql.Identifier(function)))

    def is_running(self) -> bool:
        """Whether the server process is up."""
        return self._cluster is not None and self._cluster.is_running()

    def destroy(self) -> None:
        """Stop the server immediately and delete its files; safe to call repeatedly."""
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        try:
            if cluster.is_running():
                cluster.stop("immediate")
        except Exception:
            cluster.kill()
        shutil.rmtree(cluster.base, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        with _live_lock:
            _live.discard(self)

    def _started(self) -> Cluster:
        if self._cluster is None:
            raise PgServerError("the server has not been started (or was destroyed)")
        return self._cluster

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        where = self._cluster.base if self._cluster else "not started"
        return f"<PgServer {self.host}:{self._port} {where}>"


class ExternalServer(DatabaseAdmin):
    """An already running server reached through an admin (superuser) DSN."""

    can_crash = False

    def __init__(self, admin_dsn: str) -> None:
        self._params = conninfo_to_dict(admin_dsn)
        self._admin_dsn = admin_dsn

    @property
    def admin_dsn(self) -> str:
        """The DSN it was made with."""
        return self._admin_dsn

    @property
    def password(self) -> str | None:
        """The password in the admin DSN, if any."""
        value = self._params.get("password")
        return None if value is None else str(value)

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """The admin DSN with ``dbname`` (and ``user``/``password`` if given) replaced."""
        params = dict(self._params)
        if user is not None and user != params.get("user"):
            params.pop("password", None)  # the admin password belongs to the admin user
        overrides = {"dbname": dbname, "user": user, "password": password}
        params.update({k: v for k, v in overrides.items() if v is not None})
        return make_conninfo("", **params)

    def _unsupported(self, what: str) -> NoReturn:
        raise NotImplementedError(f"{what} needs a server started by the harness (PgServer)")

    def stop(self, mode: str = "fast") -> NoReturn:
        """Not possible: raises NotImplementedError (the harness did not start it)."""
        self._unsupported("stop()")

    def crash(self) -> NoReturn:
        """Not possible: raises NotImplementedError (the harness did not start it)."""
        self._unsupported("crash()")

    def restart(self) -> NoReturn:
        """Not possible: raises NotImplementedError (the harness did not start it)."""
        self._unsupported("restart()")

    def __repr__(self) -> str:
        return f"<ExternalServer {self._params.get('host')}:{self._params.get('port')}>"


if TYPE_CHECKING:  # lets mypy prove that both classes satisfy the protocol

    def _is_server(pg: PgServer, external: ExternalServer) -> tuple[Server, Server]:
        return pg, external

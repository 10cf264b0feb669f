"""pytest fixtures providing real PostgreSQL servers (see :mod:`txmgr.testing`).

Loaded through the ``pytest11`` entry point ``txmgr`` or with
``-p txmgr.testing.pytest_plugin``. Importing it is cheap: servers are started by the
fixtures, on first use, and the harness modules are imported only then.

Where the servers come from (:mod:`txmgr.testing._env`): ``$TXMGR_TEST_DSNS``
(servers that already run), else ``$TXMGR_TEST_BACKEND``: ``local`` processes (the
default) or ``docker`` containers. With ``docker`` and no Docker engine answering,
the tests that need servers are skipped with the reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    from ._admin import Server
    from ._pgbouncer import PgBouncer
    from ._server import PgServer

__all__ = [
    "MakeDatabase",
    "MakePgBouncer",
    "crash_server",
    "make_database",
    "pg_server",
    "pg_servers",
    "pgbouncers",
]

_SERVER_COUNT = 2
_ENTRY_POINT = "txmgr"  # name of this plugin's pytest11 entry point
_DSNS_ENV_VAR = "TXMGR_TEST_DSNS"
_BACKEND_ENV_VAR = "TXMGR_TEST_BACKEND"


class MakeDatabase(Protocol):
    """Type of the ``make_database`` fixture, for annotating test parameters."""

    def __call__(self, server: Server | None = None, *, template: str | None = None) -> str: ...


class MakePgBouncer(Protocol):
    """Type of the ``pgbouncers`` fixture, for annotating test parameters."""

    def __call__(self, pool_mode: str = "transaction", *,
                 ignore_startup_parameters: tuple[str, ...] = (), pool_size: int = 20,
                 server: Server | None = None) -> PgBouncer: ...


def pytest_plugin_registered(
    plugin: object, plugin_name: str, manager: pytest.PytestPluginManager
) -> None:
    # `-p txmgr.testing.pytest_plugin` registers this module under its module name; the
    # installed entry point would then register the same module again under "txmgr",
    # which pytest rejects ("Plugin already registered under a different name").
    # Blocking the entry point's name makes the -p spelling work installed or not.
    if plugin is sys.modules[__name__] and plugin_name != _ENTRY_POINT:
        manager.set_blocked(_ENTRY_POINT)


def pytest_configure(config: pytest.Config) -> None:
    """Reject an unknown ``$TXMGR_TEST_BACKEND`` before any test runs."""
    if os.environ.get(_BACKEND_ENV_VAR, "").strip():
        from ._env import server_backend
        from ._errors import PgServerError

        try:
            server_backend()
        except PgServerError as e:
            raise pytest.UsageError(str(e)) from None


def _start_servers(count: int) -> list[PgServer]:
    from ._server import PgServer

    servers = [PgServer() for _ in range(count)]
    # Each start costs about a second, mostly waiting for initdb: overlap them.
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(server.start) for server in servers]
    errors = [exc for f in futures if (exc := f.exception()) is not None]
    if errors:
        for server in servers:
            server.destroy()
        raise errors[0]
    return servers


@pytest.fixture(scope="session")
def pg_servers() -> Iterator[list[Server]]:
    """Two servers for the session: from ``$TXMGR_TEST_DSNS``, else started here."""
    from ._env import server_backend, servers_from_env

    external = servers_from_env(_SERVER_COUNT)
    if external is not None:
        yield external
        return
    if server_backend() == "docker":
        yield from _container_servers(_SERVER_COUNT)
        return
    started = _start_servers(_SERVER_COUNT)
    try:
        yield list(started)
    finally:
        for server in started:
            server.destroy()


def _container_servers(count: int) -> Iterator[list[Server]]:
    from .containers import ContainerServer, docker_unavailable_reason

    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"{_BACKEND_ENV_VAR}=docker, but {reason}; "
                    f"unset {_BACKEND_ENV_VAR} to run local servers")  # fmt: skip
    containers: list[ContainerServer] = []
    try:
        for _ in range(count):
            containers.append(ContainerServer())
            containers[-1].start()
        yield list(containers)
    finally:
        for container in containers:
            container.destroy()


@pytest.fixture(scope="session")
def pg_server(pg_servers: list[Server]) -> Server:
    """The first of :func:`pg_servers`."""
    return pg_servers[0]


@pytest.fixture
def make_database(pg_server: Server) -> Iterator[MakeDatabase]:
    """Factory ``make_database(server=None, *, template=None) -> dsn`` of fresh
    databases (copies of the database ``template``, when given).

    Every database is dropped when the test ends, after rolling back the prepared
    transactions the test left behind (they would block DROP DATABASE).
    """
    from psycopg.conninfo import conninfo_to_dict

    made: list[tuple[Server, str]] = []

    def make(server: Server | None = None, *, template: str | None = None) -> str:
        target = server if server is not None else pg_server
        dsn = target.create_database(template=template)
        made.append((target, str(conninfo_to_dict(dsn)["dbname"])))
        return dsn

    yield make
    errors: list[Exception] = []
    for server, name in reversed(made):
        if not getattr(server, "is_running", lambda: True)():
            continue  # a crash test's own server, already destroyed with its databases
        try:
            server.drop_database(name)
        except Exception as exc:  # drop the others anyway, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def crash_server() -> Iterator[PgServer]:
    """A private server the test may ``crash()``, ``restart()`` or ``stop()``."""
    if os.environ.get(_DSNS_ENV_VAR, "").strip():
        pytest.skip(
            f"crash_server needs a server started by the harness, but {_DSNS_ENV_VAR} "
            "selects external servers, which cannot be crashed"
        )
    from ._env import server_backend
    from ._server import PgServer

    if server_backend() == "docker":
        pytest.skip(
            f"crash_server needs a local server the harness can crash with pg_ctl; "
            f"{_BACKEND_ENV_VAR}=docker runs servers in containers"
        )

    with PgServer() as server:
        yield server


@pytest.fixture(scope="session")
def pgbouncers(pg_server: Server) -> Iterator[MakePgBouncer]:
    """Factory ``pgbouncers(pool_mode="transaction", ignore_startup_parameters=(),
    pool_size=20, server=None) -> PgBouncer``: a running PgBouncer in front of
    ``server`` (default: :func:`pg_server`) mapping every database, one per distinct
    setting for the whole session (its pools are shared: give each test its own
    databases). Skips when pgbouncer is not installed or the servers were not
    started by the harness."""
    from ._pgbouncer import PgBouncer, find_pgbouncer

    if find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer, or $TXMGR_PGBOUNCER)")
    started: dict[tuple[object, ...], PgBouncer] = {}

    def make(pool_mode: str = "transaction", *,
             ignore_startup_parameters: tuple[str, ...] = (), pool_size: int = 20,
             server: Server | None = None) -> PgBouncer:
        target = server if server is not None else pg_server
        if not hasattr(target, "port") or getattr(target, "host", None) is None:
            pytest.skip("PgBouncer needs a server started by the harness (host, port, password)")
        key = (id(target), pool_mode, tuple(ignore_startup_parameters), pool_size)
        if key not in started:
            assert pool_mode in ("session", "transaction", "statement"), pool_mode
            started[key] = PgBouncer(
                target,  # type: ignore[arg-type]  # a PgServer (checked above)
                pool_mode=pool_mode,  # type: ignore[arg-type]
                ignore_startup_parameters=ignore_startup_parameters, pool_size=pool_size,
            ).start()
        return started[key]

    try:
        yield make
    finally:
        for bouncer in started.values():
            bouncer.stop()

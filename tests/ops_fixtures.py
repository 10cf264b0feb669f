"""Fixtures of the operations tests (re-exported by ``conftest.py``).

``cluster``: two participants on two servers (``orders`` on the first,
``billing`` on the second), a dedicated, migrated decision log on the first,
a table ``kv (k text primary key, v int)`` in each participant and a config
file naming them. ``daemons``: a factory of daemon subprocesses, killed at
teardown.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops_support import KV_TABLE, Cluster, DaemonProcess, query, write_config
from txmgr._migrate import migrate
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase


@pytest.fixture
def cluster(
    pg_servers: list[Server], make_database: MakeDatabase, tmp_path: Path
) -> Iterator[Cluster]:
    orders = make_database(pg_servers[0])
    billing = make_database(pg_servers[1])
    log = make_database(pg_servers[0])
    for dsn in (orders, billing):
        query(dsn, KV_TABLE)
    migrate(log)
    c = Cluster(list(pg_servers), {"orders": orders, "billing": billing}, log, tmp_path)
    c.logid = str(query(log, "SELECT logid FROM txmgr_log_meta")[0][0])
    c.config_path = write_config(tmp_path / "txmgr.toml", c.participants, log)
    yield c


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory of daemon subprocesses; any still running at teardown is SIGKILLed."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, interval: float = 0.3) -> DaemonProcess:
        d = DaemonProcess(
            config, tmp_path / f"daemon{len(started)}-{secrets.token_hex(3)}.log", *args,
            interval=interval,
        )  # fmt: skip
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()

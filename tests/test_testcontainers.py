"""The Docker path of the harness: runs where a Docker engine answers, skips elsewhere."""

from __future__ import annotations

import psycopg
import pytest

import txmgr
from txmgr.testing.containers import ContainerServer, docker_available

pytestmark = pytest.mark.skipif(
    not docker_available(),
    reason="no Docker engine reachable (the docker client alone is not enough)",
)


def test_two_phase_commit_in_containers() -> None:
    with ContainerServer() as server:
        dsns = {name: server.create_database() for name in ("a", "b")}
        log = server.create_database()
        txmgr.migrate(log)
        for dsn in dsns.values():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (x int)")
        with txmgr.TransactionManager(dsns, log) as tm, tm.transaction() as tx:
            for name in dsns:
                tx.connection(name).execute("INSERT INTO t VALUES (1)")
        for dsn in dsns.values():
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)

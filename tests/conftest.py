"""Shared fixtures: a "bank" of participant databases on the harness's real servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import txmgr
from ops_fixtures import cluster, daemons  # noqa: F401  (fixtures of the operations tests)
from support import ACCOUNTS, START, Bank, MakeBank, query
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase


@pytest.fixture
def make_bank(make_database: MakeDatabase, pg_servers: list[Server]) -> Iterator[MakeBank]:
    """``make_bank(names=("a", "b"), log="dedicated"|name, servers=[...])``."""
    banks: list[Bank] = []

    def make(
        names: tuple[str, ...] = ("a", "b"),
        log: str = "dedicated",
        servers: list[Server] | None = None,
    ) -> Bank:
        servers = servers or pg_servers
        dsns = {n: make_database(servers[i % len(servers)]) for i, n in enumerate(names)}
        for dsn in dsns.values():
            query(dsn, "CREATE TABLE accounts (id int PRIMARY KEY, "
                       "balance int NOT NULL CHECK (balance >= 0))")
            query(dsn, "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                  (START, ACCOUNTS))
        log_target = make_database(servers[0]) if log == "dedicated" else log
        txmgr.migrate(dsns.get(log_target, log_target))
        bank = Bank(dsns, log_target)
        banks.append(bank)
        return bank

    yield make
    for bank in banks:
        bank.close()


@pytest.fixture
def bank(make_bank: MakeBank) -> Bank:
    """Two participants on two servers, with a dedicated log database."""
    return make_bank()

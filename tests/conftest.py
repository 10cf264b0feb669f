"""Shared fixtures: a "bank" of participant databases on the harness's real servers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

import txmgr
from ops_fixtures import cluster, daemons  # noqa: F401  (fixtures of the operations tests)
from support import ACCOUNTS, START, Bank, MakeBank, query
from txmgr._adopt import adopt_log
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase

ACCOUNTS_DDL = ("CREATE TABLE accounts (id int PRIMARY KEY, "
                "balance int NOT NULL CHECK (balance >= 0))")


def fill_bank_database(dsn: str, *, log: bool) -> None:
    """The accounts of a participant database, and the decision log tables if ``log``."""
    query(dsn, ACCOUNTS_DDL)
    query(dsn, "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
          (START, ACCOUNTS))
    if log:
        txmgr.migrate(dsn)


class BankTemplates:
    """Per session server, template databases of a bank: a participant (``accounts``),
    a dedicated log (``log``) and a participant holding the log (``accounts+log``).

    Most tests make a bank, and copying a template is cheaper than filling a fresh
    database and running alembic each time (about 0.1 s less per bank here). A copy of
    a log is a copied log (:mod:`txmgr._identity`) until it is adopted: it then has a
    log id of its own and no decisions, as if just migrated.
    """

    KINDS = ("accounts", "log", "accounts+log")

    def __init__(self, servers: list[Server]) -> None:
        self._servers = servers
        self._names: dict[tuple[int, str], str] = {}

    def serves(self, server: Server) -> bool:
        return any(server is s for s in self._servers)

    def name(self, server: Server, kind: str) -> str:
        key = (next(i for i, s in enumerate(self._servers) if s is server), kind)
        if key not in self._names:
            name = f"tmpl_{kind.replace('+', '_')}_{secrets.token_hex(4)}"
            dsn = server.create_database(name)
            if kind == "log":
                txmgr.migrate(dsn)
            else:
                fill_bank_database(dsn, log=kind == "accounts+log")
            self._names[key] = name
        return self._names[key]

    def drop(self) -> None:
        for (index, _), name in self._names.items():
            self._servers[index].drop_database(name)


@pytest.fixture(scope="session")
def bank_templates(pg_servers: list[Server]) -> Iterator[BankTemplates]:
    templates = BankTemplates(pg_servers)
    yield templates
    templates.drop()


@pytest.fixture
def make_bank(
    make_database: MakeDatabase, pg_servers: list[Server], bank_templates: BankTemplates
) -> Iterator[MakeBank]:
    """``make_bank(names=("a", "b"), log="dedicated"|name, servers=[...])``."""
    banks: list[Bank] = []

    def database(server: Server, kind: str) -> str:
        if not bank_templates.serves(server):  # e.g. a crash test's own server
            dsn = make_database(server)
            if kind == "log":
                txmgr.migrate(dsn)
            else:
                fill_bank_database(dsn, log=kind == "accounts+log")
            return dsn
        dsn = make_database(server, template=bank_templates.name(server, kind))
        if kind != "accounts":
            adopt_log(dsn)
        return dsn

    def make(
        names: tuple[str, ...] = ("a", "b"),
        log: str = "dedicated",
        servers: list[Server] | None = None,
    ) -> Bank:
        servers = servers or pg_servers
        dsns = {n: database(servers[i % len(servers)], "accounts+log" if n == log else "accounts")
                for i, n in enumerate(names)}
        if log == "dedicated":
            log_target = database(servers[0], "log")
        else:  # a participant's name (its database was copied with the log), or a DSN
            log_target = log
            if log not in dsns:
                txmgr.migrate(log)
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

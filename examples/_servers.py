"""Databases for the examples: yours, from the environment, or throwaway servers.

Every example runs as ``python examples/NAME.py`` with no arguments::

    with example_databases() as db:
        tm = txmgr.TransactionManager(db.participants, log=db.log)

``db.participants`` maps ``orders`` and ``billing`` to the DSNs in ``$ORDERS_DSN``
and ``$BILLING_DSN``; ``db.log`` is ``$TXLOG_DSN``, or, when that is not set, the
participant name ``"orders"`` (the decision log then lives in the orders
database). The log's tables are migrated (``txmgr.migrate``) before the block runs.
Both participants need ``max_prepared_transactions > 0``.

Without ``$ORDERS_DSN`` and ``$BILLING_DSN`` two throwaway PostgreSQL servers are
started with :class:`txmgr.testing.PgServer` (PostgreSQL binaries on this machine,
or ``pip install 'txmgr[embedded]'``) and removed afterwards; the log then gets a
database of its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import psycopg

import txmgr

__all__ = ["ExampleDatabases", "balances", "create_accounts", "example_databases", "masked"]


@dataclass(frozen=True)
class ExampleDatabases:
    """Where an example works: two participants and the decision log."""

    participants: dict[str, str]  # "orders" and "billing" -> DSN
    log: str  # a DSN, or the name of the participant holding the log

    @property
    def log_dsn(self) -> str:
        """The decision log's DSN, also when it lives in a participant."""
        return self.participants.get(self.log, self.log)


@contextmanager
def example_databases() -> Iterator[ExampleDatabases]:
    """The example's databases (see the module docstring), with the log migrated."""
    orders, billing = os.environ.get("ORDERS_DSN"), os.environ.get("BILLING_DSN")
    with ExitStack() as stack:
        if orders and billing:
            db = ExampleDatabases({"orders": orders, "billing": billing},
                                  os.environ.get("TXLOG_DSN") or "orders")
        elif orders or billing:
            raise SystemExit("set both ORDERS_DSN and BILLING_DSN, or neither")
        else:
            db = _throwaway_databases(stack)
        txmgr.migrate(db.log_dsn)
        yield db


def _throwaway_databases(stack: ExitStack) -> ExampleDatabases:
    from txmgr.testing import PgServer

    print("ORDERS_DSN and BILLING_DSN are not set: starting two throwaway PostgreSQL servers")
    first = stack.enter_context(PgServer(max_prepared_transactions=10))
    second = stack.enter_context(PgServer(max_prepared_transactions=10))
    return ExampleDatabases(
        {"orders": first.create_database("orders"), "billing": second.create_database("billing")},
        first.create_database("txlog"),
    )


def create_accounts(dsn: str, balances: Mapping[int, int]) -> None:
    """Create ``example_accounts`` if needed and set these accounts' balances."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS example_accounts ("
            " id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))"
        )
        for account, balance in balances.items():
            conn.execute(
                "INSERT INTO example_accounts (id, balance) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
                (account, balance),
            )


def balances(dsn: str) -> dict[int, int]:
    """Every account's balance in ``example_accounts``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, balance FROM example_accounts ORDER BY id").fetchall()
    return {account: balance for account, balance in rows}


def masked(text: str) -> str:
    """``text`` with the passwords of the DSNs in it replaced by ``****``."""
    text = re.sub(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]*@", r"\1****@", text)
    return re.sub(r"(password\s*=\s*)\S+", r"\1****", text)

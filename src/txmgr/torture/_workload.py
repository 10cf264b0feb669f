"""The bank: the schema every participant holds, and one transfer through txmgr.

Each participant database keeps ``accounts`` (a balance that may never go
negative) and ``ledger`` (one row per transfer that touched this database,
keyed by the transfer id). A transfer debits an account in one participant
and credits an account in another, writing a ledger row in each, so the
checker can tell for every transfer id whether both halves, or neither,
committed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from txmgr.transaction import Transaction

__all__ = [
    "START_BALANCE",
    "Transfer",
    "create_role",
    "create_schema",
    "plan_transfer",
    "run_transfer_body",
]

START_BALANCE = 1000

_SCHEMA = (
    "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))",
    "CREATE TABLE ledger (transfer_id text PRIMARY KEY, account int NOT NULL, "
    "delta bigint NOT NULL CHECK (delta <> 0))",
)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move ``amount`` from ``src``'s account to ``dst``'s account."""

    transfer_id: str
    src: str  # participant debited
    src_account: int
    dst: str  # participant credited
    dst_account: int
    amount: int
    reader: str | None = None  # a third participant only read (a read-only branch)


def create_role(admin_dsn: str, role: str, password: str) -> None:
    """Create the login role the clients and daemons use (idempotent per server)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )


def create_schema(dsn: str, accounts: int) -> None:
    """Create the bank tables in ``dsn`` (connect as their future owner)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in _SCHEMA:
            conn.execute(statement.encode())
        conn.execute(
            "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
            (START_BALANCE, accounts),
        )


def plan_transfer(
    rng: random.Random, transfer_id: str, participants: list[str], accounts: int
) -> Transfer:
    """A random transfer between two different participants."""
    src, dst = rng.sample(participants, 2)
    others = [p for p in participants if p not in (src, dst)]
    reader = others[0] if others and rng.random() < 0.2 else None
    return Transfer(
        transfer_id,
        src,
        rng.randint(1, accounts),
        dst,
        rng.randint(1, accounts),
        rng.randint(1, 150),
        reader,
    )


def run_transfer_body(tx: Transaction, t: Transfer) -> None:
    """The statements of ``t`` inside global transaction ``tx`` (not committed here).

    Participants are touched in name order whatever the direction: txmgr does
    not detect deadlocks across databases, so every transfer takes its row
    locks in one global order (the clients' ``lock_timeout`` is the backstop
    for locks held by in-doubt branches).
    """
    legs: dict[str, tuple[int, int]] = {t.src: (t.src_account, -t.amount),
                                        t.dst: (t.dst_account, t.amount)}
    for name in sorted([*legs, *([t.reader] if t.reader else [])]):
        conn: psycopg.Connection[Any] = tx.connection(name)
        if name not in legs:
            conn.execute("SELECT sum(balance) FROM accounts").fetchone()
            continue
        account, delta = legs[name]
        conn.execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta, account)
        )
        conn.execute(
            "INSERT INTO ledger (transfer_id, account, delta) VALUES (%s, %s, %s)",
            (t.transfer_id, account, delta),
        )

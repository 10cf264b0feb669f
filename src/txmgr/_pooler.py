"""Connections that may go through a pooler (PgBouncer): detect it, refuse statement pooling.

Through PgBouncer in transaction mode, a client's consecutive transactions run
on different server sessions and each server session serves many clients. So
txmgr keeps no state in a session that outlives a transaction: no server-side
prepared statement (psycopg's automatic ``_pg3_N`` would be *another* client's
statement on the next backend: data corruption), no session ``SET``, no
session advisory lock (:mod:`txmgr._leader`).

Detection: PgBouncer answers the client's startup with a BackendKeyData of its
own (a random cancel key), so the backend pid libpq was told differs from the
server's ``pg_backend_pid()``. A pooler that switches server sessions under a
client cannot tell it the one pid; a direct connection always agrees.

In statement mode (``pool_mode = statement``) no transaction may span two
statements: the probe opens one and PgBouncer refuses it; txmgr then refuses
the connection with :class:`~txmgr.errors.UnsupportedPoolMode`.
"""

from __future__ import annotations

from typing import Any

import psycopg

from txmgr._dsn import redact
from txmgr._primary import IN_RECOVERY
from txmgr.errors import UnsupportedPoolMode

__all__ = ["DEFAULT_PREPARE_THRESHOLD", "inspect", "prepare_threshold", "probe"]

#: psycopg's own default: a query is prepared on the server after 5 executions.
DEFAULT_PREPARE_THRESHOLD = 5


def prepare_threshold(wanted: int | None, *, pooled: bool) -> int | None:
    """The ``prepare_threshold`` for a connection: never any prepared statement
    through a pooler, else the configured one (None: off)."""
    return None if pooled else wanted


def inspect(conn: psycopg.Connection[Any], name: str) -> bool:
    """True when ``conn`` goes through a pooler; UnsupportedPoolMode in statement mode.

    Leaves ``conn`` idle (as it found it, but with any open transaction ended).
    Run it on a connection that has not prepared anything yet.
    """
    return probe(conn, name)[0]


def probe(conn: psycopg.Connection[Any], name: str) -> tuple[bool, object]:
    """:func:`inspect`, and ``pg_is_in_recovery()`` read in the same statement (one
    round trip for both checks a new connection needs, see :mod:`txmgr._primary`)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    autocommit = conn.autocommit
    conn.autocommit = True  # a single statement: allowed in every pool mode
    try:
        row = conn.execute("SELECT pg_backend_pid(), " + IN_RECOVERY).fetchone()
        assert row is not None
        pooled = int(row[0]) != conn.info.backend_pid
        if pooled:
            _probe_transaction(conn, name)
        return pooled, row[1]
    finally:
        if not conn.closed:
            conn.autocommit = autocommit


def _probe_transaction(conn: psycopg.Connection[Any], name: str) -> None:
    what = "the decision log" if name == "log" else f"participant {name!r}"
    try:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
    except psycopg.errors.ProtocolViolation as e:
        # PgBouncer: "transaction blocks not allowed in statement pooling mode"
        # (and it closes the connection).
        raise UnsupportedPoolMode(
            f"{what} is reached through a pooler that refused a transaction of two "
            f"statements ({redact(str(e)).strip()}): txmgr's branches and decisions are "
            "transactions; set pool_mode = transaction or pool_mode = session for this "
            "database in pgbouncer.ini (statement pooling cannot work)",
            participant=name,
        ) from None

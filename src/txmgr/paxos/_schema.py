"""The acceptor's tables (schema revision 0003) and the check that they are there.

Revision 0003 of txmgr's migrations creates them
(``txmgr/migrations/versions/0003_paxos_acceptor.py``); the DDL lives here,
frozen, so that the migration and the tests create the same thing.

- ``txmgr_paxos_acceptor``: one row, the acceptor's *incarnation* — a random
  id created with the tables. A database wiped and migrated again gets a new
  one, and so takes part only in transactions registered after that (see the
  safety argument in :mod:`txmgr.paxos._core`).
- ``txmgr_paxos``: one slot per transaction, created by registration, deleted
  once the transaction is finished.
"""

from __future__ import annotations

from typing import Any

import psycopg

from txmgr._dsn import mask
from txmgr.errors import LogSchemaError

__all__ = ["ACCEPTOR_REVISION", "DOWNGRADE", "UPGRADE", "install", "read_incarnation"]

ACCEPTOR_REVISION = "0003"

UPGRADE: tuple[str, ...] = (
    """
    CREATE TABLE txmgr_paxos_acceptor (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        incarnation text NOT NULL CHECK (incarnation ~ '^[0-9a-f]{12}$'),
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    # The first 12 hex digits of a version-4 uuid are random.
    "INSERT INTO txmgr_paxos_acceptor (incarnation) "
    "VALUES (substr(replace(gen_random_uuid()::text, '-', ''), 1, 12))",
    # Slots churn like decision rows: let autovacuum visit often.
    """
    CREATE TABLE txmgr_paxos (
        txid text PRIMARY KEY CHECK (txid ~ '^[0-9a-f]{16}$'),
        promised bigint NOT NULL DEFAULT 0 CHECK (promised >= 0),
        accepted_ballot bigint CHECK (accepted_ballot BETWEEN 0 AND promised),
        accepted_value text CHECK (accepted_value IN ('commit', 'abort')),
        participants text[],
        created_at timestamptz NOT NULL DEFAULT now(),
        CHECK ((accepted_ballot IS NULL) = (accepted_value IS NULL)),
        CHECK (CASE accepted_value WHEN 'commit' THEN participants IS NOT NULL
                                  ELSE participants IS NULL END)
    ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 1000)
    """,
)

DOWNGRADE: tuple[str, ...] = (
    "DROP TABLE txmgr_paxos",
    "DROP TABLE txmgr_paxos_acceptor",
)


def install(dsn: str) -> None:
    """Create the acceptor tables in ``dsn`` directly, in one transaction.

    For tests and tools; production databases get them from ``txmgr migrate``
    (which also creates the default mode's tables).
    """
    with psycopg.connect(dsn) as conn:
        for statement in UPGRADE:
            conn.execute(statement)


def read_incarnation(conn: psycopg.Connection[Any], dsn: str) -> str:
    """The acceptor's incarnation; LogSchemaError naming the fix when its tables are missing."""
    try:
        row = conn.execute(
            "SELECT (SELECT incarnation FROM txmgr_paxos_acceptor), "
            "to_regclass('txmgr_paxos') IS NOT NULL"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        row = None
    if not conn.autocommit:
        conn.rollback()
    if row is None or row[0] is None or not row[1]:
        raise LogSchemaError(
            f"the Paxos log database at {mask(dsn)} has no acceptor tables (schema revision "
            f"{ACCEPTOR_REVISION}): run `txmgr migrate --config FILE` against it"
        )
    return str(row[0])

"""The acceptor's tables (schema revisions 0003 and 0004) and the check that they are there.

Revision 0003 of txmgr's migrations creates them
(``txmgr/migrations/versions/0003_paxos_acceptor.py``), revision 0004 adds
each slot's ``coordinator`` (:data:`UPGRADE_0004`); the DDL lives here,
frozen, so that the migrations and the tests create the same thing.

- ``txmgr_paxos_acceptor``: one row, the acceptor's *incarnation* — a random
  id created with the tables. A database wiped and migrated again gets a new
  one, and so takes part only in transactions registered after that (see the
  safety argument in :mod:`txmgr.paxos._core`).
- ``txmgr_paxos``: one slot per transaction, created by registration, deleted
  once the transaction is finished. ``coordinator`` (0004): the key of the
  advisory lock its coordinator's process holds on this database while it
  lives (:mod:`txmgr.paxos._beacon`); NULL for slots registered before 0004.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from txmgr._dsn import mask
from txmgr._identity import LIVE_IDENTITY
from txmgr._primary import IN_RECOVERY, require_primary
from txmgr.errors import LogSchemaError
from txmgr.log import check_identity

__all__ = ["ACCEPTOR_REVISION", "DOWNGRADE", "DOWNGRADE_0004", "UPGRADE", "UPGRADE_0004",
           "check_acceptor", "install", "read_incarnation"]

#: The revision a Paxos log database needs (the statements name ``coordinator``).
ACCEPTOR_REVISION = "0004"

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

UPGRADE_0004: tuple[str, ...] = (
    # Adding a nullable column without a default rewrites nothing.
    "ALTER TABLE txmgr_paxos ADD COLUMN coordinator bigint",
)

DOWNGRADE_0004: tuple[str, ...] = (
    "ALTER TABLE txmgr_paxos DROP COLUMN coordinator",
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
        for statement in (*UPGRADE, *UPGRADE_0004):
            conn.execute(statement)


def read_incarnation(conn: psycopg.Connection[Any], dsn: str) -> str:
    """The acceptor's incarnation, after checking that the database is the one it
    was made in (LogCopied otherwise, see :mod:`txmgr._identity`) and on a primary
    (NotPrimary otherwise); LogSchemaError naming the fix when its tables are missing."""
    try:
        # to_jsonb: the binding's columns exist only from revision 0005 on.
        row = conn.execute(
            "SELECT (SELECT to_jsonb(a) FROM txmgr_paxos_acceptor a), "
            "EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('txmgr_paxos') "
            "AND attname = 'coordinator' AND NOT attisdropped), " + LIVE_IDENTITY
            + ", " + IN_RECOVERY
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        row = None
    if not conn.autocommit:
        conn.rollback()
    meta = row[0] if row is not None else None
    if not isinstance(meta, dict) or meta.get("incarnation") is None or not row or not row[1]:
        raise LogSchemaError(
            f"the Paxos log database at {mask(dsn)} has no acceptor tables at schema revision "
            f"{ACCEPTOR_REVISION}: run `txmgr migrate --config FILE` against it"
        )
    # A standby's slots may lag behind its primary's: never an acceptor (the rounds
    # check every answer too, see _acceptor.parse).
    require_primary(row[4], f"the Paxos log database at {mask(dsn)}", "log", dsn)
    incarnation = str(meta["incarnation"])
    check_identity(meta, (int(row[2]), int(row[3])),
                   what=f"Paxos log database at {mask(dsn)}",
                   ident=f"the log database of acceptor incarnation {incarnation}",
                   logid=incarnation)
    return incarnation


def check_acceptor(conn: psycopg.Connection[Any], dsn: str) -> None:
    """Refuse a connection to a copied acceptor database (for the acceptor pools'
    ``configure``: every new connection, so also one that a failover moved).
    A database without the tables passes here; the rounds report that."""
    with contextlib.suppress(LogSchemaError):
        read_incarnation(conn, dsn)

"""``txmgr migrate --adopt``: give a copied decision log an identity (see :mod:`txmgr._identity`).

Two cases, and the operator must say which, since only they know:

- the copy is a log of its own (a test environment cloned from production, a
  second application started from a template): it gets a new log id, and the
  decision rows it copied are dropped. They are the original's decisions: no
  gid of the new id names them, and the original still holds them. This is
  always safe for the original.
- the copy *replaces* the original for good (``pg_upgrade``, which gives the
  cluster a new system identifier; a move by dump and restore): ``keep_logid``
  keeps the id and the rows and only moves the binding. Safe only when the
  original is retired and the copy holds every decision it made (a dump taken
  while coordinators were deciding may lack the last ones, whose prepared
  branches this log would then roll back), and when its xids are the original's
  (pg_upgrade keeps them; a restored dump does not, but then an lxid only reads
  "in progress" or "future" by coincidence, which delays recovery, and the rows
  decide otherwise).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from txmgr._dsn import mask
from txmgr._identity import LIVE_IDENTITY
from txmgr.errors import LogIdentityError, LogSchemaError

__all__ = ["adopt_log", "is_copy"]


def adopt_log(dsn: str, *, keep_logid: bool = False) -> tuple[str, str]:
    """Bind the copied decision log at ``dsn`` to its own database; ``(old id, new id)``
    of its log id.

    A Paxos log database is adopted the same way, in the same transaction: its
    acceptor gets a new incarnation and drops the slots it copied (like a wiped
    and re-created log database, it then votes only on transactions registered
    from now on), or with ``keep_logid`` keeps both.

    Raises LogIdentityError when the database is not a copy (nothing to adopt;
    adopting the original would strand its in-doubt branches), LogSchemaError
    when it is not migrated to revision 0005 or later.
    """
    with psycopg.connect(dsn) as conn:  # one transaction: the binding and the rows together
        try:
            conn.execute("LOCK TABLE txmgr_log_meta, txmgr_paxos_acceptor "
                         "IN ACCESS EXCLUSIVE MODE")
        except psycopg.errors.UndefinedTable:
            raise LogSchemaError(
                f"{mask(dsn)} has no decision log tables: nothing to adopt"
            ) from None
        row = conn.execute(
            "SELECT (SELECT to_jsonb(m) FROM txmgr_log_meta m), "
            "(SELECT to_jsonb(a) FROM txmgr_paxos_acceptor a), " + LIVE_IDENTITY
        ).fetchone()
        assert row is not None
        meta, acceptor, system_id, db_oid = row
        live = (int(system_id), int(db_oid))
        copied = [_is_copy(m, live, dsn) for m in (meta, acceptor)]
        old = str(meta["logid"])
        if not any(copied):
            raise LogIdentityError(
                f"the decision log at {mask(dsn)} (log {old}) is not a copy: it is the "
                "database its id was made in, so there is nothing to adopt"
            )
        new = old
        if not keep_logid:
            if copied[0]:
                conn.execute("DELETE FROM txmgr_decision")
                found = conn.execute(
                    "UPDATE txmgr_log_meta SET logid = "
                    "substr(replace(gen_random_uuid()::text, '-', ''), 1, 8) RETURNING logid"
                ).fetchone()
                assert found is not None
                new = str(found[0])
            if copied[1]:
                conn.execute("DELETE FROM txmgr_paxos")
                conn.execute(
                    "UPDATE txmgr_paxos_acceptor SET incarnation = "
                    "substr(replace(gen_random_uuid()::text, '-', ''), 1, 12)"
                )
        for table, copy in zip(("txmgr_log_meta", "txmgr_paxos_acceptor"), copied, strict=True):
            if copy:
                conn.execute(
                    sql.SQL("UPDATE {} SET (system_identifier, database_oid) = (SELECT "
                            + LIVE_IDENTITY + ")").format(sql.Identifier(table))
                )
    return old, new


def _is_copy(meta: object, live: tuple[int, int], dsn: str) -> bool:
    if not isinstance(meta, dict) or meta.get("database_oid") is None:
        raise LogSchemaError(
            f"the decision log at {mask(dsn)} has no identity binding yet (schema "
            "revision below 0005): run `txmgr migrate` first; a log migrated in place "
            "is bound to itself and needs no adoption"
        )
    return (int(meta["system_identifier"]), int(meta["database_oid"])) != live


def is_copy(dsn: str) -> bool:
    """Whether the (migrated) log database at ``dsn`` reads as a copy."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT to_jsonb(m) FROM txmgr_log_meta m), "
                "(SELECT to_jsonb(a) FROM txmgr_paxos_acceptor a), " + LIVE_IDENTITY
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return False
    assert row is not None
    live = (int(row[2]), int(row[3]))
    return any(_is_copy(m, live, dsn) for m in row[:2])

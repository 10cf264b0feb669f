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

from txmgr._dsn import mask
from txmgr._identity import LIVE_IDENTITY
from txmgr.errors import LogIdentityError, LogSchemaError

__all__ = ["adopt_log"]


def adopt_log(dsn: str, *, keep_logid: bool = False) -> tuple[str, str]:
    """Bind the copied decision log at ``dsn`` to its own database; ``(old id, new id)``.

    Raises LogIdentityError when the database is not a copy (nothing to adopt;
    adopting the original would strand its in-doubt branches), LogSchemaError
    when it is not migrated to revision 0004 or later.
    """
    with psycopg.connect(dsn) as conn:  # one transaction: the meta row and the rows together
        try:
            conn.execute("LOCK TABLE txmgr_log_meta IN ACCESS EXCLUSIVE MODE")
        except psycopg.errors.UndefinedTable:
            raise LogSchemaError(
                f"{mask(dsn)} has no decision log tables: nothing to adopt"
            ) from None
        row = conn.execute(
            "SELECT (SELECT to_jsonb(m) FROM txmgr_log_meta m), " + LIVE_IDENTITY
        ).fetchone()
        assert row is not None
        meta, system_id, db_oid = row
        if not isinstance(meta, dict) or meta.get("database_oid") is None:
            raise LogSchemaError(
                f"the decision log at {mask(dsn)} has no identity binding yet (schema "
                "revision below 0004): run `txmgr migrate` first; a log migrated in place "
                "is bound to itself and needs no adoption"
            )
        old = str(meta["logid"])
        if (int(meta["system_identifier"]), int(meta["database_oid"])) == (
            int(system_id), int(db_oid)
        ):
            raise LogIdentityError(
                f"the decision log at {mask(dsn)} (log {old}) is not a copy: it is the "
                "database its id was made in, so there is nothing to adopt"
            )
        if keep_logid:
            new = old
        else:
            conn.execute("DELETE FROM txmgr_decision")
            found = conn.execute(
                "UPDATE txmgr_log_meta "
                "SET logid = substr(replace(gen_random_uuid()::text, '-', ''), 1, 8) "
                "RETURNING logid"
            ).fetchone()
            assert found is not None
            new = str(found[0])
        conn.execute(
            "UPDATE txmgr_log_meta SET (system_identifier, database_oid) = "
            "(SELECT " + LIVE_IDENTITY + ")"
        )
    return old, new

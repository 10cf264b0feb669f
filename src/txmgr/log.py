"""The decision log: where the commit decision of a global transaction is made durable.

The commit point of a global transaction is the commit of one ordinary
PostgreSQL transaction ``L`` on the log database. ``L`` inserts the decision
row; its xid (``lxid``) is written into every branch gid, so anyone can ask
the log database whether ``L`` is still running (``pg_xact_status(lxid)``).
Presumed abort: an aborted ``L`` leaves nothing.

Once ``L`` is no longer in progress, the *row* decides, not the xid's status:
an xid that never reached the WAL can be handed out again after the log
server crashes, so after a crash ``pg_xact_status(lxid)`` may describe some
other transaction. The row carries the random txid, which no other
transaction can commit. The row must be read in a statement that starts after
``L`` was seen finished (a fresh snapshot), see :func:`committed_txids`.

The contract (narrow on purpose, so that a replicated log is a second
implementation of it, not a rewrite):

- ``open_decision(conn, txid, participants, …) -> lxid`` — inside the open
  transaction of ``conn`` (which becomes ``L``); may fail.
- committing ``conn`` is the decision; rolling it back is the abort.
- ``xact_status(conn, lxids)`` — is the decision transaction still running?
- ``committed_txids(conn, txids)`` — which of these decisions committed.
- ``decision_rows`` / ``delete_decisions`` — bookkeeping of finished rows.

Everything here takes a connection to the log database; nothing here knows
about participants' connections.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from txmgr._dsn import mask
from txmgr._identity import LIVE_IDENTITY
from txmgr._primary import IN_RECOVERY, require_primary
from txmgr.errors import LogCopied, LogSchemaError

__all__ = [
    "LOCK_TIMEOUT",
    "MIN_SCHEMA_REVISION",
    "SCHEMA_REVISION",
    "DecisionRow",
    "XactStatus",
    "check_identity",
    "committed_txids",
    "decide_query",
    "decision_query",
    "decision_rows",
    "decision_settings",
    "delete_decisions",
    "open_decision",
    "read_decisions",
    "read_logid",
    "xact_status",
]

#: The migrations' head (tests check it). Revisions 0003 and 0004 only concern
#: the Paxos acceptor's tables, so the default mode works on a log at any
#: revision from :data:`MIN_SCHEMA_REVISION` up to this one and never demands them.
#: Revision 0005 binds the log id to its database; a log below it still works
#: (without the copy check) so that txmgr can be upgraded before its logs are
#: migrated (the other order stops older coordinators: "migrated by a newer txmgr").
#: Nor does it demand 0006 (without its verdict table a deadlock victim sees a
#: plain cancel, see txmgr._verdict).
SCHEMA_REVISION = "0006"
MIN_SCHEMA_REVISION = "0002"
VERSION_TABLE = "txmgr_alembic_version"

#: pg_xact_status, plus "future" for an xid the server has not handed out
#: (yet, or again: the log server crashed and lost it). None: older than the
#: commit-log horizon.
XactStatus = Literal["committed", "aborted", "in progress", "future"] | None


@dataclass(frozen=True, slots=True)
class DecisionRow:
    """A commit decision that still has branches to finish (or not yet cleaned up)."""

    txid: str
    lxid: int
    participants: tuple[str, ...]
    created_at: datetime


def read_logid(conn: psycopg.Connection[Any], dsn: str) -> str:
    """The log's id, after checking that its schema is at a revision from
    :data:`MIN_SCHEMA_REVISION` to :data:`SCHEMA_REVISION` and that the database
    is the one the id was made in (not a copy).

    Every reader of the log id calls this (coordinator, recovery on each pass,
    status, resolve, the daemon's leadership), in one round trip. Raises
    LogSchemaError naming the command to run when the schema does not fit,
    LogCopied when the database is a copy.
    """
    fix = "run `txmgr migrate --config FILE` (or txmgr.migrate(dsn)) against it"
    try:
        # to_jsonb: the binding's columns exist only from revision 0005 on.
        row = conn.execute(
            "SELECT (SELECT to_jsonb(m) FROM txmgr_log_meta m), "
            "(SELECT version_num FROM txmgr_alembic_version LIMIT 1), "
            + IN_RECOVERY + ", " + LIVE_IDENTITY
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        _reset(conn)
        raise LogSchemaError(
            f"the decision log at {mask(dsn)} has no txmgr tables: {fix}"
        ) from None
    _reset(conn)
    assert row is not None
    meta, revision, in_recovery, system_id, db_oid = row
    # Every pass of recovery, status, resolve and the daemon starts here.
    require_primary(in_recovery, "the decision log", "log", dsn)
    logid = meta.get("logid") if isinstance(meta, dict) else None
    usable = isinstance(revision, str) and MIN_SCHEMA_REVISION <= revision <= SCHEMA_REVISION
    if not usable or logid is None:
        direction = "newer txmgr" if revision and revision > SCHEMA_REVISION else fix
        raise LogSchemaError(
            f"the decision log at {mask(dsn)} is at schema revision {revision!r}, this "
            f"txmgr needs {MIN_SCHEMA_REVISION!r} to {SCHEMA_REVISION!r}: "
            + (f"it was migrated by a {direction}; upgrade txmgr" if direction != fix else fix)
        )
    assert isinstance(meta, dict)
    check_identity(meta, (int(system_id), int(db_oid)), what=f"decision log at {mask(dsn)}",
                   ident=f"log {logid}", logid=str(logid))
    return str(logid)


def check_identity(meta: dict[str, Any], live: tuple[int, int], *, what: str, ident: str,
                   logid: str) -> None:
    """Raise LogCopied when ``meta`` (a meta row as JSON) is bound to another
    database than ``live`` (this one's system identifier and oid). A row without
    a binding (schema below 0005) is not checked. The one rule for both log modes."""
    bound = meta.get("system_identifier"), meta.get("database_oid")
    if bound[0] is None or bound[1] is None:
        return
    if (int(bound[0]), int(bound[1])) == live:
        return
    raise LogCopied(
        f"the {what} is a copy of {ident}: that id was made in database oid {bound[1]} of "
        f"cluster {bound[0]}, this is database oid {live[1]} of cluster {live[0]} (a "
        "restored dump, a CREATE DATABASE … TEMPLATE clone, or a re-initialized or "
        "upgraded cluster). Its recovery would take the original's transactions as its "
        "own, so nothing decides here. If it is a log of its own, run `txmgr migrate "
        "--adopt --config FILE` (a new id; the copied decisions are dropped). If it "
        "replaces the original for good (pg_upgrade, a move; the original is retired and "
        "this copy holds every decision it made), run `txmgr migrate --adopt --keep-logid "
        "--config FILE`",
        logid=logid,
    )


#: What every ``L`` runs with, set inside ``L`` itself: the decision must survive
#: a crash of the log server before anybody is told it is committed, and a
#: coordinator that hangs inside the protocol is aborted by the server itself,
#: so in-doubt branches never wait on a dead process forever. Never as session
#: settings (libpq ``options``): PgBouncer refuses or drops those, and role or
#: database defaults (``ALTER DATABASE … SET synchronous_commit = off``) would
#: win over nothing. ``SET LOCAL`` overrides every default and ends with ``L``.
#: (PostgreSQL 15 did not arm the idle timer when the SET came through a
#: pipeline of the extended protocol; it goes in the simple protocol, in the
#: same query as the rest of ``L``'s first statement: no round trip of its own.)
_L_SETTINGS = (
    "SET LOCAL synchronous_commit = on; SET LOCAL idle_in_transaction_session_timeout = {}"
)

#: How long a statement of recovery, status or cleanup on the log waits for a
#: lock (a DDL lock on the log tables, a row a hung coordinator's ``L`` holds)
#: before it fails and the next pass tries again, instead of hanging.
LOCK_TIMEOUT = "10s"
_GUARD = sql.SQL("SET LOCAL lock_timeout = {}; ").format(sql.Literal(LOCK_TIMEOUT))


def _timeout_ms(idle_timeout: float) -> int:
    return max(1, int(idle_timeout * 1000))


def _decision_row(
    txid: str, participants: Sequence[str], forget: Sequence[str], *, returning: str = ""
) -> list[sql.Composable]:
    """Delete the rows of ``forget``, insert ``txid``'s (``L``'s xid as its lxid)."""
    parts: list[sql.Composable] = []
    if forget:
        parts.append(
            sql.SQL("DELETE FROM txmgr_decision WHERE txid = ANY({}::text[])").format(
                sql.Literal(list(forget))
            )
        )
    parts.append(
        sql.SQL(
            "INSERT INTO txmgr_decision (txid, lxid, participants) "
            "VALUES ({}, pg_current_xact_id(), {}::text[])" + returning
        ).format(sql.Literal(txid), sql.Literal(list(participants)))
    )
    return parts


def decision_query(
    txid: str,
    participants: Sequence[str],
    *,
    idle_timeout: float,
    forget: Sequence[str] = (),
    begin: bool,
) -> sql.Composed:
    """The one query that opens ``L`` (with ``begin``) and inserts the decision row.

    It also deletes the rows of ``forget`` (finished earlier), so that cleanup
    costs no round trip of its own. Its last result is ``L``'s xid. It is sent
    in the simple protocol, every value quoted by psycopg (``sql.Literal``).
    It always carries ``L``'s settings (:data:`_L_SETTINGS`), whatever the
    session's own are.
    """
    parts: list[sql.Composable] = []
    if begin:
        parts.append(sql.SQL("BEGIN"))
    parts.append(sql.SQL(_L_SETTINGS).format(sql.Literal(_timeout_ms(idle_timeout))))
    parts += _decision_row(txid, participants, forget, returning=" RETURNING lxid::text")
    return sql.SQL("; ").join(parts)


def decision_settings(idle_timeout: float) -> bytes:
    """The two ``SET LOCAL`` every ``L`` on a log participant's branch needs (see
    :func:`decision_query`), as a prefix for a query sent before any PREPARE."""
    return (_L_SETTINGS.format(_timeout_ms(idle_timeout)) + "; ").encode()


def decide_query(txid: str, participants: Sequence[str], *, forget: Sequence[str] = ()
                 ) -> sql.Composed:
    """Insert the decision row and COMMIT ``L``, in one query: for an ``L`` that is a
    log participant's branch which already has its xid (its gids carry it) and
    its settings (:func:`decision_settings`). The row is part of ``L`` whether
    inserted first or last: ``L``'s commit is the decision either way. If the
    INSERT fails, the COMMIT is not run and ``L`` is left failed (rolled back)."""
    return sql.SQL("; ").join([*_decision_row(txid, participants, forget), sql.SQL("COMMIT")])


def open_decision(
    conn: psycopg.Connection[Any],
    txid: str,
    participants: Sequence[str],
    *,
    idle_timeout: float,
    forget: Sequence[str] = (),
) -> int:
    """Insert the decision row, opening ``L`` on ``conn`` (or inside its open
    transaction); return ``L``'s xid. One round trip."""
    begin = conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    query = decision_query(
        txid, participants, idle_timeout=idle_timeout, forget=forget, begin=begin
    )
    cur = psycopg.ClientCursor(conn)
    cur.execute(query)
    while cur.nextset():  # the INSERT's RETURNING is the last result
        pass
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def xact_status(conn: psycopg.Connection[Any], lxids: Iterable[int]) -> dict[int, XactStatus]:
    """``pg_xact_status`` of each lxid; only "in progress" means "wait".

    Any other answer means ``L`` is over; then :func:`committed_txids`, in a
    later statement, tells commit from abort.
    """
    ids = sorted(set(lxids))
    if not ids:
        return {}
    try:
        return _xact_status(conn, ids)
    except psycopg.errors.InvalidParameterValue:
        # "transaction ID … is in the future": the log server crashed and never
        # handed that xid out again (yet). Ask one by one to find which.
        _reset(conn)
    out: dict[int, XactStatus] = {}
    for x in ids:
        try:
            out.update(_xact_status(conn, [x]))
        except psycopg.errors.InvalidParameterValue:
            _reset(conn)
            out[x] = "future"
    return out


def _xact_status(conn: psycopg.Connection[Any], ids: list[int]) -> dict[int, XactStatus]:
    # A transaction is marked committed in the commit log before it leaves the
    # process array (and, with synchronous replication, before the standby
    # confirms); until then its commit is not visible to new snapshots, and
    # some server releases report "committed" already. Its xid lock is held
    # until after that, so while the lock is held, report "in progress".
    #
    # On a standby (see txmgr._primary) an xid not replayed yet is "in the
    # future" or reads as not committed: the CASE skips pg_xact_status there, so
    # that the refusal, not an error or a wrong status, is the answer.
    #
    # pg_locks shows a 32-bit xid; it is widened to 64 bits against n, the
    # next xid when the statement began (pg_snapshot_xmax: assigns no xid to
    # this reader): the one value below n with those low bits. Exact for every
    # x that pg_xact_status answers for: such an x is within 2^31 below n (older
    # ones are past the commit-log horizon, which wraparound protection keeps
    # within 2^31), as is every xid running before n; an xid assigned after n
    # widens to below n - 2^31. So an x of another epoch never matches. (The
    # low-bits comparison it replaces was exact for the same reasons.)
    rows = conn.execute(
        "SELECT x, CASE WHEN s = 'committed' AND EXISTS ("
        "  SELECT 1 FROM pg_locks l WHERE l.locktype = 'transactionid'"
        "  AND n - ((n %% 4294967296 - l.transactionid::text::bigint + 4294967296)"
        "           %% 4294967296) = x)"
        " THEN 'in progress' ELSE s END, r "
        "FROM (SELECT x, r, CASE WHEN r THEN NULL ELSE pg_xact_status(x::text::xid8) END AS s,"
        "      pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n"
        "      FROM unnest(%s::bigint[]) AS x, " + IN_RECOVERY + " AS r) AS q",
        (ids,),
    ).fetchall()
    _reset(conn)
    for r in rows:
        _require_primary(conn, r[2])
    return {int(r[0]): r[1] for r in rows}


def _require_primary(conn: psycopg.Connection[Any], in_recovery: object) -> None:
    require_primary(in_recovery, "the decision log", "log", conn.info.dsn)


def committed_txids(conn: psycopg.Connection[Any], txids: Iterable[str]) -> set[str]:
    """The txids among ``txids`` whose decision row exists: their ``L`` committed.

    Call only for txids whose ``L`` :func:`xact_status` already reported as not
    in progress, in a later statement: then the row is visible iff ``L``
    committed. (Rows are deleted only after every branch is committed, so a
    branch still prepared always finds its row.)
    """
    wanted = sorted(set(txids))
    if not wanted:
        return set()
    row = _guarded(
        conn,
        "SELECT " + IN_RECOVERY + ", "
        "ARRAY(SELECT txid FROM txmgr_decision WHERE txid = ANY(%s))",
        (wanted,),
    ).fetchone()
    _reset(conn)
    assert row is not None
    _require_primary(conn, row[0])  # a lagging standby lacks rows committed on the primary
    return set(row[1])


def read_decisions(
    conn: psycopg.Connection[Any], decisions: Iterable[tuple[int, str]]
) -> tuple[dict[int, XactStatus], set[str]]:
    """The log's verdict on ``(lxid, txid)`` pairs: (status of each lxid, committed txids).

    The rule recovery, ``txmgr status`` and ``txmgr resolve`` share: an lxid
    "in progress" means wait; for the others the decision row, read in a
    statement after the status (``conn`` must be in autocommit mode), decides.
    """
    pairs = list(decisions)
    statuses = xact_status(conn, [lxid for lxid, _ in pairs])
    over = [txid for lxid, txid in pairs if statuses.get(lxid) != "in progress"]
    return statuses, committed_txids(conn, over)


def decision_rows(conn: psycopg.Connection[Any]) -> list[DecisionRow]:
    """Every decision row (committed decisions whose cleanup is pending)."""
    rows = _guarded(
        conn,
        "SELECT txid, lxid::text, participants, created_at FROM txmgr_decision ORDER BY created_at",
    ).fetchall()  # (its callers read the log id, checking primary-ness, first)
    _reset(conn)
    return [DecisionRow(r[0], int(r[1]), tuple(r[2]), r[3]) for r in rows]


def delete_decisions(conn: psycopg.Connection[Any], txids: Sequence[str]) -> int:
    """Delete the rows of ``txids``; returns how many existed."""
    if not txids:
        return 0
    cur = _guarded(conn, "DELETE FROM txmgr_decision WHERE txid = ANY(%s)", (list(txids),))
    n = cur.rowcount
    if not conn.autocommit:
        conn.commit()
    return n


def _guarded(
    conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()
) -> psycopg.ClientCursor[Any]:
    """Run ``query`` behind ``SET LOCAL lock_timeout`` (:data:`LOCK_TIMEOUT`), in one
    simple-protocol query: the setting holds whatever the session's (a pooler's,
    a role's) is, and ends with the statement's transaction. Returns the cursor
    on ``query``'s result."""
    cur = psycopg.ClientCursor(conn)
    cur.execute(_GUARD.as_string(conn) + query, params or None)
    cur.nextset()
    return cur


def _reset(conn: psycopg.Connection[Any]) -> None:
    # Reads on a non-autocommit connection leave a transaction open; end it so
    # that a pooled log connection never idles in a transaction.
    if not conn.autocommit and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()

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

from txmgr._dsn import mask, session_options
from txmgr.errors import LogSchemaError

__all__ = [
    "MIN_SCHEMA_REVISION",
    "SCHEMA_REVISION",
    "DecisionRow",
    "XactStatus",
    "committed_txids",
    "decide_query",
    "decision_query",
    "decision_rows",
    "decision_settings",
    "delete_decisions",
    "log_session_options",
    "open_decision",
    "read_decisions",
    "read_logid",
    "xact_status",
]

#: The migrations' head (tests check it). Revision 0003 only adds the Paxos
#: acceptor's tables, so the default mode works on a log at any revision from
#: :data:`MIN_SCHEMA_REVISION` up to this one and never demands 0003 or 0004 (without
#: 0004's verdict table a deadlock victim sees a plain cancel, see txmgr._verdict).
SCHEMA_REVISION = "0004"
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
    :data:`MIN_SCHEMA_REVISION` to :data:`SCHEMA_REVISION`.

    Raises LogSchemaError naming the command to run when it is not.
    """
    fix = "run `txmgr migrate --config FILE` (or txmgr.migrate(dsn)) against it"
    try:
        row = conn.execute(
            "SELECT (SELECT logid FROM txmgr_log_meta), "
            "(SELECT version_num FROM txmgr_alembic_version LIMIT 1)"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        _reset(conn)
        raise LogSchemaError(
            f"the decision log at {mask(dsn)} has no txmgr tables: {fix}"
        ) from None
    _reset(conn)
    assert row is not None
    logid, revision = row
    usable = isinstance(revision, str) and MIN_SCHEMA_REVISION <= revision <= SCHEMA_REVISION
    if not usable or logid is None:
        direction = "newer txmgr" if revision and revision > SCHEMA_REVISION else fix
        raise LogSchemaError(
            f"the decision log at {mask(dsn)} is at schema revision {revision!r}, this "
            f"txmgr needs {MIN_SCHEMA_REVISION!r} to {SCHEMA_REVISION!r}: "
            + (f"it was migrated by a {direction}; upgrade txmgr" if direction != fix else fix)
        )
    return str(logid)


#: What every ``L`` outside a dedicated log session runs with. The decision must
#: survive a crash of the log server before anybody is told it is committed,
#: whatever the server default says; and a coordinator that hangs inside the
#: protocol is aborted by the server itself, so in-doubt branches never wait on
#: a dead process forever. (PostgreSQL 15 did not arm that timer when the SET
#: came through a pipeline of the extended protocol; the simple protocol works.)
_L_SETTINGS = (
    "SET LOCAL synchronous_commit = on; SET LOCAL idle_in_transaction_session_timeout = {}"
)


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
    session_settings: bool = False,
) -> sql.Composed:
    """The one query that opens ``L`` (with ``begin``) and inserts the decision row.

    It also deletes the rows of ``forget`` (finished earlier), so that cleanup
    costs no round trip of its own. Its last result is ``L``'s xid. It is sent
    in the simple protocol, every value quoted by psycopg (``sql.Literal``).
    ``session_settings``: the session already runs with :func:`log_session_options`
    (a dedicated log connection), so the two ``SET LOCAL`` are not needed.
    """
    parts: list[sql.Composable] = []
    if begin:
        parts.append(sql.SQL("BEGIN"))
    if not session_settings:
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


def log_session_options(dsn: str, idle_timeout: float) -> str:
    """libpq ``options`` for a dedicated log connection: the settings every decision
    needs, for the whole session (it runs nothing else), after the DSN's own."""
    return session_options(
        dsn,
        {"synchronous_commit": "on",
         "idle_in_transaction_session_timeout": str(_timeout_ms(idle_timeout))},
    )


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
    rows = conn.execute(
        "SELECT x, CASE WHEN s = 'committed' AND EXISTS ("
        "  SELECT 1 FROM pg_locks l WHERE l.locktype = 'transactionid'"
        "  AND l.transactionid::text = (x %% 4294967296)::text)"
        " THEN 'in progress' ELSE s END "
        "FROM (SELECT x, pg_xact_status(x::text::xid8) AS s "
        "      FROM unnest(%s::bigint[]) AS x) AS q",
        (ids,),
    ).fetchall()
    _reset(conn)
    return {int(r[0]): r[1] for r in rows}


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
    rows = conn.execute(
        "SELECT txid FROM txmgr_decision WHERE txid = ANY(%s)", (wanted,)
    ).fetchall()
    _reset(conn)
    return {r[0] for r in rows}


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
    rows = conn.execute(
        "SELECT txid, lxid::text, participants, created_at FROM txmgr_decision ORDER BY created_at"
    ).fetchall()
    _reset(conn)
    return [DecisionRow(r[0], int(r[1]), tuple(r[2]), r[3]) for r in rows]


def delete_decisions(conn: psycopg.Connection[Any], txids: Sequence[str]) -> int:
    """Delete the rows of ``txids``; returns how many existed."""
    if not txids:
        return 0
    cur = conn.execute("DELETE FROM txmgr_decision WHERE txid = ANY(%s)", (list(txids),))
    n = cur.rowcount
    if not conn.autocommit:
        conn.commit()
    return n


def _reset(conn: psycopg.Connection[Any]) -> None:
    # Reads on a non-autocommit connection leave a transaction open; end it so
    # that a pooled log connection never idles in a transaction.
    if not conn.autocommit and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()

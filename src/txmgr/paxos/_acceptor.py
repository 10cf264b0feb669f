"""The acceptor in SQL: each rule of :class:`~txmgr.paxos._core.AcceptorRules` as one statement.

A slot is a row of ``txmgr_paxos``; every change is a single conditional
``INSERT``/``UPDATE``/``DELETE`` whose ``WHERE`` is the rule's condition, run in
autocommit mode, so PostgreSQL's row lock (and its re-check of the condition
on the newest row version, when two proposers race) makes it atomic:

- register: ``INSERT … ON CONFLICT (txid) DO NOTHING`` — committed with
  ``synchronous_commit = off`` (see the core's safety argument);
- promise (phase 1, b): ``UPDATE … SET promised = b WHERE txid = T AND promised < b``;
- accept (phase 2, b, v): ``UPDATE … SET promised = b, accepted = (b, v)
  WHERE txid = T AND promised <= b`` — also for several txids at one ballot
  (``UPDATE … FROM unnest(…)``, the same condition on each row: the
  coordinator's combined commits);
- forget: ``DELETE … WHERE txid = ANY(…) [AND accepted_value IS DISTINCT FROM 'commit']``.

Everything but registration commits with ``synchronous_commit = on`` before
the reply (``SET LOCAL`` in the same query, see :data:`_DURABLE`).
Every answer carries the acceptor's incarnation, read in the same statement,
so a reply always names the state it came from, and ``pg_is_in_recovery()``:
a standby's slots may lag behind its primary's, so its answers never count
(:func:`parse` refuses them, and the pools refuse its connections). The slot in an
"ok" answer is the row the change wrote (``RETURNING``: the values the rule
saw under the row lock); in a "rejected" answer it is the row as the
statement's snapshot saw it, which only informs the next ballot.

The statements are prepared once per session (planning them cost more than
running them; the settings of :data:`_SETTINGS` keep their generic plans to key
lookups) and executed through the simple protocol, every argument quoted by
psycopg (``sql.Literal``); registration behind a
``SET LOCAL synchronous_commit = off``.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

# Re-exported: a round returns as soon as a quorum answered; the protocol is
# safe against the stragglers' statements landing late.
from txmgr._multiplex import run_quorum
from txmgr._primary import FIX, IN_RECOVERY
from txmgr.paxos._core import ABORT, Reply, Request, Slot, Value

__all__ = [
    "PREPARE_ALL",
    "Answer",
    "Statement",
    "accept_many_query",
    "accept_query",
    "encode",
    "forget_query",
    "inline",
    "parse",
    "prepare_query",
    "query_for",
    "read_query",
    "register_many_query",
    "register_query",
    "run_quorum",
    "scan_query",
]

# Every answer: one row per txid asked about, these columns.
_SLOT = "txid, promised, accepted_ballot, accepted_value, participants, created_at"


def _one(change: str, absent: str, *, before: str = "") -> str:
    """A change of slot $1, answered ok (changed) / rejected (kept) / ``absent`` (none);
    ``before``: another common table expression to run along."""
    def col(c: str) -> str:
        return f"CASE WHEN ch.txid IS NOT NULL THEN ch.{c} ELSE p.{c} END"

    return (
        f"WITH {before}ch AS ({change} RETURNING {_SLOT}) "
        "SELECT a.incarnation, $1, CASE WHEN ch.txid IS NOT NULL THEN 'ok' "
        f"WHEN p.txid IS NOT NULL THEN 'rejected' ELSE '{absent}' END, "
        f"({col('promised')})::text, ({col('accepted_ballot')})::text, {col('accepted_value')}, "
        f"array_to_string({col('participants')}, ','), "
        f"extract(epoch FROM now() - {col('created_at')})::float8, NULL::boolean, "
        f"{IN_RECOVERY} "
        # p: the slot as the snapshot saw it, read only when nothing changed
        "FROM txmgr_paxos_acceptor a LEFT JOIN ch ON true "
        "LEFT JOIN txmgr_paxos p ON p.txid = $1 AND ch.txid IS NULL"
    )



def _rows(alive: str = "NULL::boolean") -> str:
    """The columns of every answer's rows, from the subquery ``s``; ``alive``: is the
    slot's coordinator alive (see :data:`_BEACONS`), NULL where not asked."""
    return ("a.incarnation, s.txid, coalesce(s.status, 'gone'), s.promised::text, "
            "s.accepted_ballot::text, s.accepted_value, array_to_string(s.participants, ','), "
            f"extract(epoch FROM now() - s.created_at)::float8, {alive}, {IN_RECOVERY}")


_ROWS = _rows()

# The liveness locks held in this database: a coordinator's process holds its
# key (pg_advisory_xact_lock(bigint): classid the high half, objid the low half,
# objsubid 1) inside a transaction that lives as long as the process
# (txmgr.paxos._beacon). Read once per statement (a hashed subplan), not per row.
_BEACONS = (
    "beacons AS MATERIALIZED (SELECT (l.classid::bigint << 32) | l.objid::bigint AS key "
    " FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted "
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) "
)
# NULL: the slot records no coordinator (registered before revision 0004) or is gone.
_ALIVE = ("CASE WHEN s.coordinator IS NULL THEN NULL "
          "ELSE s.coordinator IN (SELECT key FROM beacons) END")


def _many(change: str, absent: str, *, before: str = "", table: str = "") -> str:
    """:func:`_one` for the slots of the txids of the array $1, a row each;
    ``table``: the alias ``change`` gives txmgr_paxos (its RETURNING names it)."""
    columns = _SLOT.split(", ")
    returning = ", ".join(f"{table}.{c}" if table else c for c in columns)
    kept = ", ".join(f"coalesce(ch.{c}, p.{c}) AS {c}" for c in columns[1:])
    return (
        f"WITH {before}ch AS ({change} RETURNING {returning}) "
        f"SELECT {_ROWS} FROM txmgr_paxos_acceptor a CROSS JOIN ("
        " SELECT t.txid, CASE WHEN ch.txid IS NOT NULL THEN 'ok' "
        f"  WHEN p.txid IS NOT NULL THEN 'rejected' ELSE '{absent}' END AS status, {kept} "
        " FROM unnest($1) AS t(txid) LEFT JOIN ch ON ch.txid = t.txid "
        # p: the slot as the snapshot saw it, read only when nothing changed
        " LEFT JOIN txmgr_paxos p ON p.txid = t.txid AND ch.txid IS NULL) s"
    )


#: name -> (argument types, statement)
STATEMENTS: dict[str, tuple[str, str]] = {
    # $2: the key of the registering process's liveness lock (see _BEACONS).
    "txmgr_paxos_register": ("text, bigint", _one(
        "INSERT INTO txmgr_paxos (txid, coordinator) VALUES ($1, $2) "
        "ON CONFLICT (txid) DO NOTHING",
        "rejected")),
    # Many slots at once (the coordinator registers ahead, see PaxosLog.take):
    # "ok" for each one created, "rejected" for one that existed.
    "txmgr_paxos_register_many": ("text[], bigint", _many(
        "INSERT INTO txmgr_paxos (txid, coordinator) SELECT unnest($1), $2 "
        "ON CONFLICT (txid) DO NOTHING",
        "rejected")),
    "txmgr_paxos_promise": ("text, bigint", _one(
        "UPDATE txmgr_paxos SET promised = $2 WHERE txid = $1 AND promised < $2", "gone")),
    # $5: finished transactions whose slots go in the same statement (the
    # coordinator's cleanup rides on its next decision, like the default log's).
    "txmgr_paxos_accept": ("text, bigint, text, text[], text[]", _one(
        "UPDATE txmgr_paxos SET promised = $2, accepted_ballot = $2, accepted_value = $3, "
        "participants = $4 WHERE txid = $1 AND promised <= $2", "gone",
        before="gone AS (DELETE FROM txmgr_paxos WHERE txid = ANY($5) AND txid <> $1), ")),
    # Phase 2 for many txids at one ballot (the ballot-0 commits of concurrent
    # transactions, combined: see PaxosLog): each row follows the accept rule
    # on its own, as if the statements had run one after the other. $3/$4:
    # each txid's value and participants (comma-separated: participant names
    # never contain a comma).
    "txmgr_paxos_accept_many": ("text[], bigint, text[], text[], text[]", _many(
        "UPDATE txmgr_paxos s SET promised = $2, accepted_ballot = $2, "
        "accepted_value = x.kind, participants = string_to_array(x.parts, ',') "
        "FROM unnest($1, $3, $4) AS x(txid, kind, parts) "
        "WHERE s.txid = x.txid AND s.promised <= $2", "gone", table="s",
        before="gone AS (DELETE FROM txmgr_paxos WHERE txid = ANY($5) AND txid <> ALL($1)), ")),
    "txmgr_paxos_forget": ("text[], boolean, float8", (
        "WITH del AS (DELETE FROM txmgr_paxos WHERE txid = ANY($1) "
        " AND (NOT $2 OR accepted_value IS DISTINCT FROM 'commit') "
        " AND created_at <= now() - $3 * interval '1 second' RETURNING txid) "
        f"SELECT {_ROWS} FROM txmgr_paxos_acceptor a CROSS JOIN ("
        " SELECT t.txid, CASE WHEN d.txid IS NOT NULL THEN 'ok' "
        "  WHEN c.txid IS NOT NULL THEN 'rejected' END AS status, "
        "  c.promised, c.accepted_ballot, c.accepted_value, c.participants, c.created_at "
        " FROM unnest($1) AS t(txid) LEFT JOIN del d ON d.txid = t.txid "
        " LEFT JOIN txmgr_paxos c ON c.txid = t.txid AND d.txid IS NULL) s"
    )),
    # Reads (recovery, status, learners) also say whether each slot's
    # coordinator is alive; the coordinator's own statements do not pay for that.
    "txmgr_paxos_read": ("text[]", (
        f"WITH {_BEACONS}SELECT {_rows(_ALIVE)} FROM txmgr_paxos_acceptor a CROSS JOIN ("
        " SELECT t.txid, CASE WHEN p.txid IS NOT NULL THEN 'ok' END AS status, "
        "  p.promised, p.accepted_ballot, p.accepted_value, p.participants, p.created_at, "
        "  p.coordinator "
        " FROM unnest($1) AS t(txid) LEFT JOIN txmgr_paxos p ON p.txid = t.txid) s"
    )),
    "txmgr_paxos_scan": ("", (
        f"WITH {_BEACONS}SELECT {_rows(_ALIVE)} FROM txmgr_paxos_acceptor a LEFT JOIN ("
        f" SELECT 'ok' AS status, {_SLOT}, coordinator FROM txmgr_paxos) s ON true "
        "ORDER BY s.created_at"
    )),
}

#: Prepares every statement, ahead of the first one a session executes.
PREPARE_ALL = "".join(
    f"PREPARE {name}{f'({types})' if types else ''} AS {text}; "
    for name, (types, text) in STATEMENTS.items()
).encode()

# Sessions that have prepared the statements (the first query of each prepares them).
_prepared: weakref.WeakKeyDictionary[psycopg.BaseConnection[Any], bool] = (
    weakref.WeakKeyDictionary())
_prepared_lock = threading.Lock()


#: What every statement runs with, set inside its own implicit transaction (the
#: statements go in the simple protocol, so ``SET LOCAL`` and the statement are
#: one query, one round trip): whatever a pooler dropped or a role or database
#: default says, a durable change commits with ``synchronous_commit = on``
#: before it counts as a reply; a stuck row lock fails the statement after 10 s
#: instead of hanging the round. The planner settings keep the prepared
#: statements' generic plans to key lookups: with the statistics of a small
#: table a generic plan scans it whole, and it grows with dead rows between
#: vacuums (no sequential scans, nested loops over the txid arrays; no JIT,
#: which the disabled plans' costs would trigger).
_SETTINGS = (
    "SET LOCAL lock_timeout = '10s'; SET LOCAL plan_cache_mode = force_generic_plan; "
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; "
    "SET LOCAL enable_mergejoin = off; SET LOCAL jit = off; "
)
_DURABLE = _SETTINGS + "SET LOCAL synchronous_commit = on; "
_ASYNC = _SETTINGS + "SET LOCAL synchronous_commit = off; "


class Statement(sql.Composable):
    """One acceptor statement with its arguments, composed for the connection it goes to.

    On a connection that may prepare statements: ``EXECUTE name(args)`` (see
    :func:`encode`). On one that may not — through a pooler (PgBouncer), a
    session prepared by one client may serve another, and a statement prepared
    in one server session is missing in the next — the statement's text itself,
    each ``$n`` replaced by its quoted argument cast to the declared type.
    Either way behind the ``SET LOCAL`` settings, in one simple-protocol query.
    """

    def __init__(self, name: str, args: tuple[object, ...], *, durable: bool) -> None:
        super().__init__((name, args, durable))
        self.name, self.args, self.durable = name, args, durable

    def as_bytes(self, context: Any = None) -> bytes:
        head = sql.SQL(_DURABLE if self.durable else _ASYNC)
        if not inline(context):
            body: sql.Composable = sql.SQL("EXECUTE {}{}").format(
                sql.Identifier(self.name),
                sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Literal, self.args)))
                if self.args else sql.SQL(""),
            )
            return (head + body).as_bytes(context)
        types, text = STATEMENTS[self.name]
        kinds = [t.strip() for t in types.split(",")] if types else []
        values = [
            sql.SQL("({}::{})").format(sql.Literal(a), sql.SQL(k)).as_string(context)
            for a, k in zip(self.args, kinds, strict=True)
        ]
        # The statements' texts hold no "$" but their placeholders (no dollar
        # quoting, no strings with "$"): a plain substitution is exact.
        inlined = re.sub(r"\$(\d+)", lambda m: values[int(m[1]) - 1], text)
        return head.as_bytes(context) + inlined.encode(conn_encoding(context))


def inline(conn: Any) -> bool:
    """Whether statements go to ``conn`` as text rather than as prepared statements:
    when its ``prepare_threshold`` is None (a connection through a pooler; see
    :mod:`txmgr._pooler`)."""
    return conn is not None and getattr(conn, "prepare_threshold", 0) is None


def conn_encoding(conn: Any) -> str:
    return str(conn.info.encoding) if conn is not None else "utf-8"


def _execute(name: str, *args: object, durable: bool = True) -> Statement:
    # Only registration commits asynchronously (see register_query).
    return Statement(name, args, durable=durable)


def encode(conn: psycopg.BaseConnection[Any], body: bytes) -> bytes:
    """A query (composed for ``conn``) as sent on ``conn``: on its first use, behind the
    PREPAREs. A session whose query failed is closed, so it never half-prepared."""
    if inline(conn):
        return body  # the statement's text, nothing to prepare
    with _prepared_lock:
        if conn in _prepared:
            return body
        _prepared[conn] = True
    return PREPARE_ALL + body


def register_query(txid: str, coordinator: int | None = None) -> Statement:
    """Create T's slot (promised 0, nothing accepted) unless it exists, recording
    ``coordinator``, the key of the registering process's liveness lock (None:
    no liveness sign, recovery falls back to its grace period for T).

    Asynchronous commit: a registration lost in a crash only makes this
    acceptor "gone" for T, and the first durable statement flushes it anyway.
    """
    return _execute("txmgr_paxos_register", txid, coordinator, durable=False)


def register_many_query(txids: Sequence[str], coordinator: int | None = None) -> Statement:
    """:func:`register_query` for many txids in one statement (same rule, same commit)."""
    return _execute("txmgr_paxos_register_many", list(txids), coordinator, durable=False)


def prepare_query(txid: str, ballot: int) -> Statement:
    """Phase 1: promise ``ballot`` if it is higher than any promise so far."""
    return _execute("txmgr_paxos_promise", txid, ballot)


def accept_query(
    txid: str, ballot: int, value: Value, *, forget: Sequence[str] = ()
) -> Statement:
    """Phase 2: accept ``value`` at ``ballot`` unless a higher ballot was promised;
    ``forget``: finished transactions whose slots the same statement deletes."""
    participants = list(value.participants) if value.kind == "commit" else None
    return _execute("txmgr_paxos_accept", txid, ballot, value.kind, participants, list(forget))


def accept_many_query(
    accepts: Sequence[tuple[str, Value]], ballot: int, *, forget: Sequence[str] = ()
) -> Statement:
    """:func:`accept_query` for several ``(txid, value)`` at one ballot, in one
    statement (the same rule for each txid, and one commit for all)."""
    return _execute(
        "txmgr_paxos_accept_many", [t for t, _ in accepts], ballot,
        [v.kind for _, v in accepts],
        [",".join(v.participants) if v.kind == "commit" else None for _, v in accepts],
        list(forget),
    )


def forget_query(
    txids: Sequence[str], *, keep_commit: bool, min_age: float = 0.0
) -> Statement:
    """Delete the slots of ``txids`` (with ``keep_commit``: not those holding a commit;
    with ``min_age``: only those created at least that many seconds ago)."""
    return _execute("txmgr_paxos_forget", list(txids), keep_commit, float(min_age))


def read_query(txids: Sequence[str]) -> Statement:
    """The slots of ``txids`` (``gone`` where there is none); changes nothing."""
    return _execute("txmgr_paxos_read", list(txids))


def scan_query() -> Statement:
    """Every slot of this acceptor (one row with a NULL txid when there is none)."""
    return _execute("txmgr_paxos_scan")


def query_for(request: Request, *, forget: Sequence[str] = ()) -> Statement:
    """The statement for one proposer request (see :class:`~txmgr.paxos._core.Request`)."""
    if request.op == "read":
        return read_query([request.txid])
    if request.op == "prepare":
        return prepare_query(request.txid, request.ballot)
    if request.op == "accept":
        assert request.value is not None
        return accept_query(request.txid, request.ballot, request.value, forget=forget)
    if request.op == "forget":
        return forget_query([request.txid], keep_commit=request.keep_commit)
    raise ValueError(f"no statement for a {request.op!r} request")


@dataclass(frozen=True, slots=True)
class Answer:
    """One acceptor's answer: its incarnation, and per txid the reply and the slot's
    age; reads also say per txid whether its coordinator is alive (``alive``:
    True/False, absent where the slot records no coordinator)."""

    incarnation: str
    replies: dict[str, Reply]
    ages: dict[str, float]
    alive: dict[str, bool] = field(default_factory=dict)


def parse(rows: Sequence[tuple[str | None, ...]] | None) -> Answer:
    """Turn the rows of any query above into an :class:`Answer`."""
    if not rows:
        raise ValueError("the acceptor returned no row: its txmgr_paxos_acceptor row is missing")
    incarnation = rows[0][0]
    if incarnation is None:
        raise ValueError("the acceptor has no incarnation")
    if rows[0][9] not in (False, "f", "false"):
        # A standby's slots may lag behind its primary's (a promise or an accept it
        # has not replayed): it answers as an acceptor that is down, with the fix.
        raise ValueError(f"a hot standby (pg_is_in_recovery() is true): its slots may lag "
                         f"behind its primary's, so it never counts as an acceptor; {FIX}")
    replies: dict[str, Reply] = {}
    ages: dict[str, float] = {}
    alive: dict[str, bool] = {}
    for _, txid, status, promised, ab, av, parts, age, live, _ in rows:
        if txid is None:  # scan of an empty table
            continue
        if live is not None:  # text values: 't' / 'f'
            alive[txid] = live in ("t", "true", True)
        slot = None
        if promised is not None:
            value = None
            if av is not None:
                value = Value("commit", tuple((parts or "").split(","))) if av == "commit" \
                    else ABORT
            slot = Slot(int(promised), int(ab) if ab is not None else None, value)
            ages[txid] = float(age) if age is not None else 0.0
        if status == "ok":
            replies[txid] = Reply("ok", slot)  # no slot: a forget deleted it
        elif status == "rejected":
            replies[txid] = Reply("rejected", slot)
        elif status == "gone":
            replies[txid] = Reply("gone")
        else:
            raise ValueError(f"unexpected acceptor status {status!r}")
    return Answer(incarnation, replies, ages, alive)

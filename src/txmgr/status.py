"""What is in doubt: every prepared branch on every participant, and what the log says of it.

Used by ``txmgr status`` (a table for people, JSON for scripts, an exit code
for monitoring) and by the daemon's metrics. It only reads; nothing here
commits or rolls back anything.

For each participant, in its own database, every row of ``pg_prepared_xacts``
is reported — not only txmgr's, because any forgotten prepared transaction
holds locks and holds back VACUUM — with:

- ``decision``: what finishing it would mean according to the decision log:
  ``commit`` or ``abort`` (recovery will do it on its next pass), ``in
  progress`` (a coordinator is inside the commit protocol), ``not ours`` (not
  a txmgr gid, or one of another log: only ``txmgr resolve --force`` finishes
  it), ``unknown`` (the log is unreachable, or cannot tell).
- ``locks``: how many locks it holds, and ``blocked_pids``: the sessions
  waiting on one of them right now.

The verdict follows recovery: ``pg_xact_status(lxid)`` only tells whether
the decision transaction is still running; once it is not, the decision row —
read in a later statement — decides (present: commit, absent: abort).

In Paxos mode the verdict on a ``txp1_`` branch is what
:meth:`~txmgr.paxos.PaxosLog.learn` reads from the log databases (``commit``,
``abort`` — a forgotten transaction is rolled back too — or ``undecided``:
no majority has decided yet, recovery decides after the coordinator's grace),
and :attr:`StatusReport.paxos` shows, per in-doubt transaction, what each log
database promised and accepted. Gids of the single-database mode are ``not
ours`` there. A Paxos look reads every slot once and learns once: two rounds
over the log databases, whatever the number of branches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg

from txmgr import log as decision_log
from txmgr._connections import LOG_KEY, ConnectionCache
from txmgr._dsn import redact
from txmgr._gid import Gid
from txmgr._primary import require_primary
from txmgr._waitgraph import Backend, Wait, WaitGraph
from txmgr.config import Config
from txmgr.deadlock import read_backends
from txmgr.errors import TxmgrError
from txmgr.paxos._core import Outcome as PaxosOutcome
from txmgr.paxos._gid import PaxosGid
from txmgr.paxos._log import AcceptorStatus, PaxosLog

__all__ = [
    "AcceptorView",
    "BranchStatus",
    "Decision",
    "Inspector",
    "PaxosTransaction",
    "PendingDecision",
    "StatusReport",
    "classify",
    "inspect",
]

Decision = Literal["commit", "abort", "in progress", "undecided", "not ours", "unknown"]

#: Lock modes that conflict, from the table "Conflicting Lock Modes" of the
#: PostgreSQL manual (the relation is symmetric; advisory locks use it too).
_CONFLICTS: dict[str, tuple[str, ...]] = {
    "AccessShareLock": ("AccessExclusiveLock",),
    "RowShareLock": ("ExclusiveLock", "AccessExclusiveLock"),
    "RowExclusiveLock": (
        "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
    ),
    "ShareUpdateExclusiveLock": (
        "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock",
        "AccessExclusiveLock",
    ),
    "ShareLock": (
        "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareRowExclusiveLock",
        "ExclusiveLock", "AccessExclusiveLock",
    ),
    "ShareRowExclusiveLock": (
        "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
        "ExclusiveLock", "AccessExclusiveLock",
    ),
    "ExclusiveLock": (
        "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
        "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
    ),
    "AccessExclusiveLock": (
        "AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
        "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
    ),
}  # fmt: skip
_HELD = [held for held, wanted in _CONFLICTS.items() for _ in wanted]
_WANTED = [w for wanted in _CONFLICTS.values() for w in wanted]

# A prepared transaction keeps its locks under a dummy process: pid is NULL.
# Its virtual transaction id is found through the ExclusiveLock every
# transaction holds on its own xid (the text of that vxid differs between
# server versions, so it is looked up rather than spelled out). A session is
# blocked by it when it waits (granted = false) for a lock on the same object
# in a mode that conflicts with a mode the prepared transaction holds.
_BRANCHES_SQL = """
WITH locks AS MATERIALIZED (SELECT * FROM pg_locks),
conflicts (held, wanted) AS (SELECT * FROM unnest(%(held)s::text[], %(wanted)s::text[])),
px AS (
    SELECT p.gid, p.prepared, p.owner, age(p.transaction) AS xid_age,
           extract(epoch FROM clock_timestamp() - p.prepared)::float8 AS age,
           (SELECT l.virtualtransaction FROM locks l
             WHERE l.locktype = 'transactionid' AND l.transactionid = p.transaction
               AND l.pid IS NULL AND l.granted
             LIMIT 1) AS vxid
    FROM pg_prepared_xacts p
    WHERE p.database = current_database()
),
held AS (
    SELECT px.gid, l.*
    FROM px JOIN locks l ON l.virtualtransaction = px.vxid AND l.pid IS NULL AND l.granted
)
SELECT px.gid, px.prepared, px.owner, px.age, px.xid_age,
       (SELECT count(*) FROM held h WHERE h.gid = px.gid) AS locks,
       ARRAY(
           SELECT DISTINCT w.pid
           FROM held h
           JOIN locks w
             ON NOT w.granted AND w.pid IS NOT NULL
            AND w.locktype = h.locktype
            AND w.database IS NOT DISTINCT FROM h.database
            AND w.relation IS NOT DISTINCT FROM h.relation
            AND w.page IS NOT DISTINCT FROM h.page
            AND w.tuple IS NOT DISTINCT FROM h.tuple
            AND w.virtualxid IS NOT DISTINCT FROM h.virtualxid
            AND w.transactionid IS NOT DISTINCT FROM h.transactionid
            AND w.classid IS NOT DISTINCT FROM h.classid
            AND w.objid IS NOT DISTINCT FROM h.objid
            AND w.objsubid IS NOT DISTINCT FROM h.objsubid
           JOIN conflicts c ON c.held = h.mode AND c.wanted = w.mode
           WHERE h.gid = px.gid
           ORDER BY w.pid
       ) AS blocked,
       one.in_recovery
FROM (SELECT pg_is_in_recovery() AS in_recovery) AS one LEFT JOIN px ON true
ORDER BY px.prepared, px.gid
"""  # the last column: see txmgr._primary (the row of `one` is there when nothing is)


@dataclass(frozen=True, slots=True)
class BranchStatus:
    """One prepared transaction on one participant."""

    participant: str
    gid: str
    prepared_at: datetime
    age: float  # seconds since PREPARE, by the participant server's clock
    owner: str  # the role that prepared it: only it or a superuser can finish it
    decision: Decision
    txid: str | None  # the global transaction, for txmgr gids of this log
    locks: int
    blocked_pids: tuple[int, ...]
    xid_age: int  # age(xid): how far it holds back VACUUM's freeze horizon
    detail: str = ""

    @property
    def blocks(self) -> bool:
        """Whether another session is waiting on one of its locks right now."""
        return bool(self.blocked_pids)

    def to_json(self) -> dict[str, Any]:
        """This branch as one object of ``txmgr status --json``."""
        out = asdict(self)
        out["prepared_at"] = self.prepared_at.isoformat()
        out["blocked_pids"] = list(self.blocked_pids)
        out["blocks"] = self.blocks
        return out


@dataclass(frozen=True, slots=True)
class PendingDecision(decision_log.DecisionRow):
    """A decision row not cleaned up yet (some branch may still be prepared)."""

    age: float  # seconds since the decision was made

    def to_json(self) -> dict[str, Any]:
        """This row as one object of ``pending_decisions`` in ``txmgr status --json``."""
        out = asdict(self)
        out["created_at"] = self.created_at.isoformat()
        out["participants"] = list(self.participants)
        return out


@dataclass(frozen=True, slots=True)
class AcceptorView:
    """What one Paxos log database holds for one in-doubt transaction."""

    dsn: str  # masked
    incarnation: str | None
    voter: bool  # registered the transaction (named by its gids)
    error: str | None  # why it did not answer, if it did not
    has_slot: bool = False
    promised: int | None = None
    accepted_ballot: int | None = None
    accepted_value: str | None = None  # "commit(a,b)" or "abort"

    def to_json(self) -> dict[str, Any]:
        """This acceptor as one object of a transaction's ``acceptors``."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PaxosTransaction:
    """An in-doubt transaction of Paxos mode: what was learned, and each acceptor's slot."""

    txid: str
    learned: str  # commit, abort, forgotten, undecided; unknown when the log failed
    detail: str
    quorum: int
    voters: tuple[str, ...]  # incarnations
    acceptors: tuple[AcceptorView, ...]

    def to_json(self) -> dict[str, Any]:
        """This transaction as one object of ``paxos.transactions`` in ``--json``."""
        return {
            "txid": self.txid,
            "learned": self.learned,
            "detail": self.detail,
            "quorum": self.quorum,
            "voters": list(self.voters),
            "acceptors": [a.to_json() for a in self.acceptors],
        }


@dataclass(slots=True)
class StatusReport:
    """Everything ``txmgr status`` shows."""

    branches: list[BranchStatus] = field(default_factory=list)
    pending: list[PendingDecision] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # participant -> error
    log_error: str | None = None  # why the log could not be read, if it could not
    logid: str | None = None
    mode: Literal["single", "paxos"] = "single"
    #: Paxos mode: the in-doubt transactions, and every log database's slot count.
    paxos: list[PaxosTransaction] = field(default_factory=list)
    acceptor_slots: dict[str, int | None] = field(default_factory=dict)  # dsn -> slots
    #: Who waits for whom on every participant (global transactions by txid).
    waits: list[Wait] = field(default_factory=list)

    @property
    def log_reachable(self) -> bool:
        """Whether the decision log could be read."""
        return self.log_error is None

    def stuck(self, older_than: float) -> list[BranchStatus]:
        """Branches prepared longer than ``older_than`` seconds ago."""
        return [b for b in self.branches if b.age > older_than]

    def healthy(self, older_than: float) -> bool:
        """No branch older than ``older_than`` and every server answered."""
        return not self.stuck(older_than) and not self.unreachable and self.log_reachable

    def to_json(self, older_than: float) -> dict[str, Any]:
        """The document ``txmgr status --json --older-than SECONDS`` prints."""
        out: dict[str, Any] = {
            "ok": self.healthy(older_than),
            "mode": self.mode,
            "older_than": older_than,
            "logid": self.logid,
            "log_error": self.log_error,
            "unreachable": dict(self.unreachable),
            "stuck": len(self.stuck(older_than)),
            "branches": [b.to_json() for b in self.branches],
            "pending_decisions": [p.to_json() for p in self.pending],
            "waits": [w.to_json() for w in self.waits],
        }
        if self.mode == "paxos":
            out["paxos"] = {
                "acceptors": dict(self.acceptor_slots),
                "transactions": [t.to_json() for t in self.paxos],
            }
        return out


def classify(
    gid: str,
    logid: str | None,
    statuses: Mapping[int, decision_log.XactStatus],
    committed: Iterable[str],
) -> tuple[Decision, str | None, str]:
    """The log's verdict on ``gid``: (decision, txid, explanation).

    ``logid`` is None when the log could not be read; ``statuses`` maps lxids
    to :func:`txmgr.log.xact_status` (a missing lxid: not asked, "unknown");
    ``committed`` are the txids whose decision row was read after their
    decision transaction was seen finished.
    """
    parsed = Gid.parse(gid)
    if parsed is None:
        return "not ours", None, "not a txmgr gid"
    if logid is None:
        return "unknown", parsed.txid, "the decision log is unreachable"
    if parsed.logid != logid:
        return (
            "not ours",
            parsed.txid,
            f"belongs to another decision log (logid {parsed.logid}, this log is {logid})",
        )
    if parsed.lxid not in statuses:
        return "unknown", parsed.txid, "the decision log was not asked (it failed meanwhile)"
    if statuses[parsed.lxid] == "in progress":
        return "in progress", parsed.txid, "its coordinator is inside the commit protocol"
    if parsed.txid in set(committed):
        return "commit", parsed.txid, "decision row present"
    return "abort", parsed.txid, "no decision row (presumed abort)"


def inspect(config: Config) -> StatusReport:
    """One look at every participant and the log (connections closed afterwards)."""
    inspector = Inspector(config)
    try:
        return inspector.inspect()
    finally:
        inspector.close()


class Inspector:
    """Builds :class:`StatusReport` s, keeping its connections between calls (for the daemon)."""

    def __init__(self, config: Config, *, application_name: str = "txmgr-status") -> None:
        self.config = config
        self._application_name = application_name
        self._conns = ConnectionCache(
            connect_timeout=config.connect_timeout, application_name=application_name,
            prepare_threshold=config.prepare_threshold,
        )

    def close(self) -> None:
        """Close every connection kept between looks."""
        self._conns.close()

    def _conn(self, key: str, dsn: str, name: str) -> psycopg.Connection[Any]:
        return self._conns.get(key, dsn, name)

    def _drop(self, key: str) -> None:
        self._conns.drop(key)

    def inspect(self) -> StatusReport:
        """Look at every participant and the log now; servers that do not answer are
        reported in the result, not raised."""
        paxos = self.config.paxos_log
        report = self._inspect_paxos(paxos) if paxos is not None else self._inspect_single()
        report.waits = self._waits(report)
        return report

    def _waits(self, report: StatusReport) -> list[Wait]:
        """The lock waits of every participant that answered (see txmgr.deadlock)."""
        backends: list[Backend] = []
        for name, dsn in self.config.participants.items():
            if name in report.unreachable:
                continue
            try:
                backends += read_backends(self._conn(name, dsn, name), name)
            except (psycopg.Error, TxmgrError) as e:
                self._drop(name)
                report.unreachable[name] = redact(str(e))
        return WaitGraph(backends).waits

    def _inspect_single(self) -> StatusReport:
        report = StatusReport()
        rows: list[decision_log.DecisionRow] = []
        lconn: psycopg.Connection[Any] | None = None
        try:
            lconn = self._conn(LOG_KEY, self.config.log_dsn, self.config.log_participant or "log")
            report.logid = decision_log.read_logid(lconn, self.config.log_dsn)
            rows = decision_log.decision_rows(lconn)
        except (psycopg.Error, TxmgrError) as e:
            self._drop(LOG_KEY)
            lconn = None
            report.logid = None
            report.log_error = redact(str(e))
        now = datetime.now(UTC)
        report.pending = [
            PendingDecision(
                r.txid, r.lxid, r.participants, r.created_at,
                max(0.0, (now - r.created_at).total_seconds()),
            )
            for r in rows
        ]  # fmt: skip
        listed = self._list(report)
        statuses, committed = self._decisions(lconn, report, [row[0] for _, row in listed])
        for name, row in listed:
            verdict = classify(row[0], report.logid, statuses, committed)
            report.branches.append(_branch(name, row, verdict))
        return report

    def _list(self, report: StatusReport) -> list[tuple[str, tuple[Any, ...]]]:
        """Every prepared transaction of every participant that answers."""
        listed: list[tuple[str, tuple[Any, ...]]] = []
        for name, dsn in self.config.participants.items():
            try:
                conn = self._conn(name, dsn, name)
                rows = conn.execute(_BRANCHES_SQL, {"held": _HELD, "wanted": _WANTED}).fetchall()
                require_primary(rows[0][-1], f"participant {name!r}", name, conn.info.dsn)
                listed.extend((name, row[:-1]) for row in rows if row[0] is not None)
            except (psycopg.Error, TxmgrError) as e:
                self._drop(name)
                report.unreachable[name] = redact(str(e))
        return listed

    def _inspect_paxos(self, log: PaxosLog) -> StatusReport:
        """:meth:`inspect` in Paxos mode (see the module docstring)."""
        report = StatusReport(mode="paxos")
        listed = self._list(report)
        found: dict[str, PaxosGid] = {}
        for _, row in listed:
            gid = PaxosGid.parse(row[0])
            if gid is not None:
                found.setdefault(gid.txid, gid)
        statuses: list[AcceptorStatus] = []
        outcomes: dict[str, PaxosOutcome] = {}
        try:
            statuses = log.slots()  # every slot: the per-acceptor view and slot counts
            reached = [st for st in statuses if st.error is None]
            if len(reached) < log.quorum:
                report.log_error = (
                    f"only {len(reached)} of {len(statuses)} Paxos log databases answered, "
                    f"{log.quorum} are needed: "
                    + "; ".join(f"{st.dsn}: {st.error}" for st in statuses if st.error)
                )
            outcomes = log.learn({t: g.voters for t, g in found.items()})
        except TxmgrError as e:
            report.log_error = redact(str(e))
        report.acceptor_slots = {
            st.dsn: None if st.error is not None else len(st.slots) for st in statuses
        }
        for txid, gid in sorted(found.items()):
            out = outcomes.get(txid)
            report.paxos.append(PaxosTransaction(
                txid=txid,
                learned=out.decision if out is not None else "unknown",
                detail=out.detail if out is not None else "the Paxos log did not answer",
                quorum=gid.voters.quorum,
                voters=gid.voters.incarnations,
                acceptors=tuple(_view(st, txid, gid) for st in statuses),
            ))  # fmt: skip
        for name, row in listed:
            report.branches.append(_branch(name, row, _classify_paxos(row[0], outcomes)))
        return report

    def _decisions(
        self, lconn: psycopg.Connection[Any] | None, report: StatusReport, gids: list[str]
    ) -> tuple[dict[int, decision_log.XactStatus], set[str]]:
        """(xact status by lxid, committed txids) of this log's gids; empty without a log."""
        if lconn is None or report.logid is None:
            return {}, set()
        ours = [g for g in map(Gid.parse, gids) if g is not None and g.logid == report.logid]
        try:
            return decision_log.read_decisions(lconn, [(g.lxid, g.txid) for g in ours])
        except psycopg.Error as e:
            self._drop(LOG_KEY)
            report.log_error = redact(str(e))
            report.logid = None
            return {}, set()


def _branch(name: str, row: tuple[Any, ...],
            verdict: tuple[Decision, str | None, str]) -> BranchStatus:
    gid, prepared, owner, age, xid_age, locks, blocked = row
    decision, txid, detail = verdict
    return BranchStatus(
        participant=name,
        gid=gid,
        prepared_at=prepared,
        age=max(0.0, float(age)),
        owner=owner,
        decision=decision,
        txid=txid,
        locks=int(locks),
        blocked_pids=tuple(int(p) for p in blocked),
        xid_age=int(xid_age),
        detail=detail,
    )


def _classify_paxos(
    gid: str, outcomes: Mapping[str, PaxosOutcome]
) -> tuple[Decision, str | None, str]:
    """The Paxos log's verdict on ``gid``: (decision, txid, explanation)."""
    parsed = PaxosGid.parse(gid)
    if parsed is None:
        single = Gid.parse(gid)
        if single is not None:
            return ("not ours", single.txid,
                    "a gid of the single-database log mode; this configuration uses a Paxos log")
        return "not ours", None, "not a txmgr gid"
    out = outcomes.get(parsed.txid)
    if out is None:
        return "unknown", parsed.txid, "the Paxos log could not be read"
    if out.decision == "commit":
        return "commit", parsed.txid, f"commit chosen at ballot {out.ballot}"
    if out.decision == "abort":
        return "abort", parsed.txid, f"abort chosen at ballot {out.ballot}"
    if out.decision == "forgotten":
        # Commit can never be chosen any more: recovery rolls it back.
        return "abort", parsed.txid, f"forgotten: {out.detail}" if out.detail else "forgotten"
    return "undecided", parsed.txid, out.detail or "not decided yet"


def _view(st: AcceptorStatus, txid: str, gid: PaxosGid) -> AcceptorView:
    slot = st.slots.get(txid)
    return AcceptorView(
        dsn=st.dsn,
        incarnation=st.incarnation,
        voter=st.incarnation is not None and st.incarnation in gid.voters,
        error=st.error,
        has_slot=slot is not None,
        promised=slot.promised if slot is not None else None,
        accepted_ballot=slot.accepted_ballot if slot is not None else None,
        accepted_value=(str(slot.accepted_value)
                        if slot is not None and slot.accepted_value is not None else None),
    )

"""Recovery: finish the prepared branches that no coordinator is finishing.

One pass:

1. Read the decision rows of the log (before listing any branch: a row seen
   here was committed after all its branches were prepared, so a branch of it
   missing from a later listing is finished).
2. On every participant, in its own database, list the prepared gids of this
   log (``txm1_<logid>_``); ignore everything else.
3. Ask the log ``pg_xact_status(lxid)`` for every gid's decision transaction
   ``L``: in progress → leave the branch, a coordinator is inside the protocol.
4. For the others ``L`` is over; read their decision rows in a later
   statement: row present → ``COMMIT PREPARED``, absent → ``ROLLBACK PREPARED``.
   (The row, not the xid's status, decides: after a crash of the log server
   an xid that never reached its WAL can be reused by another transaction.)
   Steps 3 and 4 are two statements for all branches; the COMMIT/ROLLBACK
   PREPAREDs go to every participant at once, pipelined on each connection
   (:class:`_Pipeline`), each with its own answer.
5. Delete decision rows whose branches are gone from every participant.

Every step is idempotent, so concurrent passes, or a pass racing a live
coordinator, never do harm. No clock and no timeout decides anything.

In Paxos mode (``config.paxos_log``) a pass reads every slot of the log
databases, lists the ``txp1_`` gids on every participant, groups them by
transaction (each gid names its voters) and learns their outcomes; a
transaction still undecided after a grace period (its coordinator is gone)
is decided by a Paxos round of its own (abort, unless commit was accepted).
The branches are then committed or rolled back as above, and the slots of
finished transactions deleted. Here a clock only chooses *when* recovery
steps in; what is decided stays safe whatever it says.
"""

from __future__ import annotations

import logging
import selectors
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import pq, sql

from txmgr import log as decision_log
from txmgr._connections import LOG_KEY, ConnectionCache
from txmgr._dsn import redact
from txmgr._gid import Gid, log_prefix
from txmgr.config import Config
from txmgr.errors import TxmgrError
from txmgr.participant import PreparedBranch, list_prepared
from txmgr.paxos._beacon import CoordinatorState, coordinator_state, may_decide
from txmgr.paxos._core import Outcome as PaxosOutcome
from txmgr.paxos._core import Voters
from txmgr.paxos._gid import PAXOS_GID_PREFIX, PaxosGid
from txmgr.paxos._log import PaxosLog

__all__ = ["Recoverer", "RecoveryReport", "Resolution", "recover"]

logger = logging.getLogger("txmgr.recovery")

Outcome = Literal["committed", "rolled back", "in progress", "already finished", "busy", "error"]

#: The most COMMIT/ROLLBACK PREPARED statements in flight on one connection.
PIPELINE_DEPTH = 256


@dataclass(frozen=True, slots=True)
class Resolution:
    """What recovery did with one prepared branch."""

    participant: str
    gid: str
    txid: str
    outcome: Outcome
    prepared_at: datetime
    detail: str = ""


@dataclass(slots=True)
class RecoveryReport:
    """The result of one recovery pass."""

    resolutions: list[Resolution] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # participants that did not answer
    decisions_deleted: int = 0
    decisions_pending: int = 0
    # Decision records kept because they name a participant this recoverer does
    # not know (one line each: the txid and the participants missing).
    kept: list[str] = field(default_factory=list)
    log_reachable: bool = True

    def count(self, outcome: Outcome) -> int:
        """How many branches this pass left with ``outcome``."""
        return sum(1 for r in self.resolutions if r.outcome == outcome)

    @property
    def committed(self) -> int:
        """Branches this pass committed."""
        return self.count("committed")

    @property
    def rolled_back(self) -> int:
        """Branches this pass rolled back."""
        return self.count("rolled back")

    @property
    def in_progress(self) -> int:
        """Branches left alone: their coordinator is inside the protocol, or another
        session holds them right now (both are looked at again next pass)."""
        return self.count("in progress") + self.count("busy")

    @property
    def ok(self) -> bool:
        """True when every decidable branch was resolved and every server answered."""
        return not self.errors

    def summary(self) -> str:
        """One line of ``key=value`` counts, as ``txmgr recover`` prints it."""
        return (
            f"committed={self.committed} rolled_back={self.rolled_back} "
            f"in_progress={self.in_progress} already_finished={self.count('already finished')} "
            f"errors={len(self.errors)} decisions_deleted={self.decisions_deleted}"
        )


def recover(config: Config, **kwargs: Any) -> RecoveryReport:
    """Run one recovery pass over every participant of ``config``."""
    recoverer = Recoverer(config, **kwargs)
    try:
        return recoverer.run_pass()
    finally:
        recoverer.close()


class Recoverer:
    """Runs recovery passes, keeping its connections between passes (for the daemon).

    ``on_resolution`` is called for every branch committed or rolled back.
    ``paxos_grace`` (Paxos mode): seconds a registered transaction is left to
    its coordinator before recovery decides it (default: the config's
    ``log_idle_timeout``).
    """

    def __init__(
        self,
        config: Config,
        *,
        on_resolution: Callable[[Resolution], None] | None = None,
        paxos_grace: float | None = None,
    ) -> None:
        self.config = config
        self._on_resolution = on_resolution
        self.paxos_grace = config.log_idle_timeout if paxos_grace is None else paxos_grace
        self._conns = ConnectionCache(connect_timeout=config.connect_timeout,
                                      prepare_threshold=config.prepare_threshold)

    def close(self) -> None:
        """Close every connection kept between passes."""
        self._conns.close()

    def _conn(self, key: str, dsn: str) -> psycopg.Connection[Any]:
        name = (self.config.log_participant or "log") if key == LOG_KEY else key
        return self._conns.get(key, dsn, name)

    def _drop(self, key: str) -> None:
        self._conns.drop(key)

    def log_connection(self) -> psycopg.Connection[Any]:
        """The kept connection to the decision log (opened on first use)."""
        return self._conn(LOG_KEY, self.config.log_dsn)

    def run_pass(self) -> RecoveryReport:
        """One recovery pass over every participant; never raises for a server that
        is down (it is reported in the result)."""
        paxos = self.config.paxos_log
        if paxos is not None:
            return self._paxos_pass(paxos)
        report = RecoveryReport()
        try:
            lconn = self.log_connection()
            logid = decision_log.read_logid(lconn, self.config.log_dsn)
            rows = {r.txid: r for r in decision_log.decision_rows(lconn)}
        except (psycopg.Error, TxmgrError) as e:
            self._drop(LOG_KEY)
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
            return report
        listed = self._list_all(log_prefix(logid), report)
        gids = {b.gid: Gid.parse(b.gid) for branches in listed.values() for b in branches}
        ours = [g for g in gids.values() if g is not None]
        try:
            statuses, committed = decision_log.read_decisions(
                lconn, [(g.lxid, g.txid) for g in ours]
            )
        except psycopg.Error as e:
            self._drop(LOG_KEY)
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
            return report
        # Every decidable branch, in listing order; the in-progress ones are left alone.
        slots: list[Resolution | _Todo] = []
        todo: dict[str, list[_Todo]] = {}
        for name, branches in listed.items():
            for branch in branches:
                gid = gids[branch.gid]
                if gid is None:  # our prefix but not our format: not ours to touch
                    continue
                if statuses.get(gid.lxid) == "in progress":
                    slots.append(Resolution(name, branch.gid, gid.txid, "in progress",
                                            branch.prepared,
                                            "its coordinator is inside the commit protocol"))
                else:
                    item = _Todo(name, branch, gid, commit=gid.txid in committed)
                    slots.append(item)
                    todo.setdefault(name, []).append(item)
        self._finish_all(todo)
        remaining = _report(slots, report)
        self._cleanup(lconn, rows, listed, remaining, report)
        return report

    def _list_all(
        self, prefix: str, report: RecoveryReport
    ) -> dict[str, list[PreparedBranch]]:
        """The prepared gids starting with ``prefix`` on every participant that answers
        from a primary: one that does not (down, or a standby) is left out, so that
        no cleanup counts its branches as finished."""
        listed: dict[str, list[PreparedBranch]] = {}
        for name, dsn in self.config.participants.items():
            try:
                listed[name] = list_prepared(self._conn(name, dsn), prefix, name=name)
            except (psycopg.Error, TxmgrError) as e:
                self._drop(name)
                report.unreachable.append(name)
                report.errors.append(f"{name}: {redact(str(e))}")
        return listed

    def _paxos_pass(self, log: PaxosLog) -> RecoveryReport:
        """One pass in Paxos mode (see the module docstring)."""
        report = RecoveryReport()
        # The slots first: a slot seen here and no branch in the later listing
        # means its branches are finished (or were never prepared).
        try:
            statuses = log.slots()
        except TxmgrError as e:
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
            return report
        reached = [st for st in statuses if st.error is None]
        if len(reached) < log.quorum:
            report.log_reachable = False
            report.errors.append(
                f"log: only {len(reached)} of {len(statuses)} Paxos log databases answered, "
                f"{log.quorum} are needed: "
                + "; ".join(f"{st.dsn}: {st.error}" for st in statuses if st.error)
            )
        ages: dict[str, float] = {}  # txid -> seconds since its registration
        # txid -> acceptor incarnation -> its coordinator's liveness lock is held there
        alive: dict[str, dict[str, bool]] = {}
        # txids with a commit accepted somewhere, and the participants it names
        # (every commit of a txid is the coordinator's ballot-0 value: one value)
        commits: dict[str, tuple[str, ...]] = {}
        for st in reached:
            for txid, age in st.ages.items():
                ages[txid] = max(age, ages.get(txid, 0.0))
            for t, slot in st.slots.items():
                if slot.holds_commit and slot.accepted_value is not None:
                    commits[t] = slot.accepted_value.participants
            if st.incarnation is not None:
                for t, held in st.alive.items():
                    alive.setdefault(t, {})[st.incarnation] = held
        listed = self._list_all(PAXOS_GID_PREFIX, report)
        found: dict[str, Voters] = {}
        todo_gids: list[tuple[str, PreparedBranch, PaxosGid]] = []
        for name, branches in listed.items():
            for branch in branches:
                gid = PaxosGid.parse(branch.gid)
                if gid is None:  # our prefix but not our format: not ours to touch
                    continue
                found.setdefault(gid.txid, gid.voters)
                todo_gids.append((name, branch, gid))
        outcomes: dict[str, PaxosOutcome] = {}
        try:
            outcomes = log.learn(found)
            for txid, learned in outcomes.items():
                # No slot seen: registered after the scan, its coordinator is at work.
                age = ages.get(txid, 0.0)
                voters = found[txid]
                state = coordinator_state(alive.get(txid, {}), voters.quorum, voters)
                if learned.decision == "undecided" and may_decide(state, age,
                                                                  self.paxos_grace):
                    # Its coordinator is gone (or, when nothing tells, had its
                    # time): decide. Phase 1 finds a chosen commit in any
                    # majority; safety never needs the liveness sign. A live
                    # coordinator is left alone even if it proposed commit
                    # already: it is inside the protocol and finishes it.
                    outcomes[txid] = log.recover(txid, found[txid])
                elif learned.decision == "undecided" and state == "alive":
                    outcomes[txid] = PaxosOutcome(
                        "undecided", detail="its coordinator is alive inside the protocol")
        except TxmgrError as e:
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
        slots: list[Resolution | _Todo] = []
        todo: dict[str, list[_Todo]] = {}
        for name, branch, gid in todo_gids:
            out = outcomes.get(gid.txid)
            if out is None or not (out.commits or out.rolls_back):
                detail = out.detail if out is not None else "the Paxos log did not answer"
                slots.append(Resolution(name, branch.gid, gid.txid, "in progress",
                                        branch.prepared, f"undecided: {detail}"))
                continue
            item = _Todo(name, branch, gid, commit=out.commits)
            slots.append(item)
            todo.setdefault(name, []).append(item)
        self._finish_all(todo)
        remaining = _report(slots, report)
        states = {t: coordinator_state(alive.get(t, {}), log.quorum) for t in ages}
        self._paxos_cleanup(log, listed, found, outcomes, ages, commits, states, remaining,
                            report)
        return report

    def _paxos_cleanup(
        self, log: PaxosLog, listed: dict[str, list[PreparedBranch]],
        found: dict[str, Voters], outcomes: dict[str, PaxosOutcome],
        ages: dict[str, float], commits: dict[str, tuple[str, ...]],
        states: dict[str, CoordinatorState], remaining: set[str], report: RecoveryReport,
    ) -> None:
        """Delete the slots of finished transactions, and of those never prepared."""
        if len(listed) < len(self.config.participants):  # a branch may hide on it
            report.decisions_pending = len(set(ages) | set(found))
            return
        # Listed, and every branch listed is finished now. For a commit that is
        # all of them only if the commit was seen in the slots read *before* the
        # listing: a commit chosen later may have had a branch prepared after
        # its participant was listed (found by the torture test). That one
        # waits for a later pass (``done`` below). Slots holding no commit may
        # go at any time (the lemma in txmgr.paxos._core).
        # A commit names its participants: all of them must have been listed
        # here (_all_known, the rule of both log modes).
        finished = [t for t in found if t not in remaining and t in outcomes
                    and (t in commits and self._all_known(t, commits[t], listed, report)
                         if outcomes[t].commits else outcomes[t].rolls_back)]
        # Slots and no prepared branch. A commit accepted before the scan means
        # every branch was prepared before the listing, which found none: all
        # finished. Otherwise the coordinator may not have prepared yet (or
        # never will): after its grace period the slot goes — unless it holds
        # a commit by then (keep_commit), as deleting a slot that holds no
        # commit is always safe (see the lemma in txmgr.paxos._core).
        done = [t for t in ages if t not in found and t in commits
                and self._all_known(t, commits[t], listed, report)]
        # A live coordinator's registration stays (it may be about to prepare);
        # a gone one's goes at once; when nothing tells, after the grace period.
        orphans = [t for t in ages if t not in found and t not in commits
                   and states.get(t) != "alive"]
        gone = [t for t in orphans if states.get(t) == "gone"]
        unknown = [t for t in orphans if states.get(t) != "gone"]
        try:
            deleted = 0
            if finished or done:
                deleted += len(log.forget([*finished, *done]).deleted)
            if gone:
                deleted += len(log.forget(gone, keep_commit=True).deleted)
            if unknown:
                deleted += len(log.forget(unknown, keep_commit=True,
                                          min_age=self.paxos_grace).deleted)
            report.decisions_deleted = deleted
        except TxmgrError as e:
            report.errors.append(f"log: could not delete finished slots: {redact(str(e))}")
        report.decisions_pending = len(set(ages) | set(found)) - report.decisions_deleted

    def _finish_all(self, todo: dict[str, list[_Todo]]) -> None:
        """COMMIT or ROLLBACK PREPARED every branch of ``todo``: pipelined on each
        participant's connection, all participants at once (see :class:`_Pipeline`)."""
        pipelines = [_Pipeline(self, name, items) for name, items in todo.items() if items]
        try:
            with selectors.DefaultSelector() as sel:
                while True:
                    for p in pipelines:
                        p.send_batch()  # once the previous batch is answered
                        p.watch(sel)
                    if not any(p.active for p in pipelines):
                        break
                    for key, _ in sel.select():
                        key.data.advance()
        finally:
            for p in pipelines:
                p.close()

    def _resolved(self, item: _Todo, outcome: Outcome, detail: str = "") -> None:
        """Record what became of one branch (called as soon as its answer arrives)."""
        branch, gid, name = item.branch, item.gid, item.participant
        item.resolution = Resolution(name, branch.gid, gid.txid, outcome, branch.prepared, detail)
        if outcome in ("committed", "rolled back"):
            logger.info(
                "resolved txid=%s gid=%s participant=%s outcome=%s",
                gid.txid, branch.gid, name, outcome,
                extra={"txid": gid.txid, "gid": branch.gid, "participant": name,
                       "outcome": outcome},
            )
            if self._on_resolution is not None:
                self._on_resolution(item.resolution)

    def _all_known(
        self, txid: str, named: Iterable[str], listed: Mapping[str, object],
        report: RecoveryReport,
    ) -> bool:
        """The cleanup rule of both log modes: a decision record may be deleted only
        when every participant it names was listed by this pass (and so is known
        finished). A record naming a participant this recoverer is not configured
        with (another application sharing the log) is kept, and said so: deleting
        it would make that participant's branch look forgotten, and roll it back."""
        missing = sorted(set(named) - set(listed))
        unknown = [p for p in missing if p not in self.config.participants]
        if unknown:  # (a configured one that did not answer is in report.errors already)
            line = (f"txid={txid}: kept, it names participants this recoverer does not know: "
                    f"{', '.join(unknown)} (a recoverer configured with them finishes "
                    "their branches and deletes it)")
            report.kept.append(line)
            logger.warning("decision record %s", line,
                           extra={"txid": txid, "unknown_participants": unknown})
        return not missing

    def _cleanup(
        self,
        lconn: psycopg.Connection[Any],
        rows: dict[str, decision_log.DecisionRow],
        listed: dict[str, list[PreparedBranch]],
        remaining: set[str],
        report: RecoveryReport,
    ) -> None:
        """Delete rows whose branches are finished on every participant they name."""
        finished = [
            txid
            for txid, row in rows.items()
            if txid not in remaining and self._all_known(txid, row.participants, listed, report)
        ]
        try:
            report.decisions_deleted = decision_log.delete_decisions(lconn, finished)
        except psycopg.Error as e:
            self._drop(LOG_KEY)
            report.errors.append(f"log: could not delete finished decisions: {redact(str(e))}")
        report.decisions_pending = len(rows) - report.decisions_deleted


@dataclass(slots=True)
class _Todo:
    """A branch to finish, and what became of it."""

    participant: str
    branch: PreparedBranch
    gid: Gid | PaxosGid
    commit: bool
    resolution: Resolution | None = None


def _report(slots: list[Resolution | _Todo], report: RecoveryReport) -> set[str]:
    """Add every branch's resolution to ``report``, in listing order; the txids
    that still have a branch prepared somewhere."""
    remaining: set[str] = set()
    for slot in slots:
        res = slot if isinstance(slot, Resolution) else slot.resolution
        assert res is not None
        report.resolutions.append(res)
        if res.outcome == "error":
            report.errors.append(f"{res.participant}: {res.gid}: {res.detail}")
        if res.outcome in ("in progress", "busy", "error"):
            remaining.add(res.txid)
    return remaining


class _Pipeline:
    """Finishes the branches of one participant over its kept connection.

    ``COMMIT PREPARED`` refuses to run inside a transaction block, and several
    statements in one simple query, or several extended-protocol statements
    before one Sync, form one. So every statement is followed by its own Sync
    (libpq pipeline mode): each is its own transaction with its own answer,
    and an error affects that branch only — while the statements of a batch
    travel without waiting for each other's answers. A batch is sent once the
    previous one is fully answered; batches start at one statement and
    double up to :data:`PIPELINE_DEPTH`, so that a connection kept from an
    earlier pass that went stale costs one branch an error (the next batch
    reconnects), not a whole batch.
    """

    __slots__ = ("_conn", "_current", "_flushing", "_inflight", "_name", "_pending", "_rec",
                 "_watched", "_window")

    def __init__(self, rec: Recoverer, name: str, items: list[_Todo]) -> None:
        self._rec = rec
        self._name = name
        self._pending = deque(items)  # not sent yet
        self._inflight: deque[_Todo] = deque()  # sent, answer not complete yet
        self._current: tuple[Outcome, str] | None = None  # the answer of _inflight[0]
        self._conn: psycopg.Connection[Any] | None = None  # in pipeline mode while set
        self._window = 1
        self._flushing = False  # libpq holds output the socket did not take yet
        # the connection whose socket the selector watches, and that socket
        self._watched: tuple[psycopg.Connection[Any], int] | None = None

    @property
    def active(self) -> bool:
        return bool(self._inflight)

    def watch(self, sel: selectors.BaseSelector) -> None:
        """Keep ``sel`` watching this pipeline's socket, for the events it needs now."""
        conn = self._conn if self._inflight else None
        if self._watched is not None and self._watched[0] is not conn:
            # A new connection may have the old one's descriptor number: unregister
            # by connection, not by number.
            sel.unregister(self._watched[1])
            self._watched = None
        if conn is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._flushing else 0)
        if self._watched is None:
            fd = conn.pgconn.socket
            sel.register(fd, events, self)
            self._watched = (conn, fd)
        elif sel.get_key(self._watched[1]).events != events:
            sel.modify(self._watched[1], events, self)

    def send_batch(self) -> None:
        """Send the next batch (connecting first if needed), unless one is in flight."""
        while self._pending and not self._inflight:
            if self._conn is None:
                try:
                    conn = self._rec._conn(self._name, self._rec.config.participants[self._name])
                    conn.pgconn.enter_pipeline_mode()
                except (psycopg.Error, TxmgrError) as e:
                    # Unreachable: the rest of its branches wait for the next pass.
                    self._rec._drop(self._name)
                    while self._pending:
                        self._rec._resolved(self._pending.popleft(), "error", redact(str(e)))
                    return
                self._conn = conn
            pg = self._conn.pgconn
            try:
                for _ in range(min(self._window, len(self._pending))):
                    item = self._pending.popleft()
                    self._inflight.append(item)
                    verb = "COMMIT PREPARED {}" if item.commit else "ROLLBACK PREPARED {}"
                    pg.send_query_params(
                        sql.SQL(verb).format(sql.Literal(item.branch.gid)).as_bytes(self._conn),
                        None,
                    )
                    pg.pipeline_sync()
                self._window = min(2 * self._window, PIPELINE_DEPTH)
                self._flush()
            except psycopg.Error as e:
                self._lost(e)  # and go round again: a new connection for the rest

    def advance(self) -> None:
        """Send what libpq still holds, read what arrived, record every complete answer."""
        assert self._conn is not None
        pg = self._conn.pgconn
        try:
            self._flush()
            pg.consume_input()
            while self._inflight and not pg.is_busy():
                res = pg.get_result()
                if res is None:  # the end of one statement's results; its Sync follows
                    continue
                if res.status == pq.ExecStatus.PIPELINE_SYNC:
                    outcome, detail = self._current or ("error", "the server sent no answer")
                    self._current = None
                    self._rec._resolved(self._inflight.popleft(), outcome, detail)
                elif self._current is None:
                    self._current = self._answer(self._inflight[0], res)
        except psycopg.Error as e:  # the connection is lost: no answer will come
            self._lost(e)

    def close(self) -> None:
        """Leave the connection ready for ordinary use, or drop it when it is not."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._inflight or self._current is not None:  # stopped by an exception
            self._inflight.clear()
            self._rec._drop(self._name)
            return
        try:
            conn.pgconn.exit_pipeline_mode()
        except psycopg.Error:
            self._rec._drop(self._name)

    def _flush(self) -> None:
        assert self._conn is not None
        self._flushing = self._conn.pgconn.flush() == 1

    def _answer(self, item: _Todo, res: pq.abc.PGresult) -> tuple[Outcome, str]:
        if res.status == pq.ExecStatus.COMMAND_OK:
            return ("committed" if item.commit else "rolled back"), ""
        assert self._conn is not None
        error = psycopg.errors.error_from_result(res, encoding=self._conn.info.encoding)
        if isinstance(error, psycopg.errors.UndefinedObject):  # 42704: finished elsewhere
            return "already finished", ""
        if isinstance(error, psycopg.errors.ObjectNotInPrerequisiteState):  # 55000: in use
            return "busy", "another session is finishing it"
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            return "error", (
                f"{error}: connect recovery as the role that prepared it "
                f"({item.branch.owner}) or a superuser"
            )
        return "error", redact(str(error))

    def _lost(self, error: psycopg.Error) -> None:
        """The connection broke: every branch in flight gets the error; the next
        batch starts over on a new connection."""
        self._conn = None
        self._current = None
        self._flushing = False
        self._window = 1
        self._rec._drop(self._name)
        while self._inflight:
            self._rec._resolved(self._inflight.popleft(), "error", redact(str(error)))

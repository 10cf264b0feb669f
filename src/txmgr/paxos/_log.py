"""``PaxosLog``: the decision log of Paxos mode, over N acceptor databases.

It drives the proposer generators of :mod:`txmgr.paxos._core` with the
statements of :mod:`txmgr.paxos._acceptor`. Call order for one transaction:

1. ``txid, voters = log.take()`` — a txid registered ahead, before any
   PREPARE (or ``log.begin(txid)`` to register a given one, one round each);
   raises :class:`LogQuorumUnavailable` when fewer than a majority answer:
   nothing was prepared, the transaction just aborts. The gids carry the
   voters: ``paxos_gid(txid, voters, participant)``.
2. ``log.propose_commit(txid, voters, participants)`` — once every branch is
   prepared: ballot 0 (one round), and only if that is not enough, phases 1
   and 2; returns the :class:`~txmgr.paxos._core.Outcome`.
3. ``log.forget([txid])`` once every branch is finished — or ``forget=`` on
   the next ``propose_commit``, which deletes them in the same statement.

Recovery (any process, any number of them): ``log.learn({txid: voters})``
reads what is decided; ``log.recover(txid, voters)`` decides what nobody did;
``log.slots()`` shows every slot, for ``txmgr status`` and for cleanup.

Rounds move on once a quorum answered (:mod:`txmgr.paxos._links` explains
why and what happens to the slower acceptors).
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg

from txmgr._dsn import mask, redact
from txmgr._gid import new_txid
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD, inspect
from txmgr.errors import ConfigError, LogSchemaError, NotPrimary, ParticipantUnavailable
from txmgr.participant import connect
from txmgr.paxos._acceptor import (
    Answer,
    accept_many_query,
    forget_query,
    query_for,
    read_query,
    register_many_query,
    run_quorum,
    scan_query,
)
from txmgr.paxos._batch import Combiner
from txmgr.paxos._beacon import Beacon
from txmgr.paxos._core import (
    BALLOT0,
    MAX_ACCEPTORS,
    Outcome,
    Proposer,
    Reply,
    Request,
    Slot,
    Steps,
    Value,
    Voters,
    quorum_of,
    registered_voters,
    settled,
)
from txmgr.paxos._errors import LogQuorumUnavailable
from txmgr.paxos._gid import PaxosGid
from txmgr.paxos._links import AcceptorLink, Collector
from txmgr.paxos._round import (
    Registration,
    by_incarnation,
    registered_by_quorum,
    registration_failed,
    reply_of,
    run_round,
    straggler_done,
)
from txmgr.paxos._schema import read_incarnation

__all__ = ["AcceptorStatus", "ForgetReport", "PaxosLog", "paxos_gid"]

logger = logging.getLogger("txmgr.paxos")


def paxos_gid(txid: str, voters: Voters, participant: str) -> str:
    """The gid of ``participant``'s branch of ``txid``."""
    return str(PaxosGid(txid, voters, participant))


@dataclass(frozen=True, slots=True)
class AcceptorStatus:
    """What one log database holds (``txmgr status`` shows it per in-doubt transaction)."""

    dsn: str  # masked
    incarnation: str | None
    error: str | None
    slots: dict[str, Slot] = field(default_factory=dict)
    ages: dict[str, float] = field(default_factory=dict)  # seconds since registration
    # txid -> whether its coordinator's liveness lock is held here (absent: the
    # slot records no coordinator); see txmgr.paxos._beacon
    alive: dict[str, bool] = field(default_factory=dict)


@dataclass(slots=True)
class ForgetReport:
    """The result of :meth:`PaxosLog.forget`."""

    deleted: dict[str, int] = field(default_factory=dict)  # txid -> acceptors that deleted it
    kept: set[str] = field(default_factory=set)  # held a commit somewhere (keep_commit)
    unreachable: list[str] = field(default_factory=list)  # masked DSNs


class PaxosLog:
    """The decision log of Paxos mode: a majority of ``dsns`` decides each transaction.

    ``dsns``: an odd number (3 to 9) of log databases, each migrated with
    ``txmgr migrate``; they may live on separate servers, or inside participant
    databases. Thread-safe: one instance serves every transaction of a manager.

    - ``proposer_id``: this process's part of its ballots (random by default;
      two processes drawing the same one is harmless, see the core);
    - ``linger``: seconds a registration, read or promise round waits, once a
      quorum answered, for the other acceptors (every extra voter is a log
      database more the transaction survives losing); the commit round never
      waits beyond its quorum;
    - ``round_timeout``: seconds after which an unanswered statement is given
      up (default ``connect_timeout``);
    - ``ahead``: at most this many txids registered in one round ahead of the
      transactions that use them (:meth:`take`; 1 registers one per transaction);
    - ``ahead_max_age``: seconds a txid registered ahead may wait for its
      transaction; older ones are deleted unused. Keep it well below the
      recovery's ``paxos_grace``, which is counted from the registration;
    - ``ahead_linger``: seconds a registration round waits, once a majority
      answered, for the other log databases. A transaction survives losing
      ``voters - majority`` log databases, so a voter missed only because it
      was slow is a loss of fault tolerance: this round is off the commit path
      (one per batch), and it ends as soon as every log database asked
      answered, so it can afford to wait (known-dead ones are not asked);
    - ``ballot0_to``: ``"majority"`` (default) sends the coordinator's ballot 0
      to a majority of the transaction's voters only (a different majority
      each time, spreading the load), and to the others only when those do
      not all accept within ``hedge_after`` seconds — a durable write per
      transaction less on the log databases; ``"all"`` sends it to every
      voter and moves on with the first majority (steadier tail latency when
      a log database stalls, at the cost of that write);
    - ``accept_rounds``: at most this many of the coordinator's commit rounds
      (ballot 0) in flight at once; the commits of transactions that arrive
      meanwhile wait and go together in one statement per log database (up to
      ``accept_batch`` of them): one durable write for all. A lone commit is
      sent at once. 1 combines the most; a round stuck on a stalling log
      database (until ``hedge_after``) holds up the commits behind it;
    - ``beacon_timeout``: seconds after which a log database ends this
      process's liveness lock if the process stops touching it (hung): then
      recovery decides its undecided transactions (see
      :mod:`txmgr.paxos._beacon`; a process that dies loses it at once).
    """

    def __init__(
        self,
        dsns: Sequence[str],
        *,
        connect_timeout: float = 10.0,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        proposer_id: int | None = None,
        linger: float = 0.05,
        round_timeout: float | None = None,
        ahead: int = 64,
        ahead_max_age: float = 5.0,
        ahead_linger: float = 1.0,
        ballot0_to: str = "majority",
        hedge_after: float = 0.2,
        accept_rounds: int = 1,
        accept_batch: int = 64,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
        beacon_timeout: float = 60.0,
    ) -> None:
        dsns = list(dsns)
        if isinstance(dsns, str) or len(dsns) < 3 or len(dsns) % 2 == 0 or \
                len(dsns) > MAX_ACCEPTORS:
            raise ConfigError(
                f"a Paxos log needs an odd number of log databases from 3 to {MAX_ACCEPTORS} "
                f"(a majority decides; 3 survive one failure, 5 two), not {len(dsns)}: "
                "set [log] dsns = [\"postgresql://…\", …]"
            )
        for i, dsn in enumerate(dsns):
            if not isinstance(dsn, str) or not dsn.strip():
                raise ConfigError(
                    f"Paxos log database #{i + 1}: the DSN must be a non-empty string")
            try:
                psycopg.conninfo.conninfo_to_dict(dsn)
            except psycopg.ProgrammingError:
                raise ConfigError(
                    f"Paxos log database #{i + 1}: cannot parse the DSN {mask(dsn)!r}: give a "
                    "URL such as 'postgresql://user@host/txlog' or key=value pairs"
                ) from None
        if len(set(dsns)) != len(dsns):
            raise ConfigError("the same Paxos log database is listed twice: every DSN must "
                              "name a different database, or a majority means nothing")
        self.dsns = tuple(dsns)
        self.connect_timeout = connect_timeout
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.linger = linger
        self.round_timeout = round_timeout if round_timeout is not None else connect_timeout
        self.links = [AcceptorLink(d, connect_timeout=connect_timeout, min_size=pool_min_size,
                                   max_size=pool_max_size, prepare_threshold=prepare_threshold)
                      for d in dsns]
        self.collector = Collector(timeout=self.round_timeout, done=straggler_done)
        self.proposer = Proposer(proposer_id if proposer_id is not None else secrets.randbits(32))
        if beacon_timeout <= 0:
            raise ConfigError("PaxosLog: beacon_timeout must be positive")
        self.beacon = Beacon(self.dsns, connect_timeout=connect_timeout, timeout=beacon_timeout)
        if ahead < 1 or ahead_max_age <= 0:
            raise ConfigError("PaxosLog: ahead must be at least 1 and ahead_max_age positive")
        self.ahead = ahead
        self.ahead_max_age = ahead_max_age
        self.ahead_linger = ahead_linger
        if ballot0_to not in ("majority", "all"):
            raise ConfigError(
                f"PaxosLog: ballot0_to must be 'majority' or 'all', not {ballot0_to!r}")
        self.ballot0_to = ballot0_to
        self.hedge_after = hedge_after
        if accept_rounds < 1 or accept_batch < 1:
            raise ConfigError("PaxosLog: accept_rounds and accept_batch must be at least 1")
        self._combiner: Combiner[_Accept, dict[str, Reply]] = Combiner(
            self._accept, limit=accept_rounds, max_batch=accept_batch)
        # Finished txids whose slots a log database still holds because the
        # statement that deleted them elsewhere was not sent to it (ballot 0
        # to a majority): they ride on its next statement. Bounded: recovery
        # deletes what falls off (a returning database's stale slots).
        self._owed: list[list[str]] = [[] for _ in self.links]
        self._owed_lock = threading.Lock()
        self._turn = 0
        # Registered ahead: (txid, voters, monotonic time the round was sent,
        # the liveness key it was registered under).
        self._ready: deque[tuple[str, Voters, float, int]] = deque()
        self._batch = 1  # next registration round's size: doubles while used up, see take()
        self._refilled = 0.0
        self._unused: list[str] = []  # registered, never used: deleted on the next decision
        self._ahead_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"PaxosLog([{', '.join(repr(mask(d)) for d in self.dsns)}])"

    @property
    def quorum(self) -> int:
        """How many log databases make a majority."""
        return quorum_of(len(self.dsns))

    # -- identity -----------------------------------------------------------------

    def check(self) -> dict[str, str]:
        """Connect to every log database now; their incarnations by masked DSN.

        Raises LogSchemaError if one lacks the tables, ConfigError if two DSNs
        reach the same database, LogQuorumUnavailable if fewer than a majority
        answer. One database down is reported in the log, not raised.
        """
        found: dict[str, str] = {}
        problems: list[str] = []
        schema: list[LogSchemaError] = []
        for acc in self.links:
            try:
                with connect(acc.dsn, "log", connect_timeout=self.connect_timeout,
                             autocommit=True) as conn:
                    inspect(conn, "log")  # a statement-pooling pooler: refused now
                    found[acc.dsn] = read_incarnation(conn, acc.dsn)
            except LogSchemaError as e:
                schema.append(e)
                problems.append(str(e))
            except (psycopg.Error, ParticipantUnavailable, NotPrimary) as e:
                problems.append(f"{mask(acc.dsn)}: {redact(str(e))}")
        by_inc: dict[str, str] = {}
        for dsn, inc in found.items():
            if inc in by_inc:
                raise ConfigError(
                    f"Paxos log databases {mask(by_inc[inc])} and {mask(dsn)} are the same "
                    f"database (incarnation {inc}): list each log database once"
                )
            by_inc[inc] = dsn
        if len(found) < self.quorum:
            if schema:
                raise LogSchemaError("; ".join(problems))
            raise LogQuorumUnavailable(
                f"only {len(found)} of {len(self.dsns)} Paxos log databases answered, "
                f"{self.quorum} are needed: " + "; ".join(problems),
                answered=len(found), needed=self.quorum, problems=problems,
            )
        for p in problems:
            logger.warning("Paxos log database unavailable: %s", p)
        return {mask(d): inc for d, inc in found.items()}

    # -- the coordinator ------------------------------------------------------------

    def begin(self, txid: str) -> Voters:
        """Register ``txid`` on the log databases; its voters (for the gids).

        Raises LogQuorumUnavailable when fewer than a majority registered it:
        then nothing may be prepared (the transaction aborts). Never retried:
        a registration must reach each database at most once.
        """
        reg = self.registration(txid)
        # Wait a little for the acceptors beyond the quorum: every voter more is
        # one more log database the transaction survives losing.
        unanswered = run_quorum(reg.jobs, enough=reg.enough, linger=self.linger,
                                timeout=self.round_timeout)
        voters = reg.finish(unanswered)
        self.beacon.hand_out(txid, reg.key)
        return voters

    def take(self) -> tuple[str, Voters]:
        """A txid registered on the log databases, and its voters, for a transaction
        about to prepare its branches (its txid becomes this one).

        Registration must precede every PREPARE, but it need not be a round of
        each transaction's own: txids are registered ahead, many in one
        statement per log database, and handed out here. A txid is handed out
        once and only while younger than ``ahead_max_age``. The batch grows
        (up to ``ahead``) while batches are used up quickly and shrinks when
        txids expire unused, so a busy coordinator spends a fraction of a
        round per transaction and an idle one wastes few registrations.

        Raises LogQuorumUnavailable when a majority cannot register any.
        """
        self._check_open()
        with self._ahead_lock:  # one registration round at a time; the others wait for it
            now = time.monotonic()
            expired = 0
            while self._ready and now - self._ready[0][2] > self.ahead_max_age:
                self._unused.append(self._ready.popleft()[0])
                expired += 1
            if expired:
                self._batch = max(1, self._batch // 2)
            while True:
                if not self._ready:
                    if not expired and now - self._refilled < self.ahead_max_age / 2:
                        self._batch = min(self.ahead, self._batch * 2)
                    self._register_ahead(self._batch)
                    self._refilled = now
                txid, voters, _, key = self._ready.popleft()
                if self.beacon.hand_out(txid, key):
                    return txid, voters
                # Registered under a liveness key retired since (see release):
                # recovery would take its coordinator for gone.
                self._unused.append(txid)

    def release(self, txid: str, *, settled: bool) -> None:
        """The coordinator is done with ``txid`` (call once, however it ended).
        ``settled``: commit was chosen, or nothing of it can be left prepared;
        False hands it over to recovery (see :mod:`txmgr.paxos._beacon`)."""
        self.beacon.release(txid, settled=settled)

    def _register_ahead(self, count: int) -> None:
        txids = [new_txid() for _ in range(count)]
        key = self.beacon.key()
        sent = time.monotonic()
        # Wait for the acceptors beyond the quorum: every voter more is one
        # more log database these transactions survive losing.
        results = run_round(self, register_many_query(txids, key),
                            enough=registered_by_quorum(self, txids[0]),
                            linger=max(self.linger, self.ahead_linger))
        for txid in txids:
            voters = registered_voters(by_incarnation(results, txid), len(self.links))
            if voters is None:
                self._unused.append(txid)
            else:
                self._ready.append((txid, voters, sent, key))
        if not self._ready:
            answered = sum(1 for _, r in results if isinstance(r, Answer))
            raise registration_failed(self, results, answered=answered, what="",
                                      registered="transactions")

    def _take_unused(self) -> list[str]:
        with self._ahead_lock:
            unused, self._unused = self._unused, []
            return unused

    def registration(self, txid: str) -> Registration:
        """:meth:`begin` in pieces, for a coordinator that sends the registration in
        the same round trip as its votes (see :class:`Registration`)."""
        self._check_open()
        return Registration(self, txid, self.beacon.key())

    def propose_commit(
        self, txid: str, voters: Voters, participants: Iterable[str], *,
        forget: Sequence[str] = (),
    ) -> Outcome:
        """Ballot 0 with ``commit`` (every branch is prepared), then learn if needed.

        ``forget``: finished transactions deleted by the same statement (with
        the txids registered ahead that expired unused: nothing was ever
        proposed for them, so deleting them is always safe).
        """
        steps = self.proposer.commit(txid, voters, Value.commit(participants))
        unused = self._take_unused()
        try:
            return self._drive(steps, voters, forget=[*forget, *unused])
        except BaseException:
            with self._ahead_lock:
                self._unused += unused
            raise

    # -- recovery and learners --------------------------------------------------------

    def learn(self, transactions: Mapping[str, Voters]) -> dict[str, Outcome]:
        """What is already decided for each txid (one read of every acceptor, no write)."""
        self._check_open()
        if not transactions:
            return {}
        results = run_round(self, read_query(sorted(transactions)), enough=_everyone,
                            everyone=True)
        out: dict[str, Outcome] = {}
        for txid, voters in transactions.items():
            replies = by_incarnation(results, txid)
            out[txid] = settled(voters, replies) or Outcome(
                "undecided", detail=_undecided_detail(voters, replies))
        return out

    def recover(self, txid: str, voters: Voters, *, preempt: bool = True) -> Outcome:
        """Learn ``txid``'s outcome; with ``preempt``, decide it if nobody has (the
        coordinator's ballot 0 is then refused, and it learns the outcome too)."""
        # Every log database is asked, resting ones too: a voter that just came
        # back may be the one this transaction needs.
        return self._drive(self.proposer.recover(txid, voters, preempt=preempt), voters,
                           everyone=True)

    def forget(
        self, txids: Sequence[str], *, keep_commit: bool = False, min_age: float = 0.0
    ) -> ForgetReport:
        """Delete the slots of finished transactions on every log database that answers.

        Only for transactions whose every branch is finished (or, with
        ``keep_commit``, slots holding no commit: those may go at any time).
        """
        self._check_open()
        report = ForgetReport()
        if not txids:
            return report
        results = run_round(self, forget_query(list(txids), keep_commit=keep_commit,
                                               min_age=min_age), enough=_everyone)
        for acc, r in results:
            if isinstance(r, str):
                report.unreachable.append(mask(acc.dsn))
                continue
            for txid, reply in r.replies.items():
                if reply.status == "ok":
                    report.deleted[txid] = report.deleted.get(txid, 0) + 1
                elif reply.status == "rejected":
                    report.kept.add(txid)
        reached = {a for a, _ in results}
        report.unreachable += [mask(a.dsn) for a in self.links if a not in reached]
        return report

    def slots(self, txids: Sequence[str] | None = None) -> list[AcceptorStatus]:
        """Every slot (or those of ``txids``) on every log database, in DSN order."""
        self._check_open()
        query = scan_query() if txids is None else read_query(list(txids))
        results = dict(run_round(self, query, enough=_everyone, everyone=True))
        out = []
        for acc in self.links:
            r = results.get(acc)
            if r is None:
                out.append(AcceptorStatus(mask(acc.dsn), acc.incarnation,
                                          acc.last_error or "not contacted"))
            elif isinstance(r, str):
                out.append(AcceptorStatus(mask(acc.dsn), acc.incarnation, r))
            else:
                found = {t: rep.slot for t, rep in r.replies.items() if rep.slot is not None}
                out.append(AcceptorStatus(mask(acc.dsn), r.incarnation, None, found, r.ages,
                                          r.alive))
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this PaxosLog is closed: create a new one")

    def close(self) -> None:
        """Delete the txids registered ahead and not used; close every pool
        (statements still in flight are abandoned)."""
        if self._closed:
            return
        with self._ahead_lock:
            leftover = [*self._unused, *(t for t, _, _, _ in self._ready)]
            self._unused, self._ready = [], deque()
        with self._owed_lock:  # finished: deleted wherever they are left
            owed = sorted({t for ts in self._owed for t in ts})
            self._owed = [[] for _ in self.links]
        for txids, keep_commit, what in ((leftover, True, "unused registrations"),
                                         (owed, False, "finished transactions' slots")):
            if txids:
                try:
                    self.forget(txids, keep_commit=keep_commit)
                except Exception as e:  # recovery deletes them (after its grace period)
                    logger.warning("could not delete %d %s: %s", len(txids), what,
                                   redact(str(e)))
        self._closed = True
        self.beacon.close()
        self.collector.close()
        for link in self.links:
            link.close()

    def __enter__(self) -> PaxosLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O ----------------------------------------------------------------------------

    def _drive(self, steps: Steps, voters: Voters, *, forget: Sequence[str] = (),
               everyone: bool = False) -> Outcome:
        q = voters.quorum
        try:
            request = next(steps)
            while True:
                if request.op == "pause":
                    time.sleep(random.uniform(0.0, 0.02))  # let a dueling proposer finish
                    replies: dict[str, Reply] = {}
                else:
                    self._check_open()
                    if request.op == "accept":
                        accept = _Accept(request, voters, forget)
                        # The coordinator's commit (ballot 0) is combined with those
                        # of concurrent transactions (see _batch).
                        replies = (self._combiner.submit(accept, key=voters)
                                   if request.ballot == BALLOT0 else self._accept([accept])[0])
                        forget = ()  # rides on the first accept only
                    else:
                        # Reads and promises wait a moment for every voter: a commit
                        # accepted by one of them is then finished rather than aborted.
                        replies = by_incarnation(run_round(
                            self, query_for(request),
                            enough=_oks(voters, {request.txid: q}),
                            linger=self.linger, everyone=everyone), request.txid)
                request = steps.send(replies)
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return outcome

    def _accept(self, accepts: Sequence[_Accept]) -> list[dict[str, Reply]]:
        """Phase 2 for ``accepts`` (one ballot, the same voters; usually one, or the
        coordinator's combined ballot-0 commits): to every voter, or (ballot 0,
        ``ballot0_to="majority"``) to a majority first and to the others only for
        the accepts that majority did not take. The replies to each, in order."""
        voters, ballot = accepts[0].voters, accepts[0].request.ballot
        forget = sorted({t for a in accepts for t in a.forget})
        q = voters.quorum
        now = time.monotonic()
        ready = [k for k in self.links if k.incarnation in voters and not k.resting(now)]
        if ballot != BALLOT0 or self.ballot0_to != "majority" or len(ready) <= q:
            replies, _ = self._accept_on(accepts, None, voters, forget, {})
            return [replies[a.request.txid] for a in accepts]
        turn = self._turn = (self._turn + 1) % len(ready)  # a race only skews the spread
        first = (ready[turn:] + ready[:turn])[:q]
        rest = [k for k in self.links if k not in first]
        replies, oks = self._accept_on(accepts, first, voters, forget, {},
                                       timeout=self.hedge_after)
        short = [a for a in accepts if oks[a.request.txid] < q]
        if not short:
            self._owe(rest, forget)
            return [replies[a.request.txid] for a in accepts]
        more, _ = self._accept_on(short, rest, voters, forget, oks)
        for txid, by_inc in more.items():
            for inc, reply in by_inc.items():
                replies[txid].setdefault(inc, reply)
        return [replies[a.request.txid] for a in accepts]

    def _accept_on(
        self, accepts: Sequence[_Accept], only: list[AcceptorLink] | None, voters: Voters,
        forget: Sequence[str], oks_before: Mapping[str, int], *, timeout: float | None = None,
    ) -> tuple[dict[str, dict[str, Reply]], dict[str, int]]:
        """One accept round on ``only`` (None: every acceptor); per txid its replies
        and oks. What each asked log database is owed rides along, and is paid if
        it answers."""
        asked = self.links if only is None else only
        owed = self._take_owed(asked)
        extra = sorted({t for ts in owed.values() for t in ts})
        first = accepts[0].request
        if len(accepts) == 1:
            query = query_for(first, forget=[*forget, *extra])
        else:
            query = accept_many_query(
                [(a.request.txid, _value(a.request)) for a in accepts], first.ballot,
                forget=[*forget, *extra])
        need = {a.request.txid: voters.quorum - oks_before.get(a.request.txid, 0)
                for a in accepts}
        results = run_round(self, query, enough=_oks(voters, need), only=only,
                            timeout=timeout)
        answered = {id(link) for link, r in results if isinstance(r, Answer)}
        unpaid = [k for k in asked if id(k) not in answered]
        for link in unpaid:
            self._owe([link], owed.get(id(link), []))
        self._owe(unpaid, forget)
        replies = {t: by_incarnation(results, t) for t in need}
        oks = {t: sum(1 for inc, r in by_inc.items() if inc in voters and r.status == "ok")
               for t, by_inc in replies.items()}
        return replies, oks

    def _take_owed(self, links: Sequence[AcceptorLink]) -> dict[int, list[str]]:
        """What the healthy ones of ``links`` are owed (a database that is down
        keeps its debt until it answers again: sending it along to the others
        every time would only cost them)."""
        with self._owed_lock:
            out = {}
            for link in links:
                i = self.links.index(link)
                if self._owed[i] and link.healthy:
                    out[id(link)], self._owed[i] = self._owed[i], []
            return out

    def _owe(self, links: Sequence[AcceptorLink], txids: Sequence[str]) -> None:
        if not txids:
            return
        with self._owed_lock:
            for link in links:
                owed = self._owed[self.links.index(link)]
                owed += txids
                if len(owed) > _MAX_OWED:  # a database long down: recovery cleans up
                    del owed[: len(owed) - _MAX_OWED]


#: Finished txids kept per log database for deletion on its next statement.
_MAX_OWED = 10_000


@dataclass(frozen=True, slots=True)
class _Accept:
    """One transaction's phase 2 request, with what its statement also deletes."""

    request: Request
    voters: Voters
    forget: Sequence[str]


def _value(request: Request) -> Value:
    assert request.value is not None, "an accept request carries its value"
    return request.value


def _oks(voters: Voters, need: Mapping[str, int]) -> Callable[[list[Answer]], bool]:
    """A round's ``enough``: each txid of ``need`` has that many of its voters' oks."""
    def enough(answers: list[Answer]) -> bool:
        return all(
            sum(1 for a in answers if a.incarnation in voters
                and reply_of(a, txid).status == "ok") >= n
            for txid, n in need.items())
    return enough


def _everyone(answers: list[Answer]) -> bool:
    return False  # wait for every acceptor asked (within the round timeout)


def _undecided_detail(voters: Voters, replies: Mapping[str, Reply]) -> str:
    answered = sum(1 for inc in replies if inc in voters)
    if answered < voters.quorum:
        return (f"only {answered} of its {len(voters)} log databases answered, "
                f"{voters.quorum} are needed")
    return "not decided yet"

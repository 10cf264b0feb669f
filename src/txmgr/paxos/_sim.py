"""A deterministic simulation of Paxos commit: random schedules, checked invariants.

The acceptors apply :class:`~txmgr.paxos._core.AcceptorRules` to slots in
memory; the coordinator and the recovery processes run the very proposer
generators :class:`~txmgr.paxos.PaxosLog` runs (:class:`~txmgr.paxos._core.Proposer`),
and cleanup uses :func:`~txmgr.paxos._core.plan_cleanup`. Only the network,
the participants and the scheduling are simulated. One seed fixes everything
(``random.Random(seed)``), so a failing schedule is replayed exactly.

A schedule: 1-3 global transactions of 2-3 branches over 3 or 5 acceptors;
a coordinator per transaction that registers, prepares (a PREPARE may fail, or
its reply may be lost while it still lands later), proposes commit at ballot 0
and applies the outcome; 1-3 recovery processes that list prepared branches,
learn or decide outcomes (preempting after a random grace, 0 included), apply
them and clean up slots — some configured with only two of the three
participants (another application sharing the log: it lists and finishes
only the branches it knows, and must keep the slots of a commit naming one
it does not); all of it interleaved at random with message loss,
duplicated messages, late delivery, acceptor crashes (losing registrations
not yet flushed), restarts and wipes (new incarnation, no slots), and
coordinators killed between any two steps. Proposer ids sometimes collide on
purpose. Then a healing phase: every acceptor back, nothing lost any more, one
recovery process runs passes until nothing changes.

Invariants, checked as the schedule runs and at its end:

- agreement: at most one value is ever chosen per transaction (q of its voters
  accepted it at one ballot, counted over the whole history, across deletions);
- validity: an acceptor accepts ``commit`` only if every branch was prepared;
- atomicity: a branch is committed only while commit is chosen, a prepared
  branch is rolled back only while it is not, and no transaction ends with a
  committed and a rolled-back (prepared) branch;
- the coordinator's report is the truth (committed / aborted, or unknown);
- liveness after healing: every transaction none of whose voters was wiped is
  finished, and no slot is left of a finished transaction.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from txmgr.paxos._core import (
    AcceptorRules,
    Outcome,
    Proposer,
    Reply,
    Request,
    Slot,
    Steps,
    Value,
    Voters,
    names_known,
    plan_cleanup,
    quorum_of,
    registered_voters,
)

__all__ = ["Simulation", "SimulationFailed", "Stats", "run_many"]


class SimulationFailed(AssertionError):
    """An invariant broke; the message names the seed and the last events."""


# -- the world ---------------------------------------------------------------------------

#: Every participant of the simulated world.
NAMES = ("p0", "p1", "p2")

BranchState = Literal["active", "prepared", "failed", "committed", "rolled back"]


@dataclass
class Branch:
    name: str
    state: BranchState = "active"
    was_prepared: bool = False


@dataclass
class Txn:
    txid: str
    branches: dict[str, Branch]
    voters: Voters | None = None
    all_prepared: bool = False  # the coordinator saw every PREPARE succeed
    prepared_at: int | None = None  # time of the first prepared branch
    report: str | None = None  # what the coordinator told the application
    # (ballot, value) -> voter incarnations that ever accepted it
    accepts: dict[tuple[int, Value], set[str]] = field(default_factory=dict)
    chosen: set[Value] = field(default_factory=set)
    wiped_voters: set[str] = field(default_factory=set)


class SimAcceptor:
    def __init__(self, index: int) -> None:
        self.index = index
        self.gen = 0
        self.incarnation = self._name()
        self.slots: dict[str, Slot] = {}
        self.created: dict[str, int] = {}
        self.volatile: set[str] = set()  # registrations not yet on disk
        self.up = True

    def _name(self) -> str:
        return f"{self.index:02x}{self.gen:010x}"

    def flush(self) -> None:
        self.volatile.clear()

    def crash(self) -> list[str]:
        lost = sorted(self.volatile)
        for txid in lost:
            self.slots.pop(txid, None)
            self.created.pop(txid, None)
        self.volatile.clear()
        self.up = False
        return lost

    def wipe(self) -> None:
        self.gen += 1
        self.incarnation = self._name()
        self.slots.clear()
        self.created.clear()
        self.volatile.clear()

    def _set(self, txid: str, slot: Slot | None) -> None:
        if slot is None:
            self.slots.pop(txid, None)
            self.created.pop(txid, None)
            self.volatile.discard(txid)
        else:
            self.slots[txid] = slot


Op = tuple[Any, ...]


@dataclass
class Msg:
    kind: Literal["acc", "acc_reply", "ptx", "ptx_reply"]
    actor: int
    rid: int
    target: int | str  # acceptor index, or txid/branch for PREPAREs
    body: Any


# -- actors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broadcast:
    op: Op  # sent to every acceptor


@dataclass(frozen=True)
class PrepareAll:
    txid: str


@dataclass(frozen=True)
class Apply:
    txid: str
    branch: str
    commit: bool


@dataclass(frozen=True)
class ListPrepared:
    names: tuple[str, ...] = NAMES  # the participants this process is configured with


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class PassDone:
    progress: bool


Action = Broadcast | PrepareAll | Apply | ListPrepared | Pause | PassDone
ActorGen = Generator[Action, Any, None]


@dataclass
class Actor:
    ident: int
    name: str
    gen: ActorGen
    state: Literal["ready", "waiting", "done", "dead"] = "ready"
    rid: int = 0
    inbox: dict[Any, Any] = field(default_factory=dict)
    expected: int = 0  # replies it is waiting for
    pending_value: Any = None
    kind: Literal["coordinator", "recovery", "healer"] = "coordinator"
    passes: int = 0
    idle_passes: int = 0


@dataclass
class Stats:
    """What some schedules exercised (to check that they exercise something)."""

    schedules: int = 0
    events: int = 0
    commits: int = 0
    aborts: int = 0
    undecided_after_healing: int = 0  # transactions with a wiped voter, left in doubt
    preemptions: int = 0


class Simulation:
    """One schedule, fixed by its seed; :meth:`run` plays it.

    Subclasses replace ``rules_class``, ``proposer_class``, :meth:`voters_for` or
    :meth:`known_for_cleanup` to break the protocol on purpose (the tests check
    that it is noticed).
    """

    rules_class: type[AcceptorRules] = AcceptorRules
    proposer_class: type[Proposer] = Proposer

    def __init__(self, seed: int, *, trace: int = 80) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.now = 0
        self._trace: deque[tuple[int, tuple[Any, ...]]] = deque(maxlen=trace)
        self.n = rng.choice((3, 3, 3, 5))
        self.q = quorum_of(self.n)
        rules = self.rules_class()
        self.acceptors = [SimAcceptor(i) for i in range(self.n)]
        self.rules = rules
        self.txns: dict[str, Txn] = {}
        self.network: list[Msg] = []
        self.actors: list[Actor] = []
        self._next_rid = 1
        self.healing = False
        # Fault rates differ per schedule: some calm, some stormy.
        self.w_drop = rng.choice((0.0, 0.3, 1.0, 3.0))
        self.w_dup = rng.choice((0.0, 0.3, 1.0))
        self.w_crash = rng.choice((0.0, 0.1, 0.4))
        self.w_wipe = rng.choice((0.0, 0.0, 0.05, 0.2))
        self.w_kill = rng.choice((0.0, 0.1, 0.5))
        self.p_vote_no = rng.choice((0.0, 0.0, 0.05, 0.2))
        self.impatience = rng.choice((0.005, 0.02, 0.1))  # chance to stop waiting early
        self.grace = rng.choice((0, 0, 5, 20, 60, 200))  # before recovery preempts
        self.idle_grace = rng.choice((0, 50, 200))  # before slots holding no commit go
        self.max_wipes = rng.choice((0, 1, 2))
        # Recovery deletes a transaction's slots right after finishing it, or
        # leaves that to the cleanup (slots then live longer: more late races).
        self.eager_forget = rng.random() < 0.5
        self.wipes = 0
        self.chaos_steps = rng.randint(100, 400)
        self.stats = Stats(schedules=1)
        names = list(NAMES)
        pids = [rng.randrange(4) for _ in range(4)]  # small range: ids collide on purpose
        for t in range(rng.randint(1, 3)):
            txid = f"{t:016x}"
            branches = {n: Branch(n) for n in rng.sample(names, rng.randint(2, 3))}
            self.txns[txid] = Txn(txid, branches)
            self._spawn("coordinator", f"coord-{t}",
                        self._coordinator(self.txns[txid], self.proposer_class(pids[t])))
        for r in range(rng.randint(1, 3)):
            pid = rng.choice([*pids, rng.randrange(2**32)])
            # Sometimes another application's recovery: it knows two participants.
            knows = NAMES if rng.random() < 0.6 else tuple(sorted(rng.sample(NAMES, 2)))
            self._spawn("recovery", f"recovery-{r}", self._recovery(
                self.proposer_class(pid), grace=self.grace, idle_grace=self.idle_grace,
                knows=knows))
        # Often one actor's messages crawl (a slow link): its statements land late.
        # A slow coordinator is the interesting case: recovery preempts it.
        coordinators = [a.ident for a in self.actors if a.kind == "coordinator"]
        self.laggard = rng.choice([None, *range(len(self.actors)), *coordinators, *coordinators])

    # -- bookkeeping -------------------------------------------------------------------

    def _spawn(self, kind: Any, name: str, gen: ActorGen) -> Actor:
        actor = Actor(len(self.actors), name, gen, kind=kind)
        self.actors.append(actor)
        return actor

    def _log(self, *parts: Any) -> None:
        # Formatted only when a schedule fails: most schedules never show theirs.
        self._trace.append((self.now, parts))

    @property
    def trace(self) -> list[str]:
        """The last events, oldest first."""
        return [f"t={now} " + " ".join(map(_fmt, parts)) for now, parts in self._trace]

    def fail(self, what: str) -> NoReturn:
        """Raise SimulationFailed: ``what`` broke, with the seed and the last events."""
        raise SimulationFailed(
            f"seed {self.seed}: {what}\nlast events:\n  " + "\n  ".join(self.trace)
        )

    def voters_for(self, txn: Txn) -> Voters:
        """The voters a recovery process reads from a branch's gid."""
        assert txn.voters is not None
        return txn.voters

    def known_for_cleanup(self, knows: tuple[str, ...]) -> tuple[str, ...]:
        """The participants whose branches a recovery process configured with
        ``knows`` may count as finished when it deletes slots: its own (the
        cleanup rule, :func:`~txmgr.paxos._core.names_known`)."""
        return knows

    # -- acceptors -----------------------------------------------------------------------

    def _acceptor_handle(self, acc: SimAcceptor, op: Op) -> Any:
        kind = op[0]
        rules = self.rules
        if kind == "register":
            txid = op[1]
            slot, reply = rules.register(acc.slots.get(txid))
            if reply.status == "ok":
                acc._set(txid, slot)
                acc.created[txid] = self.now
                acc.volatile.add(txid)
            return {txid: reply}
        if kind == "read":
            return {op[1]: rules.read(acc.slots.get(op[1]))}
        if kind == "prepare":
            txid, b = op[1], op[2]
            slot, reply = rules.prepare(acc.slots.get(txid), b)
            if reply.status == "ok":
                acc._set(txid, slot)
                acc.flush()
            return {txid: reply}
        if kind == "accept":
            txid, b, value = op[1], op[2], op[3]
            slot, reply = rules.accept(acc.slots.get(txid), b, value)
            if reply.status == "ok":
                acc._set(txid, slot)
                acc.flush()
                self._accepted(acc, txid, b, value)
            return {txid: reply}
        if kind == "forget":
            txids, keep_commit, min_age = op[1], op[2], op[3]
            out: dict[str, Reply] = {}
            for txid in txids:
                old = acc.slots.get(txid)
                if old is not None and self.now - acc.created.get(txid, self.now) < min_age:
                    out[txid] = Reply("rejected", old)  # too young (liveness only)
                    continue
                slot, reply = rules.forget(old, keep_commit=keep_commit)
                acc._set(txid, slot)
                out[txid] = reply
            acc.flush()
            return out
        if kind == "scan":
            return {t: (s, self.now - acc.created.get(t, self.now)) for t, s in acc.slots.items()}
        raise AssertionError(kind)

    def _accepted(self, acc: SimAcceptor, txid: str, b: int, value: Value) -> None:
        txn = self.txns[txid]
        if value.kind == "commit" and not txn.all_prepared:
            self.fail(f"validity: {acc.incarnation} accepted commit of {txid} although not "
                      "every branch was prepared")
        if txn.voters is None or acc.incarnation not in txn.voters:
            return
        who = txn.accepts.setdefault((b, value), set())
        who.add(acc.incarnation)
        if len(who) >= txn.voters.quorum and value not in txn.chosen:
            txn.chosen.add(value)
            self._log("CHOSEN", txid, value, "at ballot", b)
            if len(txn.chosen) > 1:
                self.fail(f"agreement: {txid} has two chosen values: "
                          f"{sorted(map(str, txn.chosen))}")

    # -- participants --------------------------------------------------------------------

    def _apply(self, txid: str, name: str, commit: bool) -> str:
        txn = self.txns[txid]
        b = txn.branches[name]
        if b.state != "prepared":
            return "missing"  # like 42704: finished by somebody else (or never prepared)
        if commit:
            if not self._commit_chosen(txn):
                self.fail(f"atomicity: {txid}/{name} committed while commit is not chosen")
            b.state = "committed"
        else:
            if self._commit_chosen(txn):
                self.fail(f"atomicity: {txid}/{name} rolled back while commit is chosen")
            b.state = "rolled back"
        self._log("COMMIT PREPARED" if commit else "ROLLBACK PREPARED", f"{txid}/{name}")
        return "done"

    @staticmethod
    def _commit_chosen(txn: Txn) -> bool:
        return any(v.kind == "commit" for v in txn.chosen)

    def _listing(self, only: tuple[str, ...] = NAMES) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for txid, txn in self.txns.items():
            names = [n for n, b in txn.branches.items() if b.state == "prepared" and n in only]
            if names:
                out[txid] = names
        return out

    # -- the coordinator -------------------------------------------------------------------

    def _coordinator(self, txn: Txn, proposer: Proposer) -> ActorGen:
        txid = txn.txid
        replies = yield Broadcast(("register", txid))
        voters = registered_voters(_single(replies, txid), self.n)
        if voters is None:
            for b in txn.branches.values():
                b.state = "rolled back" if b.state == "active" else b.state
            txn.report = "aborted"
            yield Broadcast(("forget", [txid], False, 0))
            return
        txn.voters = voters
        votes = yield PrepareAll(txid)
        ok = [n for n, v in votes.items() if v == "ok"]
        if len(ok) < len(txn.branches):
            for n in ok:
                yield Apply(txid, n, False)
            txn.report = "aborted"
            yield Broadcast(("forget", [txid], False, 0))  # commit was never proposed
            return
        txn.all_prepared = True
        outcome = yield from self._drive(proposer.commit(txid, voters, Value.commit(ok)))
        self._log("coordinator", txid, outcome.decision, f"({outcome.detail})")
        if outcome.decision == "undecided":
            txn.report = "unknown"
            return
        results = []
        for n in sorted(txn.branches):
            results.append((yield Apply(txid, n, outcome.commits)))
        if outcome.decision == "forgotten":
            txn.report = "aborted" if "done" in results else "unknown"
        else:
            txn.report = "committed" if outcome.commits else "aborted"
        yield Broadcast(("forget", [txid], False, 0))

    def _drive(self, steps: Steps) -> Generator[Action, Any, Outcome]:
        try:
            request = next(steps)
            while True:
                if request.op == "pause":
                    yield Pause()
                    replies: Mapping[str, Reply] = {}
                else:
                    raw = yield Broadcast(_op(request))
                    replies = _single(raw, request.txid)
                request = steps.send(replies)
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return outcome

    # -- recovery ----------------------------------------------------------------------------

    def _recovery(self, proposer: Proposer, *, grace: int, idle_grace: int,
                  knows: tuple[str, ...] = NAMES) -> ActorGen:
        known = self.known_for_cleanup(knows)
        while True:
            progress = False
            listing = yield ListPrepared(knows)
            for txid in self.rng.sample(sorted(listing), len(listing)):
                txn = self.txns[txid]
                preempt = txn.prepared_at is not None and self.now - txn.prepared_at >= grace
                outcome = yield from self._drive(
                    proposer.recover(txid, self.voters_for(txn), preempt=preempt))
                if outcome.decision == "undecided":
                    continue
                progress = True
                if preempt:
                    self.stats.preemptions += 1
                for name in listing[txid]:
                    yield Apply(txid, name, outcome.commits)
                after = yield ListPrepared(knows)
                if txid not in after and (self.eager_forget or self.healing) and \
                        names_known(outcome.value, known):
                    yield Broadcast(("forget", [txid], False, 0))
            # Cleanup: read every slot, then list the branches, then plan.
            raw = yield Broadcast(("scan",))
            listing = yield ListPrepared(knows)
            found: dict[str, list[tuple[Slot, float]]] = {}
            for slots in raw.values():
                for txid, (slot, age) in slots.items():
                    found.setdefault(txid, []).append((slot, float(age)))
            plan = plan_cleanup(found, listing, known, grace=idle_grace)
            if plan.finished:
                yield Broadcast(("forget", sorted(plan.finished), False, 0))
            if plan.idle:
                yield Broadcast(("forget", sorted(plan.idle), True, idle_grace))
            progress = progress or bool(plan.finished or plan.idle)
            yield PassDone(progress)

    # -- the scheduler -------------------------------------------------------------------------

    def _send_all(self, actor: Actor, op: Op) -> None:
        actor.rid = self._next_rid
        self._next_rid += 1
        actor.inbox = {}
        actor.expected = self.n
        actor.state = "waiting"
        for acc in self.acceptors:
            self.network.append(Msg("acc", actor.ident, actor.rid, acc.index, op))

    def _step_actor(self, actor: Actor, value: Any) -> None:
        try:
            action = actor.gen.send(value)
        except StopIteration:
            actor.state = "done"
            return
        if isinstance(action, Broadcast):
            self._send_all(actor, action.op)
        elif isinstance(action, PrepareAll):
            txn = self.txns[action.txid]
            actor.rid = self._next_rid
            self._next_rid += 1
            actor.inbox = {}
            actor.expected = len(txn.branches)
            actor.state = "waiting"
            for name in txn.branches:
                self.network.append(Msg("ptx", actor.ident, actor.rid, action.txid, name))
        elif isinstance(action, Apply):
            actor.pending_value = self._apply(action.txid, action.branch, action.commit)
            actor.state = "ready"
        elif isinstance(action, ListPrepared):
            actor.pending_value = self._listing(action.names)
            actor.state = "ready"
        elif isinstance(action, Pause):
            actor.pending_value = None
            actor.state = "ready"
        elif isinstance(action, PassDone):
            actor.passes += 1
            actor.idle_passes = 0 if action.progress else actor.idle_passes + 1
            actor.pending_value = None
            actor.state = "ready"

    def _resume(self, actor: Actor) -> None:
        value = dict(actor.inbox)
        actor.inbox = {}
        actor.rid = 0  # later replies to this round are ignored, as on a real connection
        actor.state = "ready"
        actor.pending_value = value
        self._run(actor)

    def _run(self, actor: Actor) -> None:
        value, actor.pending_value = actor.pending_value, None
        self._step_actor(actor, value)

    def _deliver(self, msg: Msg) -> None:
        if msg.kind == "acc":
            acc = self.acceptors[msg.target]  # type: ignore[index]
            if not acc.up:
                return
            body = self._acceptor_handle(acc, msg.body)
            self._log(acc.incarnation, "<-", msg.body, "->", body)
            self.network.append(Msg("acc_reply", msg.actor, msg.rid, acc.incarnation, body))
        elif msg.kind == "ptx":
            txn = self.txns[msg.target]  # type: ignore[index]
            b = txn.branches[msg.body]
            if b.state == "active":
                if self.rng.random() < self.p_vote_no:
                    b.state = "failed"
                else:
                    b.state = "prepared"
                    b.was_prepared = True
                    if txn.prepared_at is None:
                        txn.prepared_at = self.now
            verdict = "ok" if b.state == "prepared" or b.was_prepared else "no"
            self._log("PREPARE", f"{msg.target}/{msg.body}:", b.state)
            self.network.append(Msg("ptx_reply", msg.actor, msg.rid, msg.body, verdict))
        else:
            actor = self.actors[msg.actor]
            if actor.state == "waiting" and actor.rid == msg.rid:
                actor.inbox.setdefault(msg.target, msg.body)  # the first reply counts

    def run(self) -> Stats:
        """Run the schedule; raises SimulationFailed when an invariant breaks."""
        for actor in self.actors:
            self._run(actor)
        rng = self.rng
        for _ in range(self.chaos_steps):
            self.now += 1
            self._chaos_event(rng)
        self._heal()
        self._check_end()
        self.stats.events = self.now
        return self.stats

    def _chaos_event(self, rng: random.Random) -> None:
        """One random event: deliver, lose or repeat a message, step an actor, or a fault."""
        net = bool(self.network)
        live = [a for a in self.actors if a.state == "ready" or a.state == "waiting"]
        down = [a for a in self.acceptors if not a.up]
        can_wipe = self.w_wipe and self.wipes < self.max_wipes
        weights = (
            10.0 if net else 0.0,  # deliver
            self.w_drop if net else 0.0,
            self.w_dup if net else 0.0,
            6.0 if live else 0.0,  # step an actor
            self.w_kill if live else 0.0,
            self.w_crash if len(down) < self.n else 0.0,
            1.0 if down else 0.0,  # restart
            self.w_wipe if can_wipe else 0.0,
            0.3,  # an acceptor's WAL writer flushes
        )
        event = _pick(weights, rng.random() * sum(weights))
        if event == 0:
            self._deliver(self._pop(rng))
        elif event == 1:
            self._drop(rng)
        elif event == 2:
            self._duplicate(rng)
        elif event == 3:
            self._poke(rng.choice(live))
        elif event == 4:
            coords = [a for a in live if a.kind == "coordinator"]
            if coords:
                self._kill(rng.choice(coords))
        elif event == 5:
            self._crash(rng.choice([a for a in self.acceptors if a.up]))
        elif event == 6:
            self._restart(rng.choice(down))
        elif event == 7:
            self._wipe(rng.choice(self.acceptors))
        else:
            rng.choice(self.acceptors).flush()

    def _pop(self, rng: random.Random) -> Msg:
        i = rng.randrange(len(self.network))
        for _ in range(3):
            if self.network[i].actor != self.laggard or rng.random() < 0.1:
                break
            i = rng.randrange(len(self.network))
        return self.network.pop(i)

    def _drop(self, rng: random.Random) -> None:
        msg = self._pop(rng)
        self._log("lost", msg.kind, msg.body, "of actor", msg.actor)

    def _duplicate(self, rng: random.Random) -> None:
        msg = rng.choice(self.network)
        # A registration is sent once (see the core), and a PREPARE TRANSACTION is
        # not repeated by a connection; any other statement or answer may be.
        if msg.kind == "ptx" or (msg.kind == "acc" and msg.body[0] == "register"):
            return
        self.network.append(Msg(msg.kind, msg.actor, msg.rid, msg.target, msg.body))

    def _poke(self, actor: Actor) -> None:
        if actor.state == "ready":
            self._run(actor)
        # Stop waiting: surely once every answer is in, else now and then (a timeout).
        elif actor.state == "waiting" and (
            len(actor.inbox) >= actor.expected or self.rng.random() < self.impatience
        ):
            self._resume(actor)

    def _kill(self, actor: Actor) -> None:
        actor.state = "dead"
        actor.gen.close()
        self._log("KILL", actor.name)

    def _crash(self, acc: SimAcceptor) -> None:
        lost = acc.crash()
        self.network = [m for m in self.network if not (m.kind == "acc" and m.target == acc.index)]
        self._log("CRASH acceptor", acc.incarnation, "lost registrations", lost)

    def _restart(self, acc: SimAcceptor) -> None:
        acc.up = True
        self._log("RESTART acceptor", acc.incarnation)

    def _wipe(self, acc: SimAcceptor) -> None:
        old = acc.incarnation
        acc.wipe()
        self.wipes += 1
        self.network = [m for m in self.network if not (m.kind == "acc" and m.target == acc.index)]
        for txn in self.txns.values():
            if txn.voters is not None and old in txn.voters:
                txn.wiped_voters.add(old)
        self._log("WIPE acceptor", old, "->", acc.incarnation)

    def _heal(self) -> None:
        """Everything comes back; no more faults; one recovery process finishes the rest."""
        self.healing = True
        for acc in self.acceptors:
            acc.up = True
        for actor in self.actors:
            if actor.kind == "recovery" and actor.state in ("ready", "waiting"):
                self._kill(actor)
        healer = self._spawn("healer", "healer",
                             self._recovery(Proposer(2**32 - 1), grace=0, idle_grace=0))
        self._run(healer)
        for _ in range(20000):
            self.now += 1
            if self.network:
                self._deliver(self.network.pop(0))
                continue
            live = [a for a in self.actors if a.state in ("ready", "waiting")]
            others = [a for a in live if a is not healer]
            if not others and healer.idle_passes >= 2:
                return
            for actor in live:
                if actor.state == "ready":
                    self._run(actor)
                else:
                    self._resume(actor)
        self.fail("healing did not finish within 20000 steps")

    def _check_end(self) -> None:
        for txid, txn in self.txns.items():
            states = {b.state for b in txn.branches.values()}
            committed = "committed" in states
            rolled_back = any(b.state == "rolled back" and b.was_prepared
                              for b in txn.branches.values())
            if committed and rolled_back:
                self.fail(f"atomicity: {txid} ended with branches {states}")
            if txn.report == "committed" and rolled_back:
                self.fail(f"{txid}: the coordinator said committed but a branch rolled back")
            if txn.report == "aborted" and committed:
                self.fail(f"{txid}: the coordinator said aborted but a branch committed")
            current = {a.incarnation for a in self.acceptors}
            if txn.voters is not None:  # a voter may be wiped while its answer is in flight
                txn.wiped_voters.update(i for i in txn.voters.incarnations if i not in current)
            if "prepared" in states:
                if not txn.wiped_voters:
                    self.fail(f"liveness: {txid} still has prepared branches after healing "
                              f"although none of its voters was wiped: {states}")
                self.stats.undecided_after_healing += 1
                continue
            if committed:
                self.stats.commits += 1
            else:
                self.stats.aborts += 1
            leftovers = [a.incarnation for a in self.acceptors if txid in a.slots]
            if leftovers:
                self.fail(f"cleanup: {txid} is finished but slots remain on {leftovers}")


# -- helpers --------------------------------------------------------------------------------


def _op(request: Request) -> Op:
    if request.op == "read":
        return ("read", request.txid)
    if request.op == "prepare":
        return ("prepare", request.txid, request.ballot)
    if request.op == "accept":
        return ("accept", request.txid, request.ballot, request.value)
    if request.op == "forget":
        return ("forget", [request.txid], request.keep_commit, 0)
    raise AssertionError(request.op)


def _single(raw: Mapping[str, Mapping[str, Reply]], txid: str) -> dict[str, Reply]:
    return {inc: body[txid] for inc, body in raw.items() if txid in body}


def _pick(weights: tuple[float, ...], x: float) -> int:
    """The index whose share of the cumulated ``weights`` holds ``x``."""
    for i, w in enumerate(weights):
        if x < w:
            return i
        x -= w
    return len(weights) - 1


def _fmt(part: Any) -> str:
    """A trace item, short: an acceptor request, a reply map, or anything else."""
    if isinstance(part, tuple):  # ("prepare", txid, ballot) …
        return " ".join(map(str, part))
    if isinstance(part, dict):
        return ", ".join(
            f"{k}:{v.status}{'' if v.slot is None else ' ' + _slot(v.slot)}"
            if isinstance(v, Reply) else f"{k}:{_slot(v[0]) if isinstance(v, tuple) else v}"
            for k, v in part.items()
        )
    return str(part)


def _slot(s: Slot) -> str:
    acc = "" if s.accepted_value is None else f" {s.accepted_value}@{s.accepted_ballot}"
    return f"[p{s.promised}{acc}]"


def run_many(
    schedules: int, seed: int, *, simulation: type[Simulation] = Simulation
) -> Stats:
    """Run ``schedules`` schedules with seeds ``seed, seed+1, …``; the first failure raises."""
    total = Stats(schedules=0)
    for i in range(schedules):
        stats = simulation(seed + i).run()
        total.schedules += 1
        total.events += stats.events
        total.commits += stats.commits
        total.aborts += stats.aborts
        total.undecided_after_healing += stats.undecided_after_healing
        total.preemptions += stats.preemptions
    return total

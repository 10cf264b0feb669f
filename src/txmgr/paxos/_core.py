"""Paxos Commit's decision as pure rules: ballots, the acceptor's slot, the proposers.

Nothing here does I/O. The SQL acceptor (:mod:`txmgr.paxos._acceptor`) runs
each rule of :class:`AcceptorRules` as one conditional statement; the
simulation (:mod:`txmgr.paxos._sim`) applies the same rules to slots in
memory; both are driven by the same proposer generators (:class:`Proposer`).
What the simulation checks is what runs, and a test runs random sequences of
operations against both acceptors and compares them.

The protocol
------------

One instance of single-decree Paxos per global transaction ``T`` over the N
configured acceptor databases (N odd, q = N // 2 + 1). An acceptor keeps one
*slot* per txid: ``(promised, accepted_ballot, accepted_value)``. A value is
``commit`` (naming the participants whose branches were prepared) or ``abort``.

1. *Registration* (the coordinator, before any PREPARE of T): every acceptor
   is asked to create T's slot ``(promised 0, nothing accepted)``. A busy
   coordinator registers txids ahead, many per statement, and a transaction
   takes one when it is about to prepare (``PaxosLog.take``); a txid is
   handed out once, and one that waited too long is deleted unused. The
   acceptors that answer "created" are T's *voters*; unless q of them
   answer, nothing is prepared and T aborts. Voters are named by their
   *incarnation* (below) and written, with q, into every branch's gid, so
   whoever finds a prepared branch knows T's voters and quorum.
2. *Ballot 0* (the coordinator, once every branch is prepared): phase 2 with
   ballot 0 and ``commit`` on the voters, without phase 1: only T's coordinator
   uses ballot 0, and only for that one value. q accepts: commit is chosen.
3. *Any proposer* (recovery, or a coordinator that did not get q accepts):
   ballot b = (round, proposer id) above any seen; phase 1 on the voters; with
   q promises, propose the value accepted at the highest ballot among them, or
   ``abort`` if none; phase 2; q accepts: chosen.
4. *Learning*: a value is chosen once q voters accepted it at one ballot; a plain
   read of the slots shows it without writing anything.
5. *Forgetting*: slots are deleted once their transaction is finished.

Acceptor rules, each a conditional update of one row:

- ``register``: create the slot if there is none (else "rejected");
- ``prepare(b)``, b > 0: if b > promised, promised := b; reply what was accepted;
- ``accept(b, v)``: if b >= promised, promised := b and accepted := (b, v);
- ``forget``: delete the slot (with ``keep_commit``: unless it holds an accepted commit).

``prepare`` and ``accept`` answer "gone" when there is no slot: they never
create one. Only registration does, and it is sent once, before any branch is
prepared. So once a voter's slot for T is gone it stays gone. (This is why
there is a registration at all: were ballot 0 allowed to create the slot, a
ballot-0 statement delayed on the network past the deletion of a finished,
aborted transaction would bring it back with commit accepted.)

Why it is safe
--------------

Classic Paxos: once a value is chosen at ballot b, every proposal at a higher
ballot carries that value, so at most one value is ever chosen. The proof needs
(a) one value per ballot, (b) any two quorums intersect, (c) no acceptor
forgets a promise or an acceptance it replied. Here:

(a) Ballot 0 is T's coordinator's, with one value. A recovery ballot packs
    (round << 32 | proposer id). Proposer ids are random and may collide; that is
    harmless because phase 1 promises only *strictly* higher ballots, so a voter
    promises a given ballot at most once and at most one proposer can collect a
    quorum of promises for it (so uniqueness of ids is not a safety assumption).
(b) Quorums are q of T's voters; two intersect since 2q > N >= |voters|.
(c) Every promise and acceptance is committed with ``synchronous_commit = on``
    before its reply. State is lost in three ways, each made harmless:

    - *Wipe* (the database lost and re-created empty, or the DSN pointed at
      another database): each acceptor database has an incarnation, a random
      id created with its tables; every reply carries it, and a proposer counts
      only replies whose incarnation is one of T's voters. A re-created
      acceptor is a new acceptor that is nobody's voter for older
      transactions: for them it is a crashed acceptor that never returns,
      which Paxos tolerates. (This is why voters are fixed at registration.)
    - *Asynchronous registration.* Registration is committed with
      ``synchronous_commit = off`` (it is on the critical path of the vote).
      Losing one in a crash is a deletion of a slot holding nothing — the
      first promise or acceptance on that server flushes it — i.e. rule D1.
    - *Deletion.* A voter whose slot is gone never promises or accepts for T
      again: for T it is a crashed acceptor, which keeps (c). The one new
      inference is the lemma below.

Deleting a slot (always with ``synchronous_commit = on``) is allowed when:

- D1: it holds no accepted commit — at any time; the DELETE tests that
  atomically, so a commit accepted a moment earlier wins;
- D2: every branch of T is committed;
- D3: commit can no longer be chosen: abort is chosen, or more than
  ``|voters| - q`` voters are gone.

*Lemma (forgotten).* If more than ``|voters| - q`` voters of T are gone (so
fewer than q can ever accept again), then commit is not chosen and never will
be, or T is finished (every branch committed). Proof: "never will be" is
plain. Suppose commit was chosen by a quorum Q. Q (q voters) and the gone
voters (more than ``|voters| - q``) meet in some Y that accepted commit and
later lost its slot while holding commit (once commit is chosen, every higher
proposal is commit). Not by D1, nor by a lost registration (the acceptance
was durable and flushed it). By D2: T is finished. Not by D3 through abort
(one value is chosen). Through the gone voters: take the first member of Q
deleted that way; the voters gone at that moment are all outside Q, so they
are at most ``|voters| - q``, a contradiction. ∎

So "forgotten" means: roll back whatever of T is still prepared. If T had
committed, nothing of it is prepared: every branch was prepared before ballot
0 was sent, so no PREPARE can land later. (With three voters that takes two
gone; with two voters — one log database was down at registration — one.)

*Validity.* ``commit`` enters only at ballot 0, sent after every branch
prepared; higher ballots only re-propose accepted values. Commit is chosen only
if every branch was prepared, and the value names the participants.

*Late messages.* A statement may reach an acceptor long after it was sent (a
slow link, a connection the coordinator gave up on). ``prepare``, ``accept``
and ``forget`` are safe whenever they arrive. A late registration can only be
one that was not answered, i.e. to a non-voter: its slot counts for nobody and
is cleaned up. Registration is never re-sent.

Liveness (never safety) uses time: recovery preempts a coordinator only after
a grace period, and slots of unfinished-looking transactions are cleaned up only
after one. Things an operator must not do: restore an acceptor from a backup
(it would come back with its old incarnation and forgotten promises; re-create
it empty instead) or delete rows by hand.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "ABORT",
    "BALLOT0",
    "MAX_ACCEPTORS",
    "AcceptorRules",
    "Cleanup",
    "Outcome",
    "Proposer",
    "Reply",
    "Request",
    "Slot",
    "Steps",
    "Value",
    "Voters",
    "ballot",
    "ballot_proposer",
    "ballot_round",
    "check_incarnation",
    "names_known",
    "next_ballot",
    "plan_cleanup",
    "quorum_of",
    "registered_voters",
]

#: The coordinator's ballot: phase 2 without phase 1, value ``commit`` only.
BALLOT0 = 0
_ROUND_SHIFT = 32
_MAX_ROUND = 2**31 - 1  # ballots stay below 2**63 (a bigint)
_MAX_PROPOSER = 2**32 - 1
#: At most this many acceptors: their incarnations must fit in a gid (200 bytes).
MAX_ACCEPTORS = 9
_INCARNATION = re.compile(r"[0-9a-f]{12}")


def ballot(round_: int, proposer: int) -> int:
    """The ballot ``(round, proposer)``, ordered lexicographically, as one integer."""
    if not 0 <= round_ <= _MAX_ROUND:
        raise ValueError(f"ballot round {round_} out of range 0..{_MAX_ROUND}")
    if not 0 <= proposer <= _MAX_PROPOSER:
        raise ValueError(f"proposer id {proposer} out of range 0..{_MAX_PROPOSER}")
    return (round_ << _ROUND_SHIFT) | proposer


def ballot_round(b: int) -> int:
    return b >> _ROUND_SHIFT


def ballot_proposer(b: int) -> int:
    return b & _MAX_PROPOSER


def next_ballot(above: int, proposer: int) -> int:
    """A ballot of ``proposer`` higher than ``above`` (and than ballot 0)."""
    return ballot(ballot_round(above) + 1, proposer)


def quorum_of(acceptors: int) -> int:
    """The majority of ``acceptors``."""
    return acceptors // 2 + 1


def check_incarnation(incarnation: str) -> str:
    if not _INCARNATION.fullmatch(incarnation):
        raise ValueError(f"invalid acceptor incarnation {incarnation!r}: expected 12 hex digits")
    return incarnation


@dataclass(frozen=True, slots=True)
class Value:
    """What a transaction's Paxos instance decides."""

    kind: Literal["commit", "abort"]
    participants: tuple[str, ...] = ()  # commit: every participant with a prepared branch

    def __post_init__(self) -> None:
        if self.kind == "abort" and self.participants:
            raise ValueError("an abort value names no participants")
        if self.kind == "commit" and not self.participants:
            raise ValueError("a commit value names the participants it commits")

    @classmethod
    def commit(cls, participants: Iterable[str]) -> Value:
        """The commit of these participants' branches (in one canonical order)."""
        return cls("commit", tuple(sorted(set(participants))))

    def __str__(self) -> str:
        return f"commit({','.join(self.participants)})" if self.kind == "commit" else "abort"


ABORT = Value("abort")


@dataclass(frozen=True, slots=True)
class Slot:
    """One acceptor's state for one transaction (a row of ``txmgr_paxos``)."""

    promised: int = 0
    accepted_ballot: int | None = None
    accepted_value: Value | None = None

    @property
    def holds_commit(self) -> bool:
        return self.accepted_value is not None and self.accepted_value.kind == "commit"


Status = Literal["ok", "rejected", "gone"]


@dataclass(frozen=True, slots=True)
class Reply:
    """An acceptor's answer: ``ok`` (done), ``rejected`` (not done), ``gone`` (no slot).

    ``slot`` is the slot after the operation (None when there is none).
    """

    status: Status
    slot: Slot | None = None


class AcceptorRules:
    """The acceptor, as conditional updates of one slot (None: no slot).

    Each returns ``(new slot, reply)``. The SQL acceptor implements each one as a
    single statement; subclasses in the tests break a rule on purpose to show
    the simulation notices.
    """

    def register(self, slot: Slot | None) -> tuple[Slot | None, Reply]:
        if slot is None:
            new = Slot()
            return new, Reply("ok", new)
        return slot, Reply("rejected", slot)

    def prepare(self, slot: Slot | None, b: int) -> tuple[Slot | None, Reply]:
        if b <= BALLOT0:
            raise ValueError("phase 1 needs a ballot above 0 (ballot 0 is the coordinator's)")
        if slot is None:
            return None, Reply("gone")
        if b > slot.promised:
            new = replace(slot, promised=b)
            return new, Reply("ok", new)
        return slot, Reply("rejected", slot)

    def accept(self, slot: Slot | None, b: int, value: Value) -> tuple[Slot | None, Reply]:
        if slot is None:
            return None, Reply("gone")
        if b >= slot.promised:
            new = Slot(b, b, value)
            return new, Reply("ok", new)
        return slot, Reply("rejected", slot)

    def forget(self, slot: Slot | None, *, keep_commit: bool) -> tuple[Slot | None, Reply]:
        if slot is None:
            return None, Reply("gone")
        if keep_commit and slot.holds_commit:
            return slot, Reply("rejected", slot)
        return None, Reply("ok")

    def read(self, slot: Slot | None) -> Reply:
        return Reply("gone") if slot is None else Reply("ok", slot)


@dataclass(frozen=True, slots=True)
class Voters:
    """The acceptors (by incarnation) that registered a transaction, and its quorum."""

    quorum: int
    incarnations: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.incarnations)
        for inc in self.incarnations:
            check_incarnation(inc)
        if len(set(self.incarnations)) != n:
            raise ValueError("voters must be distinct acceptors")
        if not 1 <= n <= MAX_ACCEPTORS:
            raise ValueError(f"a transaction has 1 to {MAX_ACCEPTORS} voters, not {n}")
        # Any two quorums must meet, and a quorum must be possible.
        if not (self.quorum <= n < 2 * self.quorum):
            raise ValueError(f"quorum {self.quorum} does not fit {n} voters")

    def __contains__(self, incarnation: object) -> bool:
        return incarnation in self.incarnations

    def __len__(self) -> int:
        return len(self.incarnations)


def registered_voters(replies: Mapping[str, Reply], acceptors: int) -> Voters | None:
    """T's voters from the registration replies (by incarnation), or None without a quorum.

    ``acceptors`` is the number of configured acceptor databases.
    """
    q = quorum_of(acceptors)
    ok = sorted(inc for inc, r in replies.items() if r.status == "ok")
    if len(ok) < q:
        return None
    return Voters(q, tuple(ok))


# -- what a proposer asks, and what it concludes ---------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One round of a proposer: ask every acceptor the same thing about ``txid``.

    ``pause`` asks the driver to wait a little (dueling proposers) and gets no reply.
    """

    op: Literal["read", "prepare", "accept", "forget", "pause"]
    txid: str
    ballot: int = BALLOT0
    value: Value | None = None
    keep_commit: bool = True  # forget: leave slots that hold an accepted commit


Decision = Literal["commit", "abort", "forgotten", "undecided"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a proposer learned about a transaction.

    - ``commit`` / ``abort``: that value is chosen (``value``, at ``ballot``);
    - ``forgotten``: so many voters have no slot that commit can never be chosen
      (or all is committed already): roll back whatever is still prepared (see
      the lemma in the module docstring);
    - ``undecided``: nothing is known yet (too few acceptors answered, the
      coordinator is still deciding, or proposers dueled); ask again later.
    """

    decision: Decision
    value: Value | None = None
    ballot: int | None = None
    detail: str = ""

    @property
    def commits(self) -> bool:
        """Commit is chosen: commit every branch."""
        return self.decision == "commit"

    @property
    def rolls_back(self) -> bool:
        """Abort is chosen, or the transaction is forgotten: roll back what is prepared."""
        return self.decision in ("abort", "forgotten")


#: A proposer's run: yields requests, receives the replies by incarnation.
Steps = Generator[Request, Mapping[str, Reply], Outcome]


@dataclass(frozen=True, slots=True)
class _Count:
    ok: list[Slot]  # slots of the voters that answered ok
    gone: int
    answered: int  # voters that answered at all
    highest: int  # the highest promise seen
    commit_seen: bool


def _count(voters: Voters, replies: Mapping[str, Reply]) -> _Count:
    ok: list[Slot] = []
    gone = answered = highest = 0
    commit_seen = False
    for inc, reply in replies.items():
        if inc not in voters:  # a wiped acceptor, or not registered: not T's acceptor
            continue
        answered += 1
        if reply.status == "gone":
            gone += 1
            continue
        slot = reply.slot
        if slot is None:
            continue
        highest = max(highest, slot.promised)
        commit_seen = commit_seen or slot.holds_commit
        if reply.status == "ok":
            ok.append(slot)
    return _Count(ok, gone, answered, highest, commit_seen)


def _chosen(voters: Voters, slots: Iterable[Slot]) -> tuple[int, Value] | None:
    """The (ballot, value) that q of these voters' slots accepted, if any."""
    tally: dict[tuple[int, Value], int] = {}
    for s in slots:
        if s.accepted_ballot is not None and s.accepted_value is not None:
            key = (s.accepted_ballot, s.accepted_value)
            tally[key] = tally.get(key, 0) + 1
            if tally[key] >= voters.quorum:
                return key
    return None


class Proposer:
    """A proposer with its own id: T's coordinator, or a recovery process.

    ``rounds`` bounds the phase-1 attempts of one call; a proposer that keeps
    being outbid returns ``undecided`` and is asked again on the next pass.
    """

    def __init__(self, proposer_id: int, *, rounds: int = 3) -> None:
        if not 0 <= proposer_id <= _MAX_PROPOSER:
            raise ValueError(f"proposer id {proposer_id} out of range 0..{_MAX_PROPOSER}")
        self.id = proposer_id
        self.rounds = rounds

    def choose(self, promises: Sequence[Slot]) -> Value:
        """The value to propose after a quorum of promises: the one accepted at the
        highest ballot among them, else abort (only ballot 0 introduces commit)."""
        best: Slot | None = None
        for s in promises:
            if s.accepted_ballot is not None and (
                best is None or best.accepted_ballot is None
                or s.accepted_ballot > best.accepted_ballot
            ):
                best = s
        if best is None or best.accepted_value is None:
            return ABORT
        return best.accepted_value

    def commit(self, txid: str, voters: Voters, value: Value) -> Steps:
        """The coordinator: ballot 0 with ``value`` (commit), then learn if it was not enough."""
        if value.kind != "commit":
            raise ValueError("the coordinator proposes commit only: abort needs no write")
        replies = yield Request("accept", txid, BALLOT0, value)
        if len(_accepted(voters, replies, BALLOT0, value)) >= voters.quorum:
            return Outcome("commit", value, BALLOT0, "chosen at ballot 0")
        # Preempted, or too few answered: the replies carry the slots they saw.
        known = settled(voters, replies)
        if known is not None:
            return known
        outcome = yield from self._decide(txid, voters, _count(voters, replies).highest)
        return outcome

    def learn(self, txid: str, voters: Voters) -> Steps:
        """Read the voters' slots: chosen, forgotten, or undecided. Writes nothing."""
        replies = yield Request("read", txid)
        return settled(voters, replies) or Outcome("undecided", detail="not decided yet")

    def recover(self, txid: str, voters: Voters, *, preempt: bool) -> Steps:
        """Learn the outcome; with ``preempt``, decide it (phases 1 and 2) if nobody has.

        Without ``preempt`` this only reads (a coordinator may still be deciding).
        """
        replies = yield Request("read", txid)
        known = settled(voters, replies)
        if known is not None or not preempt:
            return known or Outcome("undecided", detail="not decided yet")
        outcome = yield from self._decide(txid, voters, _count(voters, replies).highest)
        return outcome

    def _decide(self, txid: str, voters: Voters, seen: int) -> Steps:
        """Phases 1 and 2 with ballots above ``seen``, until something is known."""
        for attempt in range(self.rounds):
            if attempt:
                yield Request("pause", txid)  # let a dueling proposer finish
            b = next_ballot(seen, self.id)
            replies = yield Request("prepare", txid, b)
            c = _count(voters, replies)
            if _lost(voters, c.gone):
                return _forgotten()
            seen = max(seen, c.highest)
            if len(c.ok) < voters.quorum:
                if c.gone and not c.commit_seen:  # some voters lost T for good
                    outcome = yield from self._forget_uncommitted(txid, voters)
                    return outcome
                if c.answered - c.gone < voters.quorum:
                    return Outcome("undecided", detail=_too_few(voters, c.answered - c.gone))
                continue  # outbid: try a higher ballot
            value = self.choose(c.ok)
            replies = yield Request("accept", txid, b, value)
            c2 = _count(voters, replies)
            if len(_accepted(voters, replies, b, value)) >= voters.quorum:
                return Outcome(value.kind, value, b, f"chosen at ballot {b}")
            if _lost(voters, c2.gone):
                return _forgotten()
            seen = max(seen, c2.highest)
            if c2.answered - c2.gone < voters.quorum:
                return Outcome("undecided", detail=_too_few(voters, c2.answered - c2.gone))
        return Outcome("undecided", detail="outbid by another proposer; try again later")

    def _forget_uncommitted(self, txid: str, voters: Voters) -> Steps:
        """Some voters are gone, a quorum of promises is missing, and no commit is in
        sight: abort by forgetting — delete the slots that hold no commit (D1; a
        commit accepted meanwhile wins) — if that leaves too few voters to ever
        choose commit. Else wait: the missing voters may come back."""
        replies = yield Request("forget", txid, keep_commit=True)
        if _lost(voters, _count(voters, replies).gone + _deleted(voters, replies)):
            return _forgotten()
        return Outcome("undecided", detail="too few of its log databases answered")


def settled(voters: Voters, replies: Mapping[str, Reply]) -> Outcome | None:
    """What reads (or any replies carrying slots) already show: chosen or forgotten."""
    c = _count(voters, replies)
    chosen = _chosen(voters, (r.slot for inc, r in replies.items()
                              if inc in voters and r.slot is not None))
    if chosen is not None:
        b, value = chosen
        return Outcome(value.kind, value, b, f"chosen at ballot {b}")
    if _lost(voters, c.gone):
        return _forgotten()
    return None


def _lost(voters: Voters, gone: int) -> bool:
    """Are so many voters gone that fewer than a quorum could ever accept again?"""
    return gone > len(voters) - voters.quorum


def _accepted(voters: Voters, replies: Mapping[str, Reply], b: int, value: Value) -> list[Slot]:
    return [
        r.slot for inc, r in replies.items()
        if inc in voters and r.status == "ok" and r.slot is not None
        and r.slot.accepted_ballot == b and r.slot.accepted_value == value
    ]


def _deleted(voters: Voters, replies: Mapping[str, Reply]) -> int:
    """Voters whose forget reply says it deleted the slot (it is gone now)."""
    return sum(1 for inc, r in replies.items()
               if inc in voters and r.status == "ok" and r.slot is None)


def _forgotten() -> Outcome:
    return Outcome("forgotten", detail="too many of its log databases no longer have it for "
                   "commit ever to be chosen: roll back what is still prepared")


def _too_few(voters: Voters, answered: int) -> str:
    return (f"only {answered} of its {len(voters)} log databases answered, "
            f"{voters.quorum} are needed")


# -- cleanup of finished transactions ----------------------------------------------


def names_known(value: Value | None, known: Iterable[str]) -> bool:
    """The cleanup rule: the slots of a transaction whose value is ``value`` (None:
    nothing accepted) may be deleted by a recoverer that saw nothing of it
    prepared on the participants ``known`` only if every participant the value
    names is among them. A commit names its participants; one this recoverer
    does not know (another application sharing the log databases) may still
    have its branch prepared, and without the slots it would be rolled back
    as forgotten. Abort names nobody: its slots may go (D3)."""
    return value is None or set(value.participants) <= set(known)


@dataclass(frozen=True, slots=True)
class Cleanup:
    """Slots to delete: ``finished`` everywhere (D2/D3), ``idle`` unless they hold a commit (D1)."""

    finished: frozenset[str]
    idle: frozenset[str]


def plan_cleanup(
    slots: Mapping[str, Sequence[tuple[Slot, float]]],
    prepared: Iterable[str],
    answered: Iterable[str],
    *,
    grace: float,
) -> Cleanup:
    """Which slots of transactions with nothing prepared can go.

    ``slots``: txid -> (slot, age in seconds) on each acceptor that has one, read
    *before* ``prepared`` (the txids with a branch still prepared) was listed on
    the participants in ``answered``. A slot holding commit means every branch
    was prepared before it was written, so if none is prepared now on the
    participants that commit names, every branch is finished (D2, or D3 if they
    were rolled back). Other slots go once older than ``grace`` (D1; the grace
    only spares transactions whose coordinator is still at work).
    """
    busy = set(prepared)
    ok = set(answered)
    finished: set[str] = set()
    idle: set[str] = set()
    for txid, found in slots.items():
        if txid in busy or not found:
            continue
        commits = [s.accepted_value for s, _ in found
                   if s.holds_commit and s.accepted_value is not None]
        if commits:
            if all(names_known(v, ok) for v in commits):
                finished.add(txid)
        elif min(age for _, age in found) >= grace:
            idle.add(txid)
    return Cleanup(frozenset(finished), frozenset(idle))

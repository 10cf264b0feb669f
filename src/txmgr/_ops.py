"""The I/O requests of the commit protocol: what a front end must do for it.

The protocol (:mod:`txmgr._protocol`) is written as generators that yield
these small values and receive the results, so that it contains no I/O and
one implementation serves both front ends: :class:`txmgr.Transaction` performs
each request with blocking calls, :class:`txmgr.AsyncTransaction` awaits it.
A request that fails is thrown back into the generator at its ``yield``, so
the protocol handles errors exactly as if it had made the call itself.

A request without a result is yielded as is (``yield Run(jobs)``); one with
a result goes through its helper below, so that the result is typed:
``conn = yield from checkout("orders")`` reads like the call it stands for.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from txmgr._branch import AnyBranchConnection
from txmgr._multiplex import AnyConnection, Job
from txmgr.log import XactStatus

if TYPE_CHECKING:
    from txmgr._verdict import Verdict
    from txmgr.paxos._core import Outcome, Voters

__all__ = [
    "Checkout",
    "Forget",
    "LogConnection",
    "Op",
    "PaxosPropose",
    "PaxosRegister",
    "ReadDecision",
    "Release",
    "ReleaseLog",
    "Run",
    "Sleep",
    "Step",
    "TakeVerdict",
    "checkout",
    "log_connection",
    "paxos_propose",
    "paxos_register",
    "read_decision",
    "take_verdict",
]

T = TypeVar("T")


@dataclass(slots=True)
class Run:
    """Send every job's query, then collect every answer (:func:`txmgr._multiplex.run_all`).

    The front end bounds the wait by ``step_timeout`` and, until the commit
    point, by the transaction's deadline (``TransactionCore.run_deadline``).
    """

    jobs: Sequence[Job]


@dataclass(slots=True)
class Checkout:
    """A pooled connection of the participant (autocommit, idle) -> the connection."""

    participant: str


@dataclass(slots=True)
class Release:
    """Give a participant's connection back to its pool."""

    participant: str
    conn: AnyBranchConnection


@dataclass(slots=True)
class LogConnection:
    """A pooled connection to the dedicated log database -> the connection.

    ``wait=False``: only an idle pooled one will do, else ParticipantUnavailable.
    """

    wait: bool


@dataclass(slots=True)
class ReleaseLog:
    """Give a dedicated log connection back to its pool."""

    conn: AnyConnection


@dataclass(slots=True)
class ReadDecision:
    """Ask the log, on a fresh connection, what became of one decision ->
    (status of ``lxid``, whether ``txid``'s decision row exists)."""

    lxid: int
    txid: str


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Forget:
    """These decisions are finished: delete their rows later (or now, if many wait)."""

    txids: list[str]


@dataclass(slots=True)
class PaxosRegister:
    """A txid registered on the Paxos log's databases -> (txid, its voters)
    (:meth:`txmgr.PaxosLog.take`; raises LogQuorumUnavailable)."""


@dataclass(slots=True)
class PaxosPropose:
    """Every branch is prepared: propose commit -> the Outcome
    (:meth:`txmgr.PaxosLog.propose_commit`)."""

    txid: str
    voters: Voters
    participants: list[str]


@dataclass(slots=True)
class TakeVerdict:
    """Ask the decision log whether the deadlock detector cancelled ``txid`` ->
    its :class:`txmgr._verdict.Verdict` (deleted), or None."""

    txid: str


Op: TypeAlias = (
    Run | Checkout | Release | LogConnection | ReleaseLog | ReadDecision | Sleep | Forget
    | PaxosRegister | PaxosPropose | TakeVerdict
)

#: A protocol step: yields requests, receives their results, returns a ``T``.
Step: TypeAlias = Generator[Op, Any, T]


def checkout(participant: str) -> Step[AnyBranchConnection]:
    conn: AnyBranchConnection = yield Checkout(participant)
    return conn


def log_connection(*, wait: bool) -> Step[AnyConnection]:
    conn: AnyConnection = yield LogConnection(wait)
    return conn


def read_decision(lxid: int, txid: str) -> Step[tuple[XactStatus, bool]]:
    answer: tuple[XactStatus, bool] = yield ReadDecision(lxid, txid)
    return answer


def paxos_register() -> Step[tuple[str, Voters]]:
    registered: tuple[str, Voters] = yield PaxosRegister()
    return registered


def paxos_propose(txid: str, voters: Voters, participants: list[str]) -> Step[Outcome]:
    outcome: Outcome = yield PaxosPropose(txid, voters, participants)
    return outcome


def take_verdict(txid: str) -> Step[Verdict | None]:
    verdict: Verdict | None = yield TakeVerdict(txid)
    return verdict

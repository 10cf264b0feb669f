"""One global transaction, driven with blocking calls.

The commit protocol itself is :mod:`txmgr._protocol` (generators that yield
I/O requests, see :mod:`txmgr._ops`); :class:`Transaction` performs each
request on the calling thread. :class:`txmgr.AsyncTransaction` drives the
same protocol on an event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol, TypeVar, cast

import psycopg

from txmgr import _protocol
from txmgr._branch import BranchConnection
from txmgr._deadline import Reaper, Timer, cancel_jobs, expire_sync
from txmgr._multiplex import run_all
from txmgr._ops import (
    Checkout,
    Forget,
    LogConnection,
    Op,
    PaxosPropose,
    PaxosRegister,
    ReadDecision,
    Release,
    ReleaseLog,
    Run,
    Sleep,
    Step,
    TakeVerdict,
)
from txmgr._protocol import TransactionCore, TransactionState
from txmgr._verdict import Verdict
from txmgr.log import XactStatus
from txmgr.participant import Participant
from txmgr.paxos._log import PaxosLog

__all__ = ["CONFIRM_PATIENCE", "Transaction", "TransactionState"]

#: Seconds to keep asking the log about a decision whose COMMIT reply was lost
#: while its server-side session is still winding down ("in progress"). Both
#: front ends read it here, at commit time.
CONFIRM_PATIENCE = 5.0

T = TypeVar("T")


class _Manager(_protocol.Coordinator, Protocol):
    """What the blocking front end needs from its manager (no import cycle)."""

    def participant(self, name: str) -> Participant: ...
    def log_connection(self, *, wait: bool = True) -> psycopg.Connection[Any]: ...
    def release_log_connection(self, conn: psycopg.Connection[Any]) -> None: ...
    def read_decision(self, lxid: int, txid: str) -> tuple[XactStatus, bool]: ...
    def forget(self, txids: Iterable[str]) -> None: ...
    def paxos(self) -> PaxosLog: ...
    def reaper(self) -> Reaper: ...
    def take_verdict(self, txid: str) -> Verdict | None: ...


class Transaction:
    """A global transaction over any subset of the manager's participants.

    Not thread-safe: one thread drives one transaction (the manager is shared).
    """

    __slots__ = ("_core", "_timer", "_tm")

    def __init__(self, tm: _Manager, timeout: float | None = None) -> None:
        self._tm = tm
        self._core = _protocol.TransactionCore(tm, timeout)
        self._timer: Timer | None = None  # the deadline's, armed with the first branch

    @property
    def txid(self) -> str:
        """The global transaction id (in Paxos mode, final once commit() registers it)."""
        return self._core.txid

    def __repr__(self) -> str:
        core = self._core
        return f"<Transaction {self.txid} {core.state.value} {sorted(core.branches)}>"

    @property
    def state(self) -> TransactionState:
        """Where the transaction stands: active, committed, rolled back, …"""
        return self._core.state

    def connection(self, name: str) -> psycopg.Connection[Any]:
        """The psycopg connection of ``name``'s branch, opening the branch on first use."""
        core = self._core
        core.require(TransactionState.ACTIVE, "connection()")
        branch = core.branches.get(name)
        if branch is None:
            if self._timer is None and core.deadline is not None:
                self._timer = self._tm.reaper().schedule(
                    core.deadline, lambda: expire_sync(core)
                )
            branch = _drive(self._tm, core.open_branch(name), core)
        return cast("psycopg.Connection[Any]", branch.conn)  # a string: no runtime cost

    def commit(self) -> None:
        """Commit every branch atomically (called by the ``with`` block on success)."""
        try:
            _drive(self._tm, self._core.commit(patience=CONFIRM_PATIENCE), self._core)
        finally:
            self._disarm()

    def rollback(self) -> None:
        """Roll back every branch (called by the ``with`` block on an exception)."""
        try:
            _drive(self._tm, self._core.rollback(), self._core)
        finally:
            self._disarm()

    def explain(self, error: BaseException) -> BaseException | None:
        """After a rollback because of ``error``: the txmgr error it stands for —
        :class:`~txmgr.errors.TransactionTimeout` past the deadline,
        :class:`~txmgr.errors.DeadlockDetected` for a statement the deadlock
        detector cancelled — or None. (The ``with`` block raises it for you.)"""
        return _drive(self._tm, self._core.explain(error), self._core)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            self.rollback()
            # A cancelled statement may have been the deadline or the deadlock
            # detector: then the application gets that error, caused by this one.
            better = self.explain(exc)
            if better is not None:
                raise better from exc
        elif self._core.state is TransactionState.ACTIVE:
            self.commit()


def _drive(tm: _Manager, step: Step[T], core: TransactionCore) -> T:
    """Run a protocol step to its end, performing each request it yields; a
    failed request is raised inside the step, where it was made."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = step.send(result) if error is None else step.throw(error)
        except StopIteration as stop:
            return cast(T, stop.value)
        result = error = None
        try:
            if type(op) is Run:  # most requests are: the cheapest test first
                timeout, cancel_after = _protocol.step_limit(tm.config.step_timeout, core)
                run_all(op.jobs, timeout=timeout, cancel_after=cancel_after, cancel=cancel_jobs)
            else:
                result = _perform(tm, op)
        except BaseException as e:  # KeyboardInterrupt too: the step cleans up
            error = e


def _perform(tm: _Manager, op: Op) -> Any:
    match op:
        case Checkout(name):
            return tm.participant(name).checkout()
        case Release(name, conn):
            tm.participant(name).release(cast(BranchConnection, conn))
        case LogConnection(wait):
            return tm.log_connection(wait=wait)
        case ReleaseLog(conn):
            tm.release_log_connection(cast("psycopg.Connection[Any]", conn))
        case ReadDecision(lxid, txid):
            return tm.read_decision(lxid, txid)
        case Sleep(seconds):
            time.sleep(seconds)
        case Forget(txids):
            tm.forget(txids)
        case TakeVerdict(txid):
            return tm.take_verdict(txid)
        case PaxosRegister() | PaxosPropose():
            return perform_paxos(tm, op)
    return None


def perform_paxos(tm: _Manager, op: PaxosRegister | PaxosPropose) -> Any:
    """A Paxos log request, as blocking calls (the PaxosLog is thread-safe: the
    asyncio front end runs this in a worker thread)."""
    match op:
        case PaxosRegister():
            return tm.paxos().take()
        case PaxosPropose(txid, voters, participants):
            # Finished transactions ride on the same statement (deleted there).
            forget = tm.take_forget()
            try:
                return tm.paxos().propose_commit(txid, voters, participants, forget=forget)
            except BaseException:
                tm.forget_later(forget)
                raise
    raise AssertionError(f"not a Paxos request: {op!r}")

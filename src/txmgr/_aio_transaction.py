"""One global transaction, driven on an asyncio event loop.

The same protocol as :class:`txmgr.Transaction` (:mod:`txmgr._protocol`);
here each request it yields is awaited: queries through the event loop's
readers (:func:`txmgr._multiplex.run_all_async`, one task, no threads),
connections from :class:`~psycopg_pool.AsyncConnectionPool`, pauses with
:func:`asyncio.sleep`. Asking the log about a lost COMMIT reply — rare — runs
the blocking helper of :mod:`txmgr.log` on a worker thread. So do the
requests of Paxos mode (registration, proposing commit): a worker thread runs
:func:`txmgr.transaction.perform_paxos`, the very function the blocking front
end calls, so both share one implementation and the loop stays free while a
round waits for a majority of the log databases. Cancelled there, the task
stops waiting, the thread finishes its round, and what it leaves prepared is
finished by recovery, as after a crash at that point.

Hooks and failpoints are called on the event loop's thread, so they must be
quick (a ``sleep`` failpoint stalls the loop, as it stalls a thread in sync
code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, Protocol, TypeVar, cast

import psycopg

from txmgr import _protocol
from txmgr import transaction as _sync_transaction
from txmgr._aio_participant import AsyncParticipant
from txmgr._branch import AsyncBranchConnection
from txmgr._deadline import cancel_jobs_async, expire_async
from txmgr._multiplex import run_all_async
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
from txmgr.paxos._log import PaxosLog

__all__ = ["AsyncTransaction"]

T = TypeVar("T")


class _AsyncManager(_protocol.Coordinator, Protocol):
    """What the asyncio front end needs from its manager (no import cycle)."""

    def participant(self, name: str) -> AsyncParticipant: ...
    async def check_log(self) -> None: ...
    async def log_connection(self, *, wait: bool = True) -> psycopg.AsyncConnection[Any]: ...
    async def release_log_connection(self, conn: psycopg.AsyncConnection[Any]) -> None: ...
    def read_decision(self, lxid: int, txid: str) -> tuple[XactStatus, bool]: ...
    async def forget(self, txids: Iterable[str]) -> None: ...
    def paxos(self) -> PaxosLog: ...
    def take_verdict(self, txid: str) -> Verdict | None: ...


class AsyncTransaction:
    """A global transaction over any subset of the manager's participants, for asyncio.

    Use it as ``async with tm.transaction() as tx:``. Not safe to share
    between tasks: one task drives one transaction (the manager is shared).
    """

    __slots__ = ("_core", "_expiry", "_timer", "_tm")

    def __init__(self, tm: _AsyncManager, timeout: float | None = None) -> None:
        self._tm = tm
        self._core = _protocol.TransactionCore(tm, timeout)
        # The deadline's timer (armed with the first branch) and the task it starts.
        self._timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.Task[None] | None = None

    @property
    def txid(self) -> str:
        """The global transaction id (in Paxos mode, final once commit() registers it)."""
        return self._core.txid

    def __repr__(self) -> str:
        core = self._core
        return f"<AsyncTransaction {self.txid} {core.state.value} {sorted(core.branches)}>"

    @property
    def state(self) -> TransactionState:
        """Where the transaction stands: active, committed, rolled back, …"""
        return self._core.state

    async def connection(self, name: str) -> psycopg.AsyncConnection[Any]:
        """The psycopg connection of ``name``'s branch, opening the branch on first use."""
        core = self._core
        core.require(TransactionState.ACTIVE, "connection()")
        branch = core.branches.get(name)
        if branch is None:
            await self._tm.check_log()  # the log is checked before the first branch
            if self._timer is None and core.deadline is not None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_at(
                    loop.time() + (core.deadline - time.monotonic()), self._expire
                )
            branch = await _drive(self._tm, core.open_branch(name), core)
        return cast("psycopg.AsyncConnection[Any]", branch.conn)

    async def commit(self) -> None:
        """Commit every branch atomically (called by the ``async with`` block on success)."""
        try:
            await _drive(
                self._tm, self._core.commit(patience=_sync_transaction.CONFIRM_PATIENCE),
                self._core,
            )
        finally:
            self._disarm()

    async def rollback(self) -> None:
        """Roll back every branch (called by the ``async with`` block on an exception)."""
        try:
            await _drive(self._tm, self._core.rollback(), self._core)
        finally:
            self._disarm()

    def _expire(self) -> None:
        self._expiry = asyncio.ensure_future(expire_async(self._core))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def __aenter__(self) -> AsyncTransaction:
        await self._tm.check_log()  # fail before any work when the log is unusable
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            await self.rollback()
            # The deadline, or the deadlock detector (see Transaction.__exit__).
            better = await _drive(self._tm, self._core.explain(exc), self._core)
            if better is not None:
                raise better from exc
        elif self._core.state is TransactionState.ACTIVE:
            await self.commit()


async def _drive(tm: _AsyncManager, step: Step[T], core: TransactionCore) -> T:
    """Run a protocol step to its end, awaiting each request it yields; a failed
    (or cancelled) request is raised inside the step, where it was made."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = step.send(result) if error is None else step.throw(error)
        except StopIteration as stop:
            return cast(T, stop.value)
        result = error = None
        try:
            result = await _perform(tm, op, core)
        except BaseException as e:  # CancelledError too: the step cleans up
            error = e


async def _perform(tm: _AsyncManager, op: Op, core: TransactionCore) -> Any:
    match op:
        case Run(jobs):
            timeout, cancel_after = _protocol.step_limit(tm.config.step_timeout, core)
            await run_all_async(jobs, timeout=timeout, cancel_after=cancel_after,
                                cancel=cancel_jobs_async)
        case Checkout(name):
            return await tm.participant(name).checkout()
        case Release(name, conn):
            await tm.participant(name).release(cast(AsyncBranchConnection, conn))
        case LogConnection(wait):
            return await tm.log_connection(wait=wait)
        case ReleaseLog(conn):
            await tm.release_log_connection(cast("psycopg.AsyncConnection[Any]", conn))
        case ReadDecision(lxid, txid):
            return await asyncio.to_thread(tm.read_decision, lxid, txid)
        case Sleep(seconds):
            await asyncio.sleep(seconds)
        case Forget(txids):
            await tm.forget(txids)
        case TakeVerdict(txid):
            return await asyncio.to_thread(tm.take_verdict, txid)
        case PaxosRegister() | PaxosPropose():
            # perform_paxos needs only paxos(), take_forget() and forget_later()
            # of its manager (this one has them; its annotation names the sync one).
            return await asyncio.to_thread(
                _sync_transaction.perform_paxos, cast(Any, tm), op
            )
    return None

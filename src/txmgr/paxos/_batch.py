"""Combining the ballot-0 accepts of concurrent transactions into one round.

Every commit in Paxos mode ends with a durable write on a majority of the log
databases. Transactions committing at the same moment on one coordinator
need not pay for one each: a thread that wants its accept sent while
``limit`` rounds are already in flight queues it, and the next thread to
start a round takes every queued accept with the same voters along — one
statement and one WAL flush per log database for all of them (group commit,
done by the proposer). A lone transaction goes at once, as before; a busy
coordinator's rounds fill up by themselves while the earlier ones are in
flight.

Safety does not change: each accept in a combined statement follows the
acceptor's rule on its own row, exactly as if the statements had been sent
one after the other (the simulation explores those orders); only the
coordinator's own ballot 0 is combined.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Combiner"]

T = TypeVar("T")
R = TypeVar("R")


class _Entry(Generic[T, R]):
    __slots__ = ("done", "error", "item", "key", "result", "taken")

    def __init__(self, item: T, key: Hashable) -> None:
        self.item = item
        self.key = key
        self.taken = False  # in a batch: a leader sends it
        self.done = False  # result or error set
        self.result: R | None = None
        self.error: BaseException | None = None


class Combiner(Generic[T, R]):
    """Runs ``run(items)`` for batches of concurrently submitted items.

    ``run`` gets up to ``max_batch`` items of one ``key`` and returns one
    result per item, in order (or raises: every item of the batch gets the
    error). At most ``limit`` batches run at once; the submitting threads run
    them, no thread of its own.
    """

    def __init__(
        self, run: Callable[[Sequence[T]], Sequence[R]], *, limit: int, max_batch: int
    ) -> None:
        if limit < 1 or max_batch < 1:
            raise ValueError("a Combiner needs limit >= 1 and max_batch >= 1")
        self._run = run
        self.limit = limit
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Entry[T, R]] = []
        self._running = 0

    def queued(self) -> int:
        """Items waiting for a batch (for tests and metrics)."""
        with self._cond:
            return len(self._queue)

    def submit(self, item: T, key: Hashable = None) -> R:
        """Run ``item`` in a batch (of items of the same ``key``); its result."""
        entry: _Entry[T, R] = _Entry(item, key)
        with self._cond:
            self._queue.append(entry)
            try:
                while not entry.taken:
                    if self._running < self.limit:
                        batch = self._take(entry)
                        self._running += 1
                        break
                    self._cond.wait()
                else:  # another thread's batch took it
                    while not entry.done:
                        self._cond.wait()
                    return self._result(entry)
            except BaseException:
                if not entry.taken:  # interrupted while queued: nobody sends it
                    self._queue.remove(entry)
                raise
        try:
            results = self._run([e.item for e in batch])
            if len(results) != len(batch):
                raise AssertionError(f"{len(results)} results for a batch of {len(batch)}")
        except BaseException as exc:
            results = []
            error: BaseException | None = exc
        else:
            error = None
        with self._cond:
            self._running -= 1
            for i, done in enumerate(batch):
                if error is not None:
                    done.error = error
                else:
                    done.result = results[i]
                done.done = True
            self._cond.notify_all()
        return self._result(entry)

    def _take(self, leader: _Entry[T, R]) -> list[_Entry[T, R]]:
        """``leader`` and the queued entries of its key (oldest first), off the queue."""
        batch = [leader]
        for e in self._queue:
            if len(batch) >= self.max_batch:
                break
            if e is not leader and e.key == leader.key:
                batch.append(e)
        taken = {id(e) for e in batch}
        self._queue = [e for e in self._queue if id(e) not in taken]
        for e in batch:
            e.taken = True
        return batch

    @staticmethod
    def _result(entry: _Entry[T, R]) -> R:
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]  # set with done

"""One behavioural test, both front ends: ``TransactionManager`` and ``AsyncTransactionManager``.

A scenario is an ``async def`` written once against the thin adapter below.
For ``"sync"`` each adapter call makes the blocking call of the sync API
(``with tm.transaction() as tx``, ``tx.connection(name).execute(…)``); for
``"async"`` it awaits the async API (``async with``, ``await``). Either way
the scenario runs inside ``asyncio.run``, and the sync calls simply block it.
A scenario's own blocking calls (admin queries) go through :func:`off_loop`.

Run as a script, this module is a coordinator that a failpoint crashes
(``python tests/frontends.py SPEC_JSON``, see :func:`crash_at`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import psycopg

import txmgr
from support import run_coordinator

FRONTS = ("sync", "async")
T = TypeVar("T")
Rows = list[tuple[Any, ...]]


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)``, awaited when it is a coroutine (the async API)."""
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` — a blocking call of the test's own (an admin query) — on a
    worker thread, so that the event loop goes on meanwhile.

    Call the test's own blocking helpers from a scenario through this. The async
    pools connect on the event loop: a blocking call made on the loop's thread
    stalls every handshake it has in flight, and the server waits for such a
    client until ``authentication_timeout`` (60 s). ``DROP DATABASE`` waits for
    every backend of the server (PostgreSQL 15: a ProcSignalBarrier that a
    backend still authenticating does not take), so a drop made on the loop waits
    those 60 s whenever a pool happened to be opening a connection to that server.
    (The sync front end's calls block the loop too, but its pools connect on
    threads of their own.)
    """
    return await asyncio.to_thread(fn, *args)


class Conn:
    """A branch connection: ``raw`` is the psycopg Connection or AsyncConnection."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def execute(self, query: Any, params: Any = None) -> Rows:
        cur = await call(self.raw.execute, query, params)
        return list(await call(cur.fetchall)) if cur.description else []

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """psycopg's ``conn.transaction()``: a savepoint inside the branch."""
        if isinstance(self.raw, psycopg.AsyncConnection):
            async with self.raw.transaction():
                yield
        else:
            with self.raw.transaction():
                yield


class Tx:
    """A global transaction, used as ``async with`` for either front end."""

    def __init__(self, raw: txmgr.Transaction | txmgr.AsyncTransaction) -> None:
        self.raw = raw

    @property
    def txid(self) -> str:
        return self.raw.txid

    @property
    def state(self) -> txmgr.TransactionState:
        return self.raw.state

    async def connection(self, name: str) -> Conn:
        return Conn(await call(self.raw.connection, name))

    async def execute(self, name: str, query: Any, params: Any = None) -> Rows:
        return await (await self.connection(name)).execute(query, params)

    async def commit(self) -> None:
        await call(self.raw.commit)

    async def rollback(self) -> None:
        await call(self.raw.rollback)

    async def __aenter__(self) -> Tx:
        if isinstance(self.raw, txmgr.AsyncTransaction):
            await self.raw.__aenter__()
        else:
            self.raw.__enter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if isinstance(self.raw, txmgr.AsyncTransaction):
            await self.raw.__aexit__(*exc)
        else:
            self.raw.__exit__(*exc)


class Manager:
    def __init__(self, raw: txmgr.TransactionManager | txmgr.AsyncTransactionManager) -> None:
        self.raw = raw

    def transaction(self) -> Tx:
        return Tx(self.raw.transaction())

    async def close(self) -> None:
        await call(self.raw.close)


class Front:
    """The adapter of one front end; ``kind`` is "sync" or "async"."""

    def __init__(self, kind: str) -> None:
        assert kind in FRONTS
        self.kind = kind
        self.managers: list[Manager] = []

    def __repr__(self) -> str:
        return f"Front({self.kind!r})"

    def manager(self, participants: Mapping[str, str], log: str, **options: Any) -> Manager:
        """A manager of this front end, closed when :meth:`run` ends."""
        cls = txmgr.AsyncTransactionManager if self.kind == "async" else txmgr.TransactionManager
        tm = Manager(cls(participants, log, **options))
        self.managers.append(tm)
        return tm

    def from_config(self, path: Any) -> Manager:
        """``from_config(path)`` of this front end's manager class."""
        cls = txmgr.AsyncTransactionManager if self.kind == "async" else txmgr.TransactionManager
        raw = cls.from_config(path)
        assert isinstance(raw, cls)
        tm = Manager(raw)
        self.managers.append(tm)
        return tm

    def run(self, scenario: Callable[[], Awaitable[T]]) -> T:
        """Run ``scenario()`` in a new event loop; close its managers at the end."""

        async def main() -> T:
            try:
                return await scenario()
            finally:
                for tm in self.managers:
                    await tm.close()
                self.managers.clear()

        return asyncio.run(main())

    async def concurrently(
        self, n: int, worker: Callable[[int], Coroutine[Any, Any, None]]
    ) -> None:
        """``worker(0)`` … ``worker(n-1)`` at the same time: tasks of this loop
        (async), or threads sharing the manager (sync)."""
        if self.kind == "async":
            await asyncio.gather(*(worker(i) for i in range(n)))
            return
        errors: list[BaseException] = []

        def thread(i: int) -> None:
            try:
                asyncio.run(worker(i))  # blocking calls only: the loop just carries them
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def crash_at(front: str, participants: Mapping[str, str], log: str, failpoint: str,
             statements: Mapping[str, list[str]]) -> str:
    """Run a coordinator of ``front`` in a subprocess that a ``crash`` failpoint
    ends at ``failpoint``; its txid."""
    from txmgr.failpoints import CRASH_EXIT

    spec = {"front": front, "participants": dict(participants), "log": log,
            "failpoint": failpoint, "statements": dict(statements)}
    return run_coordinator([__file__], spec, exit_code=CRASH_EXIT)


def _coordinator(spec: dict[str, Any]) -> None:
    from txmgr import failpoints

    failpoints.enable(spec["failpoint"], "crash")
    front = Front(spec["front"])

    async def scenario() -> None:
        tm = front.manager(spec["participants"], spec["log"], pool_min_size=0)
        async with tm.transaction() as tx:
            print(f"TXID {tx.txid}", flush=True)
            for name, statements in spec["statements"].items():
                for stmt in statements:
                    await tx.execute(name, stmt)

    front.run(scenario)
    sys.exit(3)  # still alive: the failpoint was never reached


if __name__ == "__main__":
    _coordinator(json.loads(sys.argv[1]))

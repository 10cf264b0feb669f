"""Ending a transaction's statements at its deadline, from outside the waiting code.

The server enforces the deadline itself (the branch's ``statement_timeout`` and
``idle_in_transaction_session_timeout``, set from the time left when it begins,
see :meth:`txmgr._protocol.TransactionCore._begin_query`), but a server that
does not answer (its processes stopped, its host frozen with TCP still
acknowledged) enforces nothing, and a statement begun late in the transaction
may be allowed longer than what is left. So when the deadline passes while a
statement is in flight on a branch, the front end:

1. sends a cancel request (``conn.cancel_safe``) — a live server ends the
   statement with 57014 and the application's block rolls everything back;
2. after :data:`CANCEL_GRACE` seconds, shuts down the socket of every branch
   still busy: the waiting call fails at once as a lost connection (the server
   rolls the branch back when it notices, as for any lost client).

Only while the transaction is active: from the vote on, the protocol bounds
each step by the deadline itself (``TransactionCore.run_deadline``) and never
passes the commit point late. :class:`Reaper` is the blocking front end's
single timer thread (one per manager, as Narayana's transaction reaper); the
asyncio front end uses its event loop's timers and :func:`expire_async`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from txmgr._multiplex import Job
from txmgr._protocol import CANCEL_GRACE, TransactionCore, TransactionState

__all__ = [
    "CANCEL_GRACE", "Reaper", "Timer", "busy", "cancel_jobs", "cancel_jobs_async",
    "expire_async", "expire_sync", "sever",
]

logger = logging.getLogger("txmgr")


def busy(core: TransactionCore) -> list[psycopg.BaseConnection[Any]]:
    """The connections of ``core``'s branches with a statement in flight, while it is
    active (nothing once the commit protocol runs: it keeps its own time)."""
    if core.state is not TransactionState.ACTIVE:
        return []
    return [b.conn for b in list(core.branches.values())
            if not b.conn.closed
            and b.conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE]


def sever(conn: psycopg.BaseConnection[Any]) -> None:
    """Shut the connection's socket down, from any thread: the call waiting on it
    fails as if the network had cut it. (libpq's own state is left to the
    thread that uses it; only the kernel socket is touched, through a dup.)"""
    try:
        fd = os.dup(conn.pgconn.socket)
    except (OSError, psycopg.OperationalError):
        return  # closed meanwhile
    with socket.socket(fileno=fd) as s, contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


def cancel_jobs(jobs: list[Job]) -> None:
    """Send a cancel request for each job's statement (at most CANCEL_GRACE each)."""
    for job in jobs:
        _cancel(job.conn)


async def cancel_jobs_async(jobs: list[Job]) -> None:
    """The asyncio twin of :func:`cancel_jobs`."""
    for job in jobs:
        await _cancel_async(job.conn)


def _cancel(conn: psycopg.BaseConnection[Any], grace: float = CANCEL_GRACE) -> None:
    try:
        assert isinstance(conn, psycopg.Connection)
        conn.cancel_safe(timeout=grace)
    except Exception as e:  # a server that does not answer: its connection is closed later
        logger.info("cancel request failed: %s", e)


async def _cancel_async(conn: psycopg.BaseConnection[Any], grace: float = CANCEL_GRACE) -> None:
    try:
        assert isinstance(conn, psycopg.AsyncConnection)
        await conn.cancel_safe(timeout=grace)
    except Exception as e:
        logger.info("cancel request failed: %s", e)


def expire_sync(core: TransactionCore, grace: float = CANCEL_GRACE) -> None:
    """The deadline passed: cancel what is in flight, sever what still is after ``grace``."""
    conns = busy(core)
    if not conns:
        return  # the next statement is refused by the branch guard, the commit by the core

    def run() -> None:
        for conn in conns:
            _cancel(conn, grace)
        stop = threading.Event()
        stop.wait(grace)
        still = set(map(id, busy(core)))
        for conn in conns:
            if id(conn) in still:
                logger.warning("txid=%s: deadline passed, the server does not answer: "
                               "closing the connection", core.txid)
                sever(conn)

    threading.Thread(target=run, name=f"txmgr-deadline-{core.txid}", daemon=True).start()


async def expire_async(core: TransactionCore, grace: float = CANCEL_GRACE) -> None:
    """The asyncio twin of :func:`expire_sync` (run as a task of the event loop)."""
    conns = busy(core)
    for conn in conns:
        await _cancel_async(conn, grace)
    if conns:
        await asyncio.sleep(grace)
    still = set(map(id, busy(core)))
    for conn in conns:
        if id(conn) in still:
            logger.warning("txid=%s: deadline passed, the server does not answer: "
                           "closing the connection", core.txid)
            sever(conn)


class Timer:
    """A call scheduled on a :class:`Reaper`; :meth:`cancel` before it is due."""

    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reaper:
    """One thread that runs each scheduled call at its time (``time.monotonic()``)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def schedule(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), timer))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="txmgr-reaper",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return timer

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            timer = heapq.heappop(self._heap)[2]
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
            if not timer.cancelled:
                try:
                    timer.fn()
                except Exception:  # one failed expiry must not stop the others
                    logger.exception("deadline handler failed")

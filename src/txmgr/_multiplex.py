"""Run one query on each of several connections at once, on the calling thread.

Every protocol step of a commit talks to all branches (vote, PREPARE, COMMIT
PREPARED). Sending every query first and then collecting every answer costs
one round trip of wall time for all branches, with no thread hand-offs: on
loopback that took about half the time of a worker thread per branch, and on
a real network it is as parallel as threads.

Queries use the simple protocol (psycopg composes and quotes every value
beforehand), so a query may hold several statements; a job keeps the rows of
its last result that had rows, the command tag of its last result, or the
first error.

Both front ends share everything but the waiting: :func:`run_all` waits with
a selector (blocking the calling thread), :func:`run_all_async` with the
event loop's readers (one task, no threads; a selector event loop, as psycopg
itself needs). Only ``pgconn`` is used, which sync and async psycopg
connections both have.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias

import psycopg
from psycopg import pq, sql

__all__ = ["AnyConnection", "Job", "StepTimeout", "literal", "run_all", "run_all_async",
           "run_quorum"]

# One selector per protocol step: poll needs no kernel object per call, where
# epoll (the default) costs a create and close each time (measured: 8% of the
# coordinator's CPU per commit).
_Selector = getattr(selectors, "PollSelector", selectors.DefaultSelector)

#: A sync or an async psycopg connection: a job only needs its ``pgconn``.
AnyConnection: TypeAlias = psycopg.BaseConnection[Any]

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)


class StepTimeout(psycopg.OperationalError):
    """No answer within the step's time limit: the connection was closed.

    A server that stopped answering while its host still acknowledges every
    TCP segment (a frozen process, a stuck middlebox) never breaks the
    connection by itself: neither keepalives nor ``tcp_user_timeout`` fire.
    The query may still run on the server when it wakes up; the protocol
    treats the connection as lost at that step, as if the network had cut it.
    """


def literal(value: str, conn: AnyConnection) -> bytes:
    """``value`` quoted by psycopg as an SQL literal for ``conn``, to follow a
    constant command (``b"PREPARE TRANSACTION " + literal(gid, conn)``): the
    same bytes as ``sql.SQL("… {}").format(sql.Literal(value))``, in a third of
    the time, on every step of every commit."""
    return sql.Literal(value).as_bytes(conn)


class Job:
    """One query for one connection, and what came of it."""

    __slots__ = ("before", "conn", "error", "flushing", "query", "rows", "tag")

    def __init__(
        self,
        conn: AnyConnection,
        query: bytes,
        *,
        before: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.query = query
        self.before = before  # called just before sending; an exception fails the job
        self.rows: list[tuple[str | None, ...]] | None = None  # text values of the last rows
        self.error: BaseException | None = None
        # The command tag of the last result: PostgreSQL answers PREPARE or
        # COMMIT of an already failed transaction with "ROLLBACK", not an error.
        self.tag: bytes | None = None
        # Part of the query is still in libpq's output buffer (a query larger
        # than the socket's send buffer): wait for writability too.
        self.flushing = False

    def __repr__(self) -> str:
        return f"<Job {self.query[:40]!r} rows={self.rows} error={self.error!r}>"


def run_all(
    jobs: Sequence[Job],
    *,
    timeout: float | None = None,
    cancel_after: float | None = None,
    cancel: Callable[[list[Job]], None] | None = None,
) -> None:
    """Send every job's query, then wait for every answer (errors land in ``job.error``);
    with ``timeout``, at most that many seconds: then the connections still
    without an answer are closed and their jobs fail with :class:`StepTimeout`.
    With ``cancel_after`` (< ``timeout``), ``cancel`` is called on the jobs still
    unanswered by then (a cancel request lets a live server end them cleanly)."""
    pending = _send_all(jobs)
    if not pending:
        return
    if timeout is None:
        _wait(pending)
        return
    deadline = time.monotonic() + timeout
    if cancel is not None and cancel_after is not None and cancel_after < timeout:
        soon = time.monotonic() + cancel_after
        _wait(pending, seconds_left=lambda: soon - time.monotonic())
        if pending:
            cancel(list(pending.values()))
    _wait(pending, seconds_left=lambda: deadline - time.monotonic())
    _give_up(pending.values(), timeout)


def _give_up(jobs: Iterable[Job], timeout: float) -> None:
    """Fail ``jobs`` (unanswered after ``timeout`` seconds) and close their connections:
    a query is still in flight on each, so it can never be used again. Closed by
    libpq only, so psycopg reports the connection broken, as a lost one."""
    for job in jobs:
        job.error = job.error or StepTimeout(
            f"no answer within {timeout:g}s (step_timeout): the connection was closed; "
            "the server may be frozen or cut off, and may still run the statement"
        )
        job.conn.pgconn.finish()


def run_quorum(
    jobs: Sequence[Job],
    *,
    enough: Callable[[Sequence[Job]], bool],
    linger: float,
    timeout: float,
) -> list[Job]:
    """Like :func:`run_all`, but without waiting for stragglers.

    Once ``enough(finished jobs)`` holds, the others get at most ``linger``
    seconds more; after ``timeout`` seconds nobody is waited for. Returns the
    jobs still unanswered: their connections have a query in flight, to be read
    later (:class:`txmgr.paxos._links.Collector`) or closed, never reused as
    they are.
    """
    deadline = time.monotonic() + timeout
    pending = _send_all(jobs)
    done = [j for j in jobs if j.error is not None]
    settled = False

    def seconds_left() -> float:
        nonlocal deadline, settled
        now = time.monotonic()
        if not settled and enough(done):
            settled = True
            deadline = min(deadline, now + linger)
        return deadline - now

    _wait(pending, finished=done, seconds_left=seconds_left)
    return list(pending.values())


def _wait(
    pending: dict[int, Job],
    *,
    finished: list[Job] | None = None,
    seconds_left: Callable[[], float] | None = None,
) -> None:
    """Collect answers until ``pending`` (socket -> job) is empty, or until
    ``seconds_left()`` says the time is up. Finished jobs leave ``pending``
    (and join ``finished``)."""
    with _Selector() as sel:
        for fd, job in pending.items():
            sel.register(fd, _events(job))
        while pending:
            for fd, job in list(pending.items()):
                flushing = job.flushing
                if _collect(job):
                    del pending[fd]
                    sel.unregister(fd)
                    if finished is not None:
                        finished.append(job)
                elif job.flushing != flushing:
                    sel.modify(fd, _events(job))
            if not pending:
                return
            if seconds_left is None:
                sel.select()
                continue
            wait = seconds_left()
            if wait <= 0:
                return
            sel.select(wait)


async def run_all_async(
    jobs: Sequence[Job],
    *,
    timeout: float | None = None,
    cancel_after: float | None = None,
    cancel: Callable[[list[Job]], Awaitable[None]] | None = None,
) -> None:
    """:func:`run_all` for the event loop: the task waits, the loop goes on."""
    pending = _send_all(jobs)
    for fd, job in list(pending.items()):
        if _collect(job):  # an answer libpq already holds fires no reader
            del pending[fd]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def ready(fd: int) -> None:
        job = pending.get(fd)
        if job is None or done.done():
            return
        try:
            finished = _collect(job)
        except Exception as e:  # raised by the await below, as run_all raises it
            done.set_exception(e)
            return
        if finished:
            del pending[fd]
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            if not pending and not done.done():
                done.set_result(None)
        elif not job.flushing:
            loop.remove_writer(fd)

    try:
        for fd, job in pending.items():
            loop.add_reader(fd, ready, fd)
            if job.flushing:
                loop.add_writer(fd, ready, fd)
        if timeout is None:
            await done
        else:
            deadline = time.monotonic() + timeout
            if cancel is not None and cancel_after is not None and cancel_after < timeout:
                await asyncio.wait({done}, timeout=cancel_after)
                if not done.done():
                    await cancel(list(pending.values()))
            # (asyncio.wait never cancels ``done``)
            await asyncio.wait({done}, timeout=max(0.0, deadline - time.monotonic()))
            if done.done():
                done.result()  # raises what a reader callback raised
    finally:  # also when the task is cancelled: the loop must not call back later
        for fd in pending:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
    if pending and timeout is not None:  # (the readers are gone before the sockets)
        _give_up(list(pending.values()), timeout)


def _send_all(jobs: Sequence[Job]) -> dict[int, Job]:
    """Send each job's query; the jobs waiting for an answer, by socket."""
    pending: dict[int, Job] = {}
    for job in jobs:
        try:
            if job.before is not None:
                job.before()
            if job.conn.closed:
                raise psycopg.OperationalError("the connection is closed")
            pg = job.conn.pgconn
            pg.send_query(job.query)
            job.flushing = pg.flush() == 1
        except Exception as e:
            job.error = e
            continue
        pending[pg.socket] = job
    return pending


def _events(job: Job) -> int:
    return selectors.EVENT_READ | (selectors.EVENT_WRITE if job.flushing else 0)


def _collect(job: Job) -> bool:
    """Read what has arrived for ``job``; True once its query is fully answered."""
    pg = job.conn.pgconn
    encoding = job.conn.info.encoding
    try:
        if job.flushing:
            job.flushing = pg.flush() == 1
        pg.consume_input()
        while not pg.is_busy():
            res = pg.get_result()
            if res is None:
                return True
            job.tag = res.command_status
            if res.status not in _OK:
                if job.error is None:
                    job.error = psycopg.errors.error_from_result(res, encoding=encoding)
            elif res.status == pq.ExecStatus.TUPLES_OK:
                job.rows = [
                    tuple(_text(res.get_value(r, c), encoding) for c in range(res.nfields))
                    for r in range(res.ntuples)
                ]
    except psycopg.Error as e:  # connection lost: nothing more will come
        job.error = job.error or e
        return True
    return False


def _text(value: bytes | None, encoding: str) -> str | None:
    return None if value is None else value.decode(encoding)

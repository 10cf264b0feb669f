"""Connections to the acceptor databases: one pool each, their health, and stragglers.

A round of the protocol needs answers from a quorum, not from every acceptor.
Waiting for the slowest of three would make every commit as slow as the
busiest log database, and hanging up on it would cost a new connection each
time. So a round moves on with a quorum and hands the statements still in
flight to a :class:`Collector`: a thread that reads their answers in the
background and gives the connections back to their pools.

An acceptor that fails — refuses connections, errs, or keeps a statement
unanswered for :data:`SUSPECT_AFTER` — *rests*: rounds skip it for a backoff
(0.5 s doubling up to 30 s), then probe it with an idle pooled connection
only. A dead log database costs the commits nothing once noticed. Time only
decides whom to wait for, never what is decided.

One that cannot be connected to is also probed by a thread of its own, a
connection attempt every :data:`PROBE_EVERY` seconds: psycopg_pool's own
reconnection backs off to minutes during a long outage, and every transaction
registered meanwhile has one voter fewer (and survives one failure fewer). When
a probe connects, the link gets a fresh pool and its rest ends: the next rounds
ask it again.
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool

from txmgr._dsn import mask
from txmgr._multiplex import Job, _collect, _events
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD, inspect, prepare_threshold
from txmgr.errors import LogCopied, NotPrimary
from txmgr.participant import connect, network_defaults
from txmgr.paxos._schema import check_acceptor

__all__ = ["PROBE_EVERY", "SUSPECT_AFTER", "AcceptorLink", "Collector"]

logger = logging.getLogger("txmgr.paxos")

REST_MIN, REST_MAX = 0.5, 30.0
#: Seconds a statement may stay unanswered before its acceptor rests.
SUSPECT_AFTER = 1.0
#: Seconds between connection attempts to an acceptor that cannot be connected to.
PROBE_EVERY = 1.0
_SLICE = 0.05  # how long one wait for a pooled connection lasts before checking the pool


class AcceptorLink:
    """One acceptor database: its pool and whether it is worth waiting for."""

    __slots__ = ("_closed", "_errors", "_lock", "_origin", "_pool", "_prober", "connect_timeout",
                 "dsn", "healthy", "incarnation", "last_error", "max_size", "min_size", "pools",
                 "prepare_threshold", "probes", "refused", "rest", "rest_until")

    def __init__(self, dsn: str, *, connect_timeout: float, min_size: int, max_size: int,
                 prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD) -> None:
        self.dsn = dsn
        #: Not None: the acceptor's statements are prepared once per session;
        #: None (and always through a pooler): sent as text (see _acceptor.Statement).
        self.prepare_threshold = prepare_threshold
        self.connect_timeout = connect_timeout
        self.min_size = min_size
        self.max_size = max_size
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._lock = threading.Lock()
        self._errors = 0  # the pool's count of failed connection attempts at the last success
        self.incarnation: str | None = None  # as last answered
        self.healthy = True  # wait for its connections (else only probe)
        self.rest = 0.0  # current backoff
        self.rest_until = 0.0  # monotonic time before which rounds skip it
        self.last_error = ""
        self.refused: str | None = None  # why its last new connection was refused (a copy)
        self.pools = 0  # pools opened so far (a probe that connects opens a fresh one)
        self.probes = 0  # connection attempts of the probe so far
        self._prober: threading.Thread | None = None
        self._closed = False
        # The pool each checked-out connection came from (the pool may be
        # replaced while a connection is out).
        self._origin: weakref.WeakKeyDictionary[
            psycopg.Connection[Any], psycopg_pool.ConnectionPool[psycopg.Connection[Any]]
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<AcceptorLink {mask(self.dsn)} {'healthy' if self.healthy else 'resting'}>"

    def _open(self) -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    kwargs={
                        **network_defaults(self.dsn),
                        "connect_timeout": max(1, round(self.connect_timeout)),
                        "autocommit": True,
                        # No libpq options (a pooler refuses or drops them): every
                        # statement sets what it needs itself (txmgr.paxos._acceptor).
                        # Nothing prepared until _configure looked for a pooler.
                        "prepare_threshold": None,
                    },
                    configure=self._configure,
                    name="txmgr-paxos",
                    open=False,
                )
                self._pool.open(wait=False)
                self.pools += 1
            return self._pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # Each new connection: prepared statements only without a pooler between
        # (a statement-pooling one is refused: the pool counts a failed attempt).
        pooled = inspect(conn, "log")
        conn.prepare_threshold = prepare_threshold(self.prepare_threshold, pooled=pooled)
        # A copy of another log database carries that acceptor's incarnation and
        # promises: its answers must never count. Refusing its connections makes
        # it an acceptor that is down (always safe), with the reason kept.
        try:
            check_acceptor(conn, self.dsn)
        except (LogCopied, NotPrimary) as e:  # a standby may lag: down until promoted
            self.refused = str(e)
            raise
        self.refused = None

    def resting(self, now: float) -> bool:
        return self.rest_until > now

    def checkout(self, timeout: float) -> psycopg.Connection[Any] | None:
        """A connection within ``timeout``; None sooner once the server refuses them."""
        pool = self._open()
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = deadline - time.monotonic()
                conn = pool.getconn(timeout=max(0.001, min(_SLICE, left)))
            except psycopg_pool.PoolTimeout:
                if self.failing() or time.monotonic() >= deadline:
                    return None
                continue
            self._errors = pool.get_stats().get("connections_errors", 0)
            with self._lock:
                self._origin[conn] = pool
            return conn

    def failing(self) -> bool:
        """No idle connection, and attempts to make one failed since the last one was had."""
        pool = self._pool
        if pool is None:
            return False
        stats = pool.get_stats()  # (pool_size counts attempts in progress too)
        return (stats.get("pool_available", 0) == 0
                and stats.get("connections_errors", 0) > self._errors)

    def release(self, conn: psycopg.Connection[Any], *, broken: bool) -> None:
        if broken and not conn.closed:
            conn.close()  # a query may still be in flight: never reuse the connection
        with self._lock:
            pool = self._origin.pop(conn, None)
        if pool is None:
            conn.close()
        else:
            pool.putconn(conn)  # a pool closed meanwhile closes it

    def failed(self, why: str, *, unreachable: bool = False) -> None:
        """It failed (``unreachable``: no connection could be made): it rests."""
        if self.refused is not None:
            why = self.refused  # the real reason no connection could be had
        with self._lock:
            self.healthy = False
            self.rest = min(REST_MAX, max(REST_MIN, self.rest * 2))
            self.rest_until = time.monotonic() + self.rest * random.uniform(0.5, 1.0)
            if why != self.last_error:
                logger.warning("log database %s unavailable: %s", mask(self.dsn), why)
            self.last_error = why
            if unreachable and self._prober is None and not self._closed:
                self._prober = threading.Thread(target=self._probe, daemon=True,
                                                name="txmgr-paxos-probe")
                self._prober.start()

    def _probe(self) -> None:
        """Try to connect every PROBE_EVERY seconds; once it works, open a fresh pool."""
        while True:
            with self._lock:
                if self._closed or self.healthy:
                    self._prober = None
                    return
            started = time.monotonic()
            self.probes += 1
            try:
                with connect(self.dsn, "log", connect_timeout=self.connect_timeout,
                             autocommit=True) as conn:
                    check_acceptor(conn, self.dsn)  # a copy stays refused
            except Exception:  # still unreachable (the rounds report why)
                time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - started)))
                continue
            with self._lock:
                old, self._pool = self._pool, None
                self._errors = 0  # the fresh pool counts its own
                self._prober = None
                if not self._closed:
                    self.rest_until = 0.0  # ask it again from the next round on
            logger.info("log database %s accepts connections again", mask(self.dsn))
            if old is not None:
                old.close()  # its connections still out are closed when released
            return

    def answered(self, incarnation: str) -> None:
        with self._lock:
            if self.incarnation is not None and incarnation != self.incarnation:
                logger.warning(
                    "log database %s was re-created (incarnation %s, now %s): it votes only on "
                    "transactions begun from now on", mask(self.dsn), self.incarnation, incarnation,
                )
            if not self.healthy:
                logger.info("log database %s answers again", mask(self.dsn))
            self.incarnation = incarnation
            self.healthy = True
            self.rest = 0.0

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._closed = True
        if pool is not None:
            pool.close()


class Collector:
    """Reads, in a thread of its own, the answers rounds stopped waiting for.

    ``done(link, job)`` is called with each finished job (its error set after
    ``timeout`` seconds without an answer), and the connection goes back to
    its pool — closed, if the answer never came.
    """

    def __init__(self, *, timeout: float, done: Callable[[AcceptorLink, Job], None]) -> None:
        self._timeout = timeout
        self._done = done
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple[AcceptorLink, psycopg.Connection[Any], Job, float]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, link: AcceptorLink, conn: psycopg.Connection[Any], job: Job) -> None:
        with self._lock:
            if self._closed:
                link.release(conn, broken=True)
                return
            self._jobs[conn.pgconn.socket] = (link, conn, job, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="txmgr-paxos-collector",
                                                daemon=True)
                self._thread.start()
            self._wake_w.send(b"\0")  # under the lock: close() cannot have closed it

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._wake_w.send(b"\0")
        if thread is not None:
            thread.join()
        with self._lock:
            jobs, self._jobs = self._jobs, {}
        for link, conn, _, _ in jobs.values():
            link.release(conn, broken=True)
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            watched: dict[int, int] = {}  # fd -> events registered
            while True:
                with self._lock:
                    if self._closed:
                        return
                    jobs = dict(self._jobs)
                for fd in [fd for fd in watched if fd not in jobs]:
                    sel.unregister(fd)
                    del watched[fd]
                now = time.monotonic()
                wait = self._timeout
                for fd, (link, conn, job, since) in jobs.items():
                    finished = _collect(job)
                    if not finished and now - since >= self._timeout:
                        job.error = TimeoutError(f"no answer within {self._timeout:g}s")
                        finished = True
                    if finished:
                        self._finish(fd, link, conn, job)
                        if fd in watched:
                            sel.unregister(fd)
                            del watched[fd]
                        continue
                    if now - since >= SUSPECT_AFTER and link.healthy:
                        link.failed(f"a statement has been unanswered for {SUSPECT_AFTER:g}s")
                    events = _events(job)
                    if watched.get(fd) != events:
                        if fd in watched:
                            sel.modify(fd, events)
                        else:
                            sel.register(fd, events)
                        watched[fd] = events
                    wait = min(wait, since + (SUSPECT_AFTER if link.healthy else self._timeout)
                               - now)
                sel.select(max(0.001, wait))
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass

    def _finish(self, fd: int, link: AcceptorLink, conn: psycopg.Connection[Any], job: Job) -> None:
        with self._lock:
            self._jobs.pop(fd, None)
        broken = job.error is not None or conn.broken
        try:
            self._done(link, job)
        except Exception:  # the thread must go on reading the others
            logger.exception("txmgr.paxos: handling a late answer of %s failed", mask(link.dsn))
        finally:
            link.release(conn, broken=broken)

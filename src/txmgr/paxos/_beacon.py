"""The coordinator's liveness sign: a lock its process holds on every log database.

Recovery must not decide a transaction whose coordinator is still inside the
protocol (it would abort a healthy, merely slow transaction), and should
decide at once the transactions of a coordinator that is gone (else their
branches hold their locks for a whole grace period). The default mode learns
this from the server without a clock: the decision transaction ``L`` is in
progress exactly while its coordinator lives. Paxos mode gets the same from
a *beacon*:

- A :class:`Beacon` opens, on each log database, one dedicated connection
  and in it a transaction that takes ``pg_advisory_xact_lock(key)`` and
  stays open: the lock is held exactly while the process (and that
  connection) lives. A SIGKILLed process's connections close, the server
  ends the transaction, the lock is free. A transaction-level lock inside an
  open transaction also holds through PgBouncer's transaction pooling (the
  server connection stays with the client until the transaction ends); a
  session advisory lock would not.
- Every registration records ``key`` in the slot (column ``coordinator``),
  so any recoverer can ask each log database whether the lock of that
  slot's coordinator is held (``pg_locks``, in the same read that returns
  the slot: see :mod:`txmgr.paxos._acceptor`).
- :func:`coordinator_state` turns the answers into ``alive`` (some voter
  sees the lock held), ``gone`` (a majority of the voters see it free) or
  ``unknown`` (no key recorded, or too few answered).

A coordinator that hangs (SIGSTOP, a stuck machine) must not hold its
transactions forever: the beacon transaction runs with
``idle_in_transaction_session_timeout = timeout``, and a thread per log
database touches its beacons every ``timeout / 3`` seconds (one per database,
so that a database that does not answer, whose touch or reconnect blocks,
cannot keep the others' beacons from their touch: they would all expire and a
live coordinator would look gone). A process that stops running
loses its beacons after ``timeout``, as the default mode's ``L`` is ended by
the server after the log's idle timeout. The thread also reopens a beacon
lost with its database (a restart), under the same key.

A coordinator that gives up a transaction whose branches may still be
prepared (:meth:`release` with ``settled=False``: its outcome is unknown, or
a rollback failed) is alive but no longer driving it. Its *generation* (key)
is then retired: new transactions get a new key, and the old key's beacons
end once every transaction handed out under it is released, so recovery
sees the abandoned one's coordinator gone.

Safety never depends on any of this: Paxos ballots make whatever recovery
proposes safe. The sign only decides when recovery *tries*; it can be wrong
only towards caution (a coordinator partitioned from the log databases, its
connections not yet noticed broken, looks alive until the server's TCP
keepalive or the idle timeout ends them) or towards an early abort (a
coordinator whose beacons were lost on a majority of the log databases at
once looks gone until the thread reopens them; the abort is safe).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from txmgr._dsn import mask, redact
from txmgr.participant import network_defaults
from txmgr.paxos._core import Voters

__all__ = ["Beacon", "CoordinatorState", "coordinator_state", "may_decide"]

logger = logging.getLogger("txmgr.paxos")

CoordinatorState = Literal["alive", "gone", "unknown"]


def coordinator_state(
    alive: Mapping[str, bool], quorum: int, voters: Voters | None = None
) -> CoordinatorState:
    """What the log databases say about a transaction's coordinator.

    ``alive``: per acceptor incarnation that answered and whose slot records a
    coordinator, whether its lock is held; only ``voters`` count (all, for a
    slot no gid names). One seeing it held is enough for ``alive`` (the others
    may have lost the beacon in a restart); ``gone`` needs ``quorum`` of them
    to see it free: a coordinator that still holds a beacon anywhere is running.
    """
    seen = {inc: held for inc, held in alive.items() if voters is None or inc in voters}
    if any(seen.values()):
        return "alive"
    if sum(1 for held in seen.values() if not held) >= quorum:
        return "gone"
    return "unknown"


class _Generation:
    """One key, its beacon connection per log database, and the txids handed out
    under it that their coordinator has not released yet."""

    __slots__ = ("conns", "key", "live", "retired")

    def __init__(self, count: int) -> None:
        # Positive and below 2**63: a bigint, split by pg_locks into two oids.
        self.key = secrets.randbits(62) + 1
        self.conns: list[psycopg.Connection[Any] | None] = [None] * count
        self.live: set[str] = set()
        self.retired = False


class Beacon:
    """The liveness locks of one process on every log database (see the module text).

    Thread-safe. ``timeout``: seconds without a touch after which a log
    database ends a beacon (its process is hung); ``connect_timeout`` for
    opening one.
    """

    def __init__(self, dsns: Sequence[str], *, connect_timeout: float, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("the beacon timeout must be positive")
        self._dsns = tuple(dsns)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._current: _Generation | None = None
        self._retired: list[_Generation] = []
        self._by_txid: dict[str, _Generation] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def key(self) -> int:
        """The key to register transactions under now; its beacons are held on
        every log database that could be reached (opened on first use)."""
        with self._open_lock:  # one opener: a second lock on the same key would wait
            with self._lock:
                gen = self._current
                if gen is not None:
                    return gen.key
                gen = _Generation(len(self._dsns))
            # Held before any slot names the key (a database where it could not be
            # taken says "free", and the thread retries it).
            for i, dsn in enumerate(self._dsns):
                gen.conns[i] = self._open(dsn, gen.key)
            with self._lock:
                self._current = gen
        self._start_thread()
        return gen.key

    def hand_out(self, txid: str, key: int) -> bool:
        """``txid`` (registered under ``key``) goes to a transaction; False when
        that key's generation was retired meanwhile (the txid must not be used)."""
        with self._lock:
            gen = self._current
            if gen is None or gen.key != key:
                return False
            gen.live.add(txid)
            self._by_txid[txid] = gen
            return True

    def release(self, txid: str, *, settled: bool) -> None:
        """Its coordinator is done with ``txid``. ``settled``: its outcome is decided
        and known to the coordinator, or nothing of it is left prepared; otherwise
        recovery must be able to finish it, so its generation is retired."""
        close: list[psycopg.Connection[Any] | None] = []
        with self._lock:
            gen = self._by_txid.pop(txid, None)
            if gen is None:
                return
            gen.live.discard(txid)
            if not settled and not gen.retired:
                gen.retired = True
                self._retired.append(gen)
                if self._current is gen:
                    self._current = None
                logger.info("txid=%s: left to recovery; its coordinator's liveness key is "
                            "retired once the transactions under it end", txid)
            if gen.retired and not gen.live:
                self._retired.remove(gen)
                close, gen.conns = gen.conns, [None] * len(gen.conns)
        for conn in close:
            _close(conn)

    def close(self) -> None:
        """End every beacon (the process's transactions are over)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._lock:
            gens = [*self._retired, *([self._current] if self._current else [])]
            self._current, self._retired, self._by_txid = None, [], {}
        for gen in gens:
            for conn in gen.conns:
                _close(conn)
            gen.conns = [None] * len(gen.conns)

    # -- the beacons ------------------------------------------------------------

    def _open(self, dsn: str, key: int) -> psycopg.Connection[Any] | None:
        try:
            options: dict[str, Any] = {
                **network_defaults(dsn),  # a touch on a silent host ends
                "connect_timeout": max(1, round(self._connect_timeout)),
                "application_name": "txmgr beacon",
            }
            conn = psycopg.connect(dsn, prepare_threshold=None, **options)
        except psycopg.Error as e:
            logger.warning("no liveness beacon on Paxos log database %s (recovery falls back "
                           "to its grace period there): %s", mask(dsn), redact(str(e)))
            return None
        try:
            # Inside the transaction, so that no pooler or default can drop it.
            conn.execute(sql.SQL(
                "SET LOCAL idle_in_transaction_session_timeout = {}; "
                "SELECT pg_advisory_xact_lock({})").format(
                    sql.Literal(f"{max(1, round(self._timeout * 1000))}ms"), sql.Literal(key)))
        except psycopg.Error as e:
            logger.warning("could not take the liveness lock on Paxos log database %s: %s",
                           mask(dsn), redact(str(e)))
            _close(conn)
            return None
        return conn

    def _start_thread(self) -> None:
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            self._threads = [
                threading.Thread(target=self._run, args=(i,), name=f"txmgr-paxos-beacon-{i}",
                                 daemon=True)
                for i in range(len(self._dsns))
            ]
            for thread in self._threads:
                thread.start()

    def _run(self, i: int) -> None:
        """Touch the beacons on log database ``i`` well within their idle timeout;
        reopen the lost ones. Only this thread reopens a beacon of a published
        generation on that database (so no second lock on one key waits)."""
        while not self._stop.wait(self._timeout / 3):
            with self._lock:
                gens = [*self._retired, *([self._current] if self._current else [])]
            for gen in gens:
                conn = gen.conns[i]
                if conn is not None and not conn.closed:
                    try:
                        conn.execute("SELECT 1")
                        continue
                    except psycopg.Error:
                        _close(conn)
                if not gen.retired:  # a retired key's beacons only ever end
                    gen.conns[i] = self._open(self._dsns[i], gen.key)


def _close(conn: psycopg.Connection[Any] | None) -> None:
    if conn is None:
        return
    # ROLLBACK first: the server frees the lock before it answers, so a
    # recoverer asking right after sees it free (a bare close ends the
    # transaction only once the server has read the connection's end).
    with contextlib.suppress(psycopg.Error):  # a broken connection: closing is enough
        conn.rollback()
    with contextlib.suppress(psycopg.Error):
        conn.close()


def may_decide(state: CoordinatorState, age: float, grace: float) -> bool:
    """Whether recovery may run phase 1 for an undecided transaction (the one rule
    of recover, resolve and the daemon): at once when its coordinator is gone,
    never while it is alive, and after ``grace`` seconds since its registration
    only when nothing tells (slots from before revision 0004, beacons lost,
    too few log databases answering). Liveness only: ballots keep it safe."""
    return state == "gone" or (state == "unknown" and age >= grace)

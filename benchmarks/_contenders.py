"""The contenders: the same transaction (one update per participant), committed eight ways.

Each contender opens its connections once per configuration, outside the
timed window, and keeps them (a pool, or one connection per client thread).
``open()`` returns one callable per client thread; a call runs and commits
one transaction. After each slice ``check()`` may report what the data
check cannot see (for Paxos mode: that every commit was decided by the log
databases, and that the one meant to be down never answered).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from _down import ClosedPort
from _wire import send_all
from _workload import ACCOUNTS_TABLE, DECISION_TABLE, UPDATE, Moves
from psycopg import sql

import txmgr

Client = Callable[[Moves], None]
_POOL_LOGGER = logging.getLogger("psycopg.pool")


class Contender:
    """Base class: a name, a one-line description, open() and close()."""

    name = ""
    description = ""
    needs_acceptors = False  # True: open() needs the three Paxos log databases

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        """One client callable per thread. ``dsns``: participant name -> DSN;
        ``log_dsn``: the dedicated log database; ``acceptors``: the Paxos log
        databases (only for contenders that ``needs_acceptors``)."""
        raise NotImplementedError

    def check(self, committed: int) -> list[str]:
        """Problems of the slice that just committed ``committed`` transactions."""
        return []

    def close(self) -> None:
        """Close every connection opened by :meth:`open`."""


class _Connections(Contender):
    """Keeps one connection per participant (and log) per client thread."""

    def __init__(self) -> None:
        self._conns: list[psycopg.Connection[Any]] = []

    def _connect(self, dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        conn = psycopg.connect(dsn, autocommit=autocommit)
        self._conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()


class Plain(_Connections):
    name = "plain"
    description = "non-atomic: each update commits on its own, one database after another"

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        def client() -> Client:
            conns = [self._connect(d) for d in dsns.values()]

            def one(moves: Moves) -> None:
                for conn, params in zip(conns, moves, strict=True):
                    conn.execute(UPDATE, params)

            return one

        return [client() for _ in range(clients)]


class HandWritten(_Connections):
    """Two-phase commit written by hand with psycopg, with a decision row in a log
    database. The application's statements are the same as for every other
    contender (psycopg's default mode: it sends BEGIN before the first one);
    then PREPARE each branch, INSERT the decision (autocommit: the commit
    point), COMMIT PREPARED each. ``parallel``: each phase is sent to every
    participant at once (libpq's non-blocking calls), as lean as we can write it."""

    def __init__(self, *, parallel: bool) -> None:
        super().__init__()
        self.parallel = parallel
        self.name = "2pc-par" if parallel else "2pc-seq"
        self.description = (
            "hand-written 2PC + decision-row insert, "
            + ("each phase sent to all participants at once" if parallel
               else "one participant after another")
        )

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        names = list(dsns)
        decide = f"INSERT INTO {DECISION_TABLE} (txid, participants) VALUES (%s, %s)"

        def client() -> Client:
            conns = [self._connect(d, autocommit=False) for d in dsns.values()]
            log = self._connect(log_dsn)

            def phase(queries: list[bytes]) -> None:
                if self.parallel:
                    send_all(conns, queries)
                else:
                    for conn, query in zip(conns, queries, strict=True):
                        send_all([conn], [query])

            def one(moves: Moves) -> None:
                txid = secrets.token_hex(8)
                gids = [sql.Literal(f"bench_{txid}_{n}") for n in names]
                try:
                    for conn, params in zip(conns, moves, strict=True):
                        conn.execute(UPDATE, params)
                    phase([sql.SQL("PREPARE TRANSACTION {}").format(g).as_bytes(c)
                           for g, c in zip(gids, conns, strict=True)])
                    log.execute(decide, (txid, names))
                except BaseException:
                    _abort(conns, gids)
                    raise
                phase([sql.SQL("COMMIT PREPARED {}").format(g).as_bytes(c)
                       for g, c in zip(gids, conns, strict=True)])

            return one

        return [client() for _ in range(clients)]


def _abort(conns: list[psycopg.Connection[Any]], gids: list[sql.Literal]) -> None:
    """Roll back whatever the failed transaction left, prepared or not."""
    for conn, gid in zip(conns, gids, strict=True):
        conn.rollback()
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            send_all([conn], [sql.SQL("ROLLBACK PREPARED {}").format(gid).as_bytes(conn)])


class SQLAlchemyTwoPhase(Contender):
    name = "sqla-2pc"
    description = "SQLAlchemy Session(twophase=True), one engine per participant, no log"

    def __init__(self) -> None:
        self._engines: list[Any] = []

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, create_engine, update
        from sqlalchemy.orm import Session

        tables = []
        binds: dict[Any, Any] = {}
        for dsn in dsns.values():
            engine = create_engine(
                "postgresql+psycopg://",
                creator=lambda dsn=dsn: psycopg.connect(dsn),
                pool_size=clients,
                max_overflow=2,
            )
            self._engines.append(engine)
            table = Table(ACCOUNTS_TABLE, MetaData(), Column("id", Integer, primary_key=True),
                          Column("balance", BigInteger, nullable=False))
            tables.append(table)
            binds[table] = engine

        def one(moves: Moves) -> None:
            with Session(binds=binds, twophase=True) as session:
                for table, (delta, account) in zip(tables, moves, strict=True):
                    session.execute(update(table).where(table.c.id == account)
                                    .values(balance=table.c.balance + delta))
                session.commit()

        # Warm each pool up to one connection per client, outside the timed window.
        conns = [e.connect() for e in self._engines for _ in range(clients)]
        for c in conns:
            c.close()
        return [one] * clients

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()


class Txmgr(Contender):
    """txmgr, with a dedicated log database or with the log inside the first participant."""

    def __init__(self, *, log: str) -> None:
        self.log = log
        self.name = "txmgr-log" if log == "dedicated" else "txmgr-inlog"
        self.description = (
            "txmgr, decision log in a dedicated database on its own server"
            if log == "dedicated" else "txmgr, decision log inside the first participant"
        )
        self._tm: txmgr.TransactionManager | None = None

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        first = next(iter(dsns))
        tm = self._tm = txmgr.TransactionManager(
            dsns,
            log=log_dsn if self.log == "dedicated" else first,
            pool_min_size=clients,
            pool_max_size=clients + 2,
        )
        return _txmgr_clients(tm, dsns, clients)

    def close(self) -> None:
        if self._tm is not None:
            self._tm.close()
            self._tm = None


def _txmgr_clients(tm: txmgr.TransactionManager, dsns: dict[str, str],
                   clients: int) -> list[Client]:
    """The clients of a txmgr contender, once its manager is checked and each
    participant's pool holds a connection per client."""
    tm.check()  # Paxos mode: one acceptor down is logged there, not raised
    for p in dsns:
        tm.participant(p).pool().wait()
    names = list(dsns)

    def one(moves: Moves) -> None:
        with tm.transaction() as tx:
            for name, params in zip(names, moves, strict=True):
                tx.connection(name).execute(UPDATE, params)

    return [one] * clients


class _DecisionCounter(txmgr.Hooks):
    """Counts the decisions txmgr took (each two-phase commit takes one)."""

    def __init__(self) -> None:
        self.decisions = 0
        self._lock = threading.Lock()

    def after_decision(self, txid: str, lxid: int) -> None:
        with self._lock:
            self.decisions += 1

    def take(self) -> int:
        with self._lock:
            n, self.decisions = self.decisions, 0
            return n


class TxmgrPaxos(Contender):
    """txmgr in Paxos mode: three log databases (acceptors), a majority decides.

    Placement (given by the caller, see _servers.py): the first acceptor on the
    dedicated log server — the server ``txmgr-log`` uses — and one on each of
    the first two participants' servers, each a database of its own. So
    Paxos mode runs on the same servers as ``txmgr-log``, none added.

    ``down``: the first acceptor, the one on the log server, is down for the
    whole run (its DSN points at a port that refuses connections, see
    _down.py). That is the failure Paxos mode exists for — in the default
    mode, losing the log server stops every commit — and the one that should
    cost most where servers do not share CPUs: the log server carries nothing
    else, so without it every round waits for both participant servers, which
    are busy with the transactions' own work. (On one shared 2-core machine
    it makes no difference: a run with a participant server's acceptor down
    instead gave the same throughput, 0.99x.)
    """

    needs_acceptors = True

    def __init__(self, *, down: bool) -> None:
        self.down = down
        self.name = "txmgr-paxos-1down" if down else "txmgr-paxos"
        self.description = (
            "txmgr, Paxos log over 3 databases, the one on the log server down"
            if down else "txmgr, Paxos log over 3 databases (log server, participants 1 and 2)"
        )
        self._tm: txmgr.TransactionManager | None = None
        self._closed_port: ClosedPort | None = None
        self._counter = _DecisionCounter()
        self._two_phase = True  # every transaction writes two participants or more

    def open(self, dsns: dict[str, str], log_dsn: str, clients: int, *,
             acceptors: Sequence[str] = ()) -> list[Client]:
        if len(acceptors) != 3:
            raise ValueError(f"{self.name} needs 3 acceptor DSNs, got {len(acceptors)}")
        acceptors = list(acceptors)
        if self.down:
            self._closed_port = ClosedPort()
            acceptors[0] = self._closed_port.dsn_like(acceptors[0])
            # The pool of the down one retries in the background and would log
            # every refused attempt; txmgr logs the database down once.
            _POOL_LOGGER.setLevel(logging.ERROR)
        log = txmgr.PaxosLog(
            acceptors,
            pool_min_size=clients,
            # A round returns once a majority answered, leaving the slowest
            # acceptor's statement in flight on its connection for a while:
            # a client may hold two connections to one acceptor.
            pool_max_size=2 * clients + 2,
        )
        tm = self._tm = txmgr.TransactionManager(
            dsns, log=log, pool_min_size=clients, pool_max_size=clients + 2,
            hooks=self._counter,
        )
        ready = _txmgr_clients(tm, dsns, clients)
        log.slots()  # opens the acceptors' pools: they fill during the warm-up
        self._two_phase = len(dsns) > 1
        return ready

    def check(self, committed: int) -> list[str]:
        assert self._tm is not None
        problems = []
        decided = self._counter.take()
        if self._two_phase and decided != committed:
            problems.append(f"{committed} transactions committed but the Paxos log "
                            f"decided {decided}")
        statuses = self._tm.paxos().slots()
        answered = [s.error is None for s in statuses]
        expected = [not self.down, True, True]
        if answered != expected:
            problems.append("acceptors answering: " + ", ".join(
                f"{s.dsn}: {s.error or 'yes'}" for s in statuses) + f" (expected {expected})")
        return problems

    def close(self) -> None:
        if self._tm is not None:
            self._tm.close()
            self._tm = None
        if self._closed_port is not None:
            self._closed_port.close()
            self._closed_port = None
            _POOL_LOGGER.setLevel(logging.NOTSET)


def all_contenders() -> list[Contender]:
    return [
        Plain(),
        HandWritten(parallel=False),
        HandWritten(parallel=True),
        SQLAlchemyTwoPhase(),
        Txmgr(log="dedicated"),
        Txmgr(log="participant"),
        TxmgrPaxos(down=False),
        TxmgrPaxos(down=True),
    ]

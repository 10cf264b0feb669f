"""The coordinator: ``TransactionManager`` owns the pools and the decision log.

One manager is shared by every thread of an application; each
:meth:`TransactionManager.transaction` is independent. Nothing connects
until it is needed; the first ``transaction()`` checks the decision log's
schema, the first use of a participant checks its server. What it shares
with :class:`txmgr.AsyncTransactionManager` lives in
:mod:`txmgr._manager_base`; this module adds blocking pools and locks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import psycopg
import psycopg_pool

from txmgr import log as decision_log
from txmgr._deadline import Reaper
from txmgr._manager_base import FORGET_BATCH, ManagerBase
from txmgr.config import Config
from txmgr.errors import ConfigError, ParticipantUnavailable
from txmgr.hooks import Hooks
from txmgr.participant import Participant
from txmgr.transaction import Transaction

__all__ = ["FORGET_BATCH", "TransactionManager"]

logger = logging.getLogger("txmgr")


class TransactionManager(ManagerBase[Participant]):
    """Runs global transactions over the configured participants.

    >>> tm = TransactionManager({"orders": dsn1, "billing": dsn2}, log=log_dsn)
    >>> with tm.transaction() as tx:
    ...     tx.connection("orders").execute("INSERT …")
    ...     tx.connection("billing").execute("UPDATE …")
    >>> tm.close()

    ``log`` may be a :class:`txmgr.PaxosLog` (Paxos mode: a majority of several
    log databases decides; the manager closes it when it closes).

    Options: ``log_idle_timeout`` (seconds), ``pool_min_size``,
    ``pool_max_size``, ``connect_timeout`` (seconds), ``step_timeout``
    (seconds a protocol step waits for a server's answer; default None, no
    limit), ``hooks`` (a :class:`txmgr.Hooks`); :meth:`from_config` reads
    them from a file.
    """

    def _init(self, config: Config, hooks: Hooks | None) -> None:
        super()._init(config, hooks)
        self._lock = threading.Lock()
        self._log_pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._reaper: Reaper | None = None

    def _new_participant(self, name: str, dsn: str) -> Participant:
        return Participant(
            name,
            dsn,
            min_size=self.config.pool_min_size,
            max_size=self.config.pool_max_size,
            connect_timeout=self.config.connect_timeout,
            prepare_threshold=self.config.prepare_threshold,
        )

    # -- public API ---------------------------------------------------------

    def transaction(self, *, timeout: float | None = None) -> Transaction:
        """A new global transaction; use it as a context manager.

        ``timeout``: seconds from now to its decision (default: the config's
        ``[transaction] timeout``, else none); past it every branch is rolled
        back and the block raises :class:`~txmgr.errors.TransactionTimeout`.
        """
        self._require_open("transaction()")
        self._check_log()  # fail before any work when the log is unusable
        return Transaction(self, timeout)

    def reaper(self) -> Reaper:
        """The thread that ends transactions at their deadline (started on first use)."""
        if self._reaper is None:
            with self._lock:
                if self._reaper is None:
                    self._reaper = Reaper()
        return self._reaper

    def _check_log(self) -> None:
        if self.config.paxos_log is None:
            self.logid()
        elif self._logid is None:
            with self._lock:
                if self._logid is None:
                    # Every log database's schema, and a majority answering.
                    self.config.paxos_log.check()
                    self._logid = "paxos"

    def logid(self) -> str:
        """The decision log's id (connects and checks the log schema on first call)."""
        if self.config.paxos_log is not None:
            raise ConfigError("a Paxos log has no single log id: each gid names its voters")
        logid = self._logid
        if logid is None:
            with self._lock:
                if self._logid is None:
                    self._logid = self._read_logid()
                logid = self._logid
        return logid

    def check(self) -> None:
        """Connect to every participant and the log now, raising the first problem."""
        self._check_log()
        for p in self._participants.values():
            p.pool()

    def close(self) -> None:
        """Delete finished decision rows and close every pool."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_forget()
        except Exception as e:  # closing must not fail; the daemon cleans up
            logger.warning("could not delete finished decision rows on close: %s", e)
        if self._reaper is not None:
            self._reaper.close()
        for p in self._participants.values():
            p.close()
        if self._log_pool is not None:
            self._log_pool.close()
        if self.config.paxos_log is not None:
            self.config.paxos_log.close()

    def __enter__(self) -> TransactionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by Transaction ------------------------------------------------

    def log_connection(self, *, wait: bool = True) -> psycopg.Connection[Any]:
        """A connection to the dedicated log database (for the decision transaction).

        With ``wait=False`` only an idle pooled connection will do (else
        ParticipantUnavailable at once): the decision is then opened later.
        """
        pool = self._log_pool
        if pool is None:
            with self._lock:
                if self._log_pool is None:
                    self._log_pool = psycopg_pool.ConnectionPool(
                        self.config.log_dsn, open=True, **self._log_pool_options()
                    )
                pool = self._log_pool
        try:
            return pool.getconn(timeout=self.config.connect_timeout if wait else 0.001)
        except psycopg_pool.PoolTimeout as e:
            if not wait:  # the caller opens the decision later, on a waited connection
                raise ParticipantUnavailable("no idle log connection", participant="log") from e
            raise ParticipantUnavailable(self._log_unavailable(), participant="log") from e

    def release_log_connection(self, conn: psycopg.Connection[Any]) -> None:
        """Give a connection of :meth:`log_connection` back to its pool."""
        assert self._log_pool is not None
        self._log_pool.putconn(conn)

    def forget(self, txids: Iterable[str]) -> None:
        """Mark decision rows as finished (deleted by the next decision, or now if many)."""
        if self._queue_forget(txids):
            try:
                self._flush_forget()
            except Exception as e:
                logger.warning("could not delete finished decision rows: %s", e)

    # -- internals ------------------------------------------------------------

    def _flush_forget(self) -> None:
        batch = self.take_forget()
        if not batch:
            return
        try:
            paxos = self.config.paxos_log
            if paxos is not None:
                paxos.forget(batch)
            elif self.log_participant is None:
                conn = self.log_connection()
                try:
                    decision_log.delete_decisions(conn, batch)
                finally:
                    self.release_log_connection(conn)
            else:
                self._delete_decisions(batch)
        except BaseException:
            self.forget_later(batch)
            raise

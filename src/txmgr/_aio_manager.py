"""The asyncio coordinator: ``AsyncTransactionManager``.

The twin of :class:`txmgr.TransactionManager` with the same options and the
same state (:mod:`txmgr._manager_base`), over psycopg's async connections
and :class:`~psycopg_pool.AsyncConnectionPool`. One manager serves every
task of an event loop; each transaction belongs to one task. Nothing
connects until needed. The few blocking helpers that run rarely (checking a
server or the log schema on first use, deleting finished decisions in bulk,
asking the log about a lost COMMIT reply) run on a worker thread.

With a :class:`txmgr.PaxosLog` (Paxos mode) the log's calls are blocking and
thread-safe — rounds over several log databases that move on once a majority
answered — so every one of them (the check at open, a transaction's
registration and proposal, deleting finished slots, closing) runs on a worker
thread too, and the event loop stays free while a round waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import psycopg
import psycopg_pool

from txmgr._aio_participant import AsyncParticipant
from txmgr._aio_transaction import AsyncTransaction
from txmgr._manager_base import ManagerBase
from txmgr.config import Config
from txmgr.errors import ConfigError, ParticipantUnavailable
from txmgr.hooks import Hooks

__all__ = ["AsyncTransactionManager"]

logger = logging.getLogger("txmgr")


class AsyncTransactionManager(ManagerBase[AsyncParticipant]):
    """Runs global transactions over the configured participants, on asyncio.

    >>> async with AsyncTransactionManager({"orders": dsn1, "billing": dsn2},
    ...                                    log=log_dsn) as tm:
    ...     async with tm.transaction() as tx:
    ...         await (await tx.connection("orders")).execute("INSERT …")
    ...         await (await tx.connection("billing")).execute("UPDATE …")

    Options as for :class:`txmgr.TransactionManager`, ``log`` a
    :class:`txmgr.PaxosLog` too (closed with the manager); :meth:`from_config`
    reads them from a file. Hooks are called on the event loop and must be quick.
    """

    def _init(self, config: Config, hooks: Hooks | None) -> None:
        super()._init(config, hooks)
        self._lock = asyncio.Lock()  # binds to the loop of its first use
        self._log_pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = (
            None
        )

    def _new_participant(self, name: str, dsn: str) -> AsyncParticipant:
        return AsyncParticipant(
            name,
            dsn,
            min_size=self.config.pool_min_size,
            max_size=self.config.pool_max_size,
            connect_timeout=self.config.connect_timeout,
            prepare_threshold=self.config.prepare_threshold,
        )

    # -- public API ---------------------------------------------------------

    def transaction(self, *, timeout: float | None = None) -> AsyncTransaction:
        """A new global transaction; use it as ``async with tm.transaction() as tx``.

        Entering the block checks the decision log on first use (without the
        block, the first ``connection()`` or ``commit()`` does). ``timeout``: as
        :meth:`txmgr.TransactionManager.transaction`.
        """
        self._require_open("transaction()")
        return AsyncTransaction(self, timeout)

    async def open(self) -> None:
        """Check the decision log now (``async with`` calls it); optional otherwise."""
        self._require_open("open()")
        await self.check_log()

    async def check_log(self) -> None:
        """Check the decision log on first call (later calls return at once): the
        log's schema, or in Paxos mode every log database's schema and a majority
        answering (LogQuorumUnavailable otherwise)."""
        paxos = self.config.paxos_log
        if paxos is None:
            await self.logid()
        elif self._logid is None:
            async with self._lock:
                if self._logid is None:
                    await asyncio.to_thread(paxos.check)
                    self._logid = "paxos"  # checked (a Paxos gid names voters, not a log id)

    async def logid(self) -> str:
        """The decision log's id (connects and checks the log schema on first call)."""
        if self.config.paxos_log is not None:
            raise ConfigError("a Paxos log has no single log id: each gid names its voters")
        logid = self._logid
        if logid is None:
            async with self._lock:
                if self._logid is None:
                    self._logid = await asyncio.to_thread(self._read_logid)
                logid = self._logid
        return logid

    async def check(self) -> None:
        """Connect to every participant and the log now, raising the first problem."""
        await self.check_log()
        for p in self._participants.values():
            await p.pool()

    async def close(self) -> None:
        """Delete finished decision rows and close every pool (and the Paxos log)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._flush_forget()
        except Exception as e:  # closing must not fail; the daemon cleans up
            logger.warning("could not delete finished decision rows on close: %s", e)
        for p in self._participants.values():
            await p.close()
        if self._log_pool is not None:
            await self._log_pool.close()
        if self.config.paxos_log is not None:
            # Joins its collector thread and closes its pools: blocking.
            await asyncio.to_thread(self.config.paxos_log.close)

    async def __aenter__(self) -> AsyncTransactionManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- used by AsyncTransaction ---------------------------------------------

    async def log_connection(self, *, wait: bool = True) -> psycopg.AsyncConnection[Any]:
        """A connection to the dedicated log database (for the decision transaction).

        With ``wait=False`` only an idle pooled connection will do (else
        ParticipantUnavailable at once): the decision is then opened later.
        """
        pool = self._log_pool
        if pool is None:
            async with self._lock:
                if self._log_pool is None:
                    new = psycopg_pool.AsyncConnectionPool(
                        self.config.log_dsn, open=False, **self._log_pool_options()
                    )
                    await new.open()
                    self._log_pool = new
                pool = self._log_pool
        try:
            return await pool.getconn(timeout=self.config.connect_timeout if wait else 0.001)
        except psycopg_pool.PoolTimeout as e:
            if not wait:  # the caller opens the decision later, on a waited connection
                raise ParticipantUnavailable("no idle log connection", participant="log") from e
            why = await asyncio.to_thread(self._log_unavailable)
            raise ParticipantUnavailable(why, participant="log") from e

    async def release_log_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give a connection of :meth:`log_connection` back to its pool."""
        assert self._log_pool is not None
        await self._log_pool.putconn(conn)

    async def forget(self, txids: Iterable[str]) -> None:
        """Mark decision rows as finished (deleted by the next decision, or now if many)."""
        if self._queue_forget(txids):
            try:
                await self._flush_forget()
            except Exception as e:
                logger.warning("could not delete finished decision rows: %s", e)

    # -- internals ------------------------------------------------------------

    async def _flush_forget(self) -> None:
        batch = self.take_forget()
        if not batch:
            return
        try:
            paxos = self.config.paxos_log
            if paxos is not None:
                # A slot is deleted on every log database that answers; the
                # others' are cleaned up by recovery.
                await asyncio.to_thread(paxos.forget, batch)
            else:
                await asyncio.to_thread(self._delete_decisions, batch)
        except BaseException:
            self.forget_later(batch)
            raise

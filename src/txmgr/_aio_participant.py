"""A participant's asyncio pool: the async twin of :class:`txmgr.participant.Participant`.

Settings, messages and the server check are :class:`ParticipantBase`'s; the
check runs once, on a worker thread, before the pool opens (so that it is
one implementation for both front ends), and everything after that is
psycopg's :class:`~psycopg_pool.AsyncConnectionPool`.
"""

from __future__ import annotations

import asyncio

import psycopg_pool

from txmgr._branch import AsyncBranchConnection
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD
from txmgr.participant import ParticipantBase

__all__ = ["AsyncParticipant"]


class AsyncParticipant(ParticipantBase):
    """A named participant with an asyncio connection pool, opened on first use."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    ) -> None:
        super().__init__(
            name, dsn, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout,
            prepare_threshold=prepare_threshold,
        )
        self._lock = asyncio.Lock()  # binds to the loop of its first use
        self._pool: psycopg_pool.AsyncConnectionPool[AsyncBranchConnection] | None = None
        self._closed = False

    async def pool(self) -> psycopg_pool.AsyncConnectionPool[AsyncBranchConnection]:
        """The pool, opened on first use after checking the server once."""
        pool = self._pool
        if pool is not None:
            return pool
        async with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._pool is None:
                await asyncio.to_thread(self.check)
                pool = psycopg_pool.AsyncConnectionPool(
                    self.dsn, connection_class=AsyncBranchConnection, open=False,
                    **self._pool_options(),
                )
                await pool.open()
                self._pool = pool
            return self._pool

    async def checkout(self) -> AsyncBranchConnection:
        """A connection from the pool (autocommit, not in a transaction)."""
        pool = await self.pool()
        try:
            return await pool.getconn(timeout=self._connect_timeout)
        except psycopg_pool.PoolTimeout as e:
            raise await asyncio.to_thread(self._timeout_error) from e

    async def release(self, conn: AsyncBranchConnection) -> None:
        """Give a connection back; the pool rolls back anything left open."""
        conn._txmgr_branch = None
        pool = self._pool
        if pool is None:
            await conn.close()
        else:
            await pool.putconn(conn)

    async def close(self) -> None:
        """Close the pool; the participant cannot be used afterwards."""
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

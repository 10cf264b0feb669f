"""The asyncio twin of the ``postgresql+txmgr`` dialect: ``postgresql+txmgr_async``.

SQLAlchemy's asyncio psycopg dialect (``postgresql+psycopg`` under
``create_async_engine``) with txmgr's branch rules: the same
:class:`~txmgr.sqlalchemy._dialect.BranchLifecycle` mixin as the sync
dialect, so commit, rollback, close and two-phase calls mean exactly what
they mean there. Its DBAPI connections are SQLAlchemy's adapters around the
:class:`psycopg.AsyncConnection` of a branch of an
:class:`~txmgr.AsyncTransaction`; the lifecycle methods never reach them.
"""

from __future__ import annotations

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg
from sqlalchemy.engine import URL, Dialect

from txmgr.sqlalchemy._dialect import BranchLifecycle

__all__ = ["ASYNC_DRIVER_NAME", "AsyncBranchDialect"]

#: URL drivername of asyncio engines on txmgr branches.
ASYNC_DRIVER_NAME = "postgresql+txmgr_async"


class AsyncBranchDialect(BranchLifecycle, PGDialectAsync_psycopg):
    """PostgreSQL over psycopg 3's asyncio connections, on connections owned by txmgr."""

    supports_statement_cache = True

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[Dialect]:
        # psycopg's dialect answers with its own asyncio class, which would
        # drop txmgr's rules: an asyncio Engine on this URL uses this class.
        return cls

    def on_connect(self) -> None:
        # As BranchDialect: no notice handler added once per transaction to a
        # connection that lives on in txmgr's pool.
        return None


registry.register(ASYNC_DRIVER_NAME.replace("+", "."), __name__, "AsyncBranchDialect")

"""SQLAlchemy 2 (Core and ORM) with txmgr's atomic commit.

An ORM session over several participants, committed by txmgr::

    import txmgr.sqlalchemy

    Session = txmgr.sqlalchemy.sessionmaker(tm, binds={Order: "orders", Invoice: "billing"})
    with Session() as session:
        session.add_all([Order(id=7, total=40), Invoice(order_id=7, amount=40)])
        session.commit()          # txmgr's commit: both databases, or neither

The same on asyncio, over an AsyncTransactionManager (SQLAlchemy's AsyncSession)::

    Session = txmgr.sqlalchemy.async_sessionmaker(atm, binds={Order: "orders", ...})
    async with Session() as session:
        session.add(Order(id=7, total=40))
        await session.commit()

Or SQLAlchemy on the branches of one global transaction block::

    db = txmgr.sqlalchemy.SQLAlchemy(tm)      # once, next to the TransactionManager
    with db.transaction() as tx:
        tx.session("orders").add(Order(id=7, total=40))
        tx.connection("billing").execute(update(accounts).values(...))
    # leaving the block flushes the sessions, then commits both branches atomically

Everything runs on txmgr's own branch connections, so all of it is part of
the prepared branches. See the README, section "SQLAlchemy", for the rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from txmgr.sqlalchemy._db import SQLAlchemy, sessionmaker
from txmgr.sqlalchemy._engine import ENGINE_OPTIONS
from txmgr.sqlalchemy._session import BranchSession
from txmgr.sqlalchemy._transaction import SQLAlchemyTransaction
from txmgr.sqlalchemy._twophase import ParticipantEngine, TwoPhaseSession

if TYPE_CHECKING:
    from txmgr.sqlalchemy._aio import AsyncSQLAlchemy, AsyncTwoPhaseSession, async_sessionmaker

__all__ = [
    "ENGINE_OPTIONS",
    "AsyncSQLAlchemy",
    "AsyncTwoPhaseSession",
    "BranchSession",
    "ParticipantEngine",
    "SQLAlchemy",
    "SQLAlchemyTransaction",
    "TwoPhaseSession",
    "async_sessionmaker",
    "sessionmaker",
]

_ASYNC_NAMES = frozenset({"AsyncSQLAlchemy", "AsyncTwoPhaseSession", "async_sessionmaker"})


def __getattr__(name: str) -> Any:
    # The asyncio session is imported on first use: SQLAlchemy's asyncio
    # extension needs greenlet, which the sync side does not.
    if name not in _ASYNC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from txmgr.sqlalchemy import _aio
    except ImportError as e:
        raise ImportError(
            f"txmgr.sqlalchemy.{name} needs SQLAlchemy's asyncio support ({e}); install "
            "txmgr[sqlalchemy] (it brings sqlalchemy[asyncio], i.e. greenlet)"
        ) from e
    return getattr(_aio, name)

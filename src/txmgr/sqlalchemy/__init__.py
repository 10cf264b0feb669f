"""SQLAlchemy 2 (Core and ORM) with txmgr's atomic commit.

An ORM session over several participants, committed by txmgr::

    import txmgr.sqlalchemy

    Session = txmgr.sqlalchemy.sessionmaker(tm, binds={Order: "orders", Invoice: "billing"})
    with Session() as session:
        session.add_all([Order(id=7, total=40), Invoice(order_id=7, amount=40)])
        session.commit()          # txmgr's commit: both databases, or neither

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

from txmgr.sqlalchemy._db import SQLAlchemy, sessionmaker
from txmgr.sqlalchemy._engine import ENGINE_OPTIONS
from txmgr.sqlalchemy._session import BranchSession
from txmgr.sqlalchemy._transaction import SQLAlchemyTransaction
from txmgr.sqlalchemy._twophase import ParticipantEngine, TwoPhaseSession

__all__ = [
    "ENGINE_OPTIONS",
    "BranchSession",
    "ParticipantEngine",
    "SQLAlchemy",
    "SQLAlchemyTransaction",
    "TwoPhaseSession",
    "sessionmaker",
]

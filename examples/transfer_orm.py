"""Move money between two databases atomically, with SQLAlchemy's ORM.

    python examples/transfer_orm.py

The same transfers as ``transfer_core.py``, written as SQLAlchemy ORM code: one
session spans both databases (each mapped class is bound to a participant,
as SQLAlchemy binds classes to engines), and ``session.commit()`` is txmgr's
two-phase commit. Account 1 in ``orders`` pays 30 to account 1 in ``billing``;
then a transfer of more than the account holds fails on one database (a CHECK
constraint, found when the session flushes) and is rolled back on both. DSNs
come from ``$ORDERS_DSN``, ``$BILLING_DSN`` and ``$TXLOG_DSN``, else throwaway
servers are started (see ``_servers.py``).
"""

from __future__ import annotations

import psycopg
import sqlalchemy as sa
from _servers import balances, create_accounts, example_databases
from sqlalchemy import exc, orm
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txmgr
import txmgr.sqlalchemy


class OrdersBase(DeclarativeBase):
    """Tables of the orders database."""


class BillingBase(DeclarativeBase):
    """Tables of the billing database."""


class Customer(OrdersBase):
    __tablename__ = "example_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Merchant(BillingBase):
    __tablename__ = "example_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


def engine_for(dsn: str) -> sa.Engine:
    """The application's own Engine for a database (psycopg 3; any form of libpq DSN)."""
    return sa.create_engine(
        sa.URL.create("postgresql+psycopg", query=psycopg.conninfo.conninfo_to_dict(dsn))
    )


def transfer(Session: orm.sessionmaker[txmgr.sqlalchemy.TwoPhaseSession], amount: int) -> None:
    """Debit the customer in orders, credit the merchant in billing: one global transaction."""
    with Session.begin() as session:
        customer = session.get_one(Customer, 1)
        merchant = session.get_one(Merchant, 1)
        customer.balance -= amount
        merchant.balance += amount
    # Leaving the block flushed both changes and committed them with txmgr's
    # two-phase commit (decision logged); an error rolled back both.


def main() -> None:
    with example_databases() as db:
        for dsn in db.participants.values():
            create_accounts(dsn, {1: 100})
        # Your own engines give the dialect's options (echo, execution options, …);
        # they must point at the participants' databases. txmgr makes the
        # connections of the session, so that they are its branches.
        engines = {name: engine_for(dsn) for name, dsn in db.participants.items()}
        with txmgr.TransactionManager(db.participants, log=db.log) as tm:
            Session = txmgr.sqlalchemy.sessionmaker(
                tm, engines=engines, binds={OrdersBase: "orders", BillingBase: "billing"}
            )
            transfer(Session, 30)
            print("moved 30:", {name: balances(dsn)[1] for name, dsn in db.participants.items()})
            try:
                transfer(Session, 500)  # the customer holds 70: orders' CHECK refuses
            except exc.IntegrityError as e:
                constraint = getattr(getattr(e.orig, "diag", None), "constraint_name", None)
                print(f"moving 500 failed ({constraint}); nothing changed:",
                      {name: balances(dsn)[1] for name, dsn in db.participants.items()})
        for engine in engines.values():
            engine.dispose()


if __name__ == "__main__":
    main()

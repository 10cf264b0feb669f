"""Move money between two databases atomically, with txmgr's core API.

    python examples/transfer_core.py

Account 1 in the ``orders`` database pays 30 to account 1 in the ``billing``
database: both updates commit, or neither does. A second transfer, of more than
the account holds, fails on one database (a CHECK constraint) and is rolled back
on both. DSNs come from ``$ORDERS_DSN``, ``$BILLING_DSN`` and ``$TXLOG_DSN``, else
throwaway servers are started (see ``_servers.py``).
"""

from __future__ import annotations

import psycopg
from _servers import balances, create_accounts, example_databases

import txmgr


def transfer(tm: txmgr.TransactionManager, amount: int) -> None:
    """Debit orders' account 1, credit billing's account 1: one global transaction."""
    with tm.transaction() as tx:
        tx.connection("orders").execute(
            "UPDATE example_accounts SET balance = balance - %s WHERE id = 1", (amount,)
        )
        tx.connection("billing").execute(
            "UPDATE example_accounts SET balance = balance + %s WHERE id = 1", (amount,)
        )
    # Leaving the block committed both branches (two-phase commit, decision logged).


def main() -> None:
    with example_databases() as db:
        for dsn in db.participants.values():
            create_accounts(dsn, {1: 100})
        with txmgr.TransactionManager(db.participants, log=db.log) as tm:
            transfer(tm, 30)
            print("moved 30:", {name: balances(dsn)[1] for name, dsn in db.participants.items()})
            try:
                transfer(tm, 500)  # orders' account holds 70: its CHECK refuses
            except psycopg.errors.CheckViolation as e:
                print(f"moving 500 failed ({e.diag.constraint_name}); nothing changed:",
                      {name: balances(dsn)[1] for name, dsn in db.participants.items()})


if __name__ == "__main__":
    main()

"""Move money between two databases atomically, with txmgr's asyncio API.

    python examples/transfer_async.py

The transfer of ``transfer_core.py``, on asyncio: account 1 in the ``orders``
database pays 30 to account 1 in the ``billing`` database — as three transfers
of 10 running as concurrent tasks on one event loop — and each commits on both
databases or on neither. A transfer of more than the account holds fails on one
database (a CHECK constraint) and is rolled back on both. DSNs come from
``$ORDERS_DSN``, ``$BILLING_DSN`` and ``$TXLOG_DSN``, else throwaway servers are
started (see ``_servers.py``).
"""

from __future__ import annotations

import asyncio

import psycopg
from _servers import create_accounts, example_databases

import txmgr


async def transfer(tm: txmgr.AsyncTransactionManager, amount: int) -> None:
    """Debit orders' account 1, credit billing's account 1: one global transaction."""
    async with tm.transaction() as tx:
        orders = await tx.connection("orders")
        await orders.execute(
            "UPDATE example_accounts SET balance = balance - %s WHERE id = 1", (amount,)
        )
        billing = await tx.connection("billing")
        await billing.execute(
            "UPDATE example_accounts SET balance = balance + %s WHERE id = 1", (amount,)
        )
    # Leaving the block committed both branches (two-phase commit, decision logged).


async def balances(tm: txmgr.AsyncTransactionManager) -> dict[str, int]:
    """Account 1 on each database, read in a read-only global transaction."""
    found = {}
    async with tm.transaction() as tx:
        for name in ("orders", "billing"):
            conn = await tx.connection(name)
            cur = await conn.execute("SELECT balance FROM example_accounts WHERE id = 1")
            row = await cur.fetchone()
            assert row is not None
            found[name] = row[0]
    return found


async def run(participants: dict[str, str], log: str) -> None:
    async with txmgr.AsyncTransactionManager(participants, log=log) as tm:
        # Three tasks at once: each waits for the servers without blocking the others
        # (they queue on the row lock of account 1, one after the other).
        await asyncio.gather(*(transfer(tm, 10) for _ in range(3)))
        print("moved 30:", await balances(tm))
        try:
            await transfer(tm, 500)  # orders' account holds 70: its CHECK refuses
        except psycopg.errors.CheckViolation as e:
            print(f"moving 500 failed ({e.diag.constraint_name}); nothing changed:",
                  await balances(tm))


def main() -> None:
    with example_databases() as db:
        for dsn in db.participants.values():
            create_accounts(dsn, {1: 100})
        asyncio.run(run(db.participants, db.log))


if __name__ == "__main__":
    main()

"""Bank soak: transfers from live coordinators and from coordinators killed at
random protocol steps, recovery racing them, and the money must add up.

Short by default; ``TXMGR_SOAK=1`` runs the long version (marked ``soak``).
"""

from __future__ import annotations

import os
import random
import threading

import psycopg
import pytest

import txmgr
from support import Bank, MakeBank, RecoveryLoop
from txmgr.testing.killed_coordinator import KILL_POINTS

pytestmark = pytest.mark.soak

LONG = os.environ.get("TXMGR_SOAK", "") == "1"
KILLED = 60 if LONG else 5
LIVE = 2000 if LONG else 60


@pytest.mark.parametrize("log", ["dedicated", "a"])
def test_bank_survives_killed_coordinators(make_bank: MakeBank, log: str) -> None:
    bank: Bank = make_bank(("a", "b", "c"), log=log)
    rng = random.Random(20261126)
    tm = bank.manager(pool_max_size=4)
    errors: list[BaseException] = []

    def live(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(LIVE // 2):
                src, dst = r.sample(["a", "b", "c"], 2)
                # accounts 3 and 4 only: killed coordinators below use 1 and 2, and
                # their in-doubt branches hold row locks until recovery ends them
                account = r.choice([3, 4])
                amount = r.randint(1, 50)
                try:
                    with tm.transaction() as tx:
                        first, second = sorted([src, dst])  # one lock order: no deadlock
                        for name in (first, second):
                            sign = -1 if name == src else 1
                            tx.connection(name).execute(
                                "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                (sign * amount, account))
                except psycopg.errors.CheckViolation:
                    pass  # the balance check refused it: the block rolled back everywhere
        except BaseException as e:
            errors.append(e)

    with RecoveryLoop(bank.config()) as loop:
        threads = [threading.Thread(target=live, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        try:
            for i in range(KILLED):
                src, dst = rng.sample(["a", "b", "c"], 2)
                amount = rng.randint(1, 100)
                account = 1 + i % 2
                bank.kill_coordinator(rng.choice(KILL_POINTS), {
                    src: [f"UPDATE accounts SET balance = balance - {amount} WHERE id = {account}"],
                    dst: [f"UPDATE accounts SET balance = balance + {amount} WHERE id = {account}"],
                })
        finally:
            for t in threads:
                t.join()
    reports = loop.reports
    assert errors == []
    final = txmgr.recover(bank.config())
    assert final.ok and final.in_progress == 0, final.errors
    assert bank.prepared() == []
    assert bank.total() == bank.expected_total  # nothing lost, nothing created
    assert all(r.ok for r in reports), [r.errors for r in reports if not r.ok]
    tm.close()
    txmgr.recover(bank.config())
    assert bank.decisions() == []

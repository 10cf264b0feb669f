"""``txmgr demo``: money moves between two banks on two throwaway servers.

It starts two local PostgreSQL servers, keeps accounts in a database on
each, moves money between them from several threads through txmgr, then
kills coordinator processes in the middle of commits (one before and one
after the decision), shows the in-doubt branches they left, runs recovery
and checks that the money adds up: nothing lost, nothing created.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from txmgr._gid import GID_PREFIX
from txmgr._migrate import migrate
from txmgr.config import Config
from txmgr.errors import TransactionAborted
from txmgr.manager import TransactionManager
from txmgr.recovery import recover

__all__ = ["run_demo"]

ACCOUNTS = 10
START_BALANCE = 1000


def _setup_bank(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))"
        )
        conn.execute(
            "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
            (START_BALANCE, ACCOUNTS),
        )


def _total(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
        assert row is not None
        return int(row[0])


def _in_doubt(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
            "AND starts_with(gid, %s)",
            (GID_PREFIX,),
        ).fetchall()
    return [r[0] for r in rows]


def _transfer_statements(amount: int, src: int, dst: int) -> dict[str, list[str]]:
    return {
        "bank_a": [f"UPDATE accounts SET balance = balance - {amount} WHERE id = {src}"],
        "bank_b": [f"UPDATE accounts SET balance = balance + {amount} WHERE id = {dst}"],
    }


def run_demo(transfers: int = 200, threads: int = 4, echo: Callable[[str], None] = print) -> bool:
    """Run the demo; returns True when the totals match after recovery."""
    from txmgr.testing import PgServer  # the harness is only needed here

    echo("starting two throwaway PostgreSQL servers ...")
    with PgServer() as server_a, PgServer() as server_b:
        dsns = {
            "bank_a": server_a.create_database("bank_a"),
            "bank_b": server_b.create_database("bank_b"),
        }
        log_dsn = server_a.create_database("txlog")
        migrate(log_dsn)
        for dsn in dsns.values():
            _setup_bank(dsn)
        expected = 2 * ACCOUNTS * START_BALANCE
        echo(f"bank_a on port {server_a.port}, bank_b on port {server_b.port}, "
             f"log in txlog; total money: {expected}")

        tm = TransactionManager(dsns, log=log_dsn)
        aborted = [0]

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(transfers // threads):
                amount = rng.randint(1, 300)
                # From a to b or back: the sign says which. Both directions touch
                # bank_a first: txmgr does not detect deadlocks across databases,
                # so transactions must take their locks in one order.
                sign = 1 if rng.random() < 0.5 else -1
                try:
                    with tm.transaction() as tx:
                        tx.connection("bank_a").execute(
                            "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                            (sign * amount, rng.randint(1, ACCOUNTS)),
                        )
                        tx.connection("bank_b").execute(
                            "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                            (sign * amount, rng.randint(1, ACCOUNTS)),
                        )
                except (TransactionAborted, psycopg.errors.CheckViolation):
                    aborted[0] += 1  # the CHECK (balance >= 0) refused it: nothing moved

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        tm.close()
        echo(f"{transfers} transfers from {threads} threads ({aborted[0]} refused by a "
             "balance check and rolled back everywhere)")

        # Different accounts: the first one's prepared branches keep their row locks.
        for account, kill_at, amount in ((1, "before_decision", 111), (2, "after_decision", 222)):
            spec: dict[str, Any] = {
                "participants": dsns,
                "log": log_dsn,
                "statements": _transfer_statements(amount, account, account),
                "kill_at": kill_at,
            }
            proc = subprocess.run(
                [sys.executable, "-m", "txmgr.testing.killed_coordinator", json.dumps(spec)],
                capture_output=True, text=True, check=False,
            )
            echo(f"coordinator moving {amount} killed with SIGKILL {kill_at.replace('_', ' ')} "
                 f"(exit status {proc.returncode})")
        for name, dsn in dsns.items():
            for gid in _in_doubt(dsn):
                echo(f"  in doubt on {name}: {gid}")
        before = _total(dsns["bank_a"]) + _total(dsns["bank_b"])
        echo(f"total while branches are in doubt: {before} (locked money is not visible)")

        report = recover(Config(participants=dsns, log=log_dsn))
        echo(f"recovery: {report.summary()}")
        left = sum(len(_in_doubt(d)) for d in dsns.values())
        total = _total(dsns["bank_a"]) + _total(dsns["bank_b"])
        ok = total == expected and left == 0 and report.ok
        verdict = "match" if ok else "DO NOT MATCH"
        echo(f"totals {verdict}: {total} == {expected}; branches left in doubt: {left}")
        return ok

"""Side-by-side commit cost: txmgr versus a hand-written two-phase commit.

Both move money between two databases on two local servers, sequentially, in
one run of this script; the result is a ratio (timings on a shared machine are
noisy, ratios measured side by side much less so).

The hand-written baseline is what an application would write with psycopg's
tpc_* API and a decision table: prepare each branch in turn, insert the
decision (autocommit), commit each branch in turn, delete the decision.

    python3 benchmarks/commit_latency.py --transactions 2000 [--fsync]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg

import txmgr
from txmgr.testing import PgServer


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
        c.execute("INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, 100) g")


def hand_written(dsns: dict[str, str], log_dsn: str) -> Callable[[int], None]:
    conns = {n: psycopg.connect(d) for n, d in dsns.items()}
    log = psycopg.connect(log_dsn, autocommit=True)
    log.execute("CREATE TABLE IF NOT EXISTS decisions (gid text PRIMARY KEY)")

    def one(i: int) -> None:
        gid = uuid.uuid4().hex
        xids = {}
        for n, c in conns.items():
            xids[n] = c.xid(1, gid, n)
            c.tpc_begin(xids[n])
            c.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                      (1 if n == "a" else -1, 1 + i % 100))
        for c in conns.values():
            c.tpc_prepare()
        log.execute("INSERT INTO decisions VALUES (%s)", (gid,))
        for c in conns.values():
            c.tpc_commit()
        log.execute("DELETE FROM decisions WHERE gid = %s", (gid,))

    return one


def with_txmgr(tm: txmgr.TransactionManager) -> Callable[[int], None]:
    def one(i: int) -> None:
        with tm.transaction() as tx:
            for n in ("a", "b"):
                tx.connection(n).execute(
                    "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                    (1 if n == "a" else -1, 1 + i % 100))

    return one


def measure(fn: Callable[[int], None], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each")
    ap.add_argument("--fsync", action="store_true", help="servers with fsync=on")
    args = ap.parse_args()
    settings = {"fsync": "on"} if args.fsync else {}
    with PgServer(settings=settings) as s1, PgServer(settings=settings) as s2:
        dsns = {"a": s1.create_database(), "b": s2.create_database()}
        for d in dsns.values():
            setup(d)
        log_dsn = s1.create_database()
        txmgr.migrate(log_dsn)
        tm = txmgr.TransactionManager(dsns, log_dsn)
        runners = {"hand-written": hand_written(dsns, s1.create_database()),
                   "txmgr": with_txmgr(tm)}
        results: dict[str, list[float]] = {k: [] for k in runners}
        per_round = args.transactions // args.rounds
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            for name, fn in runners.items():
                results[name] += measure(fn, per_round)
        tm.close()
    base = statistics.median(results["hand-written"])
    print(f"{'':14}{'median ms':>10}{'p99 ms':>10}{'tx/s':>9}{'ratio':>8}")
    for name, xs in results.items():
        med = statistics.median(xs)
        p99 = sorted(xs)[int(0.99 * len(xs))]
        print(f"{name:14}{med * 1e3:10.3f}{p99 * 1e3:10.3f}{len(xs) / sum(xs):9.0f}"
              f"{base / med:8.2f}")
    print("ratio = hand-written median / this median (above 1: faster than hand-written)")


if __name__ == "__main__":
    main()

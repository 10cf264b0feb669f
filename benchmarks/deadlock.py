"""Contention benchmark: distributed deadlock detection latency, a contended bank
with random versus fixed lock order, and the cost of tagging branches.

(a) N induced deadlocks of 2 transactions over 2 servers and of 3 over 3: the
    latency from the cycle forming (the last conflicting statement sent) to the
    victim's DeadlockDetected, with a detector thread running a pass every
    ``--interval`` seconds (like the daemon);
(b) 8 client threads moving money between 4 hot accounts on each of two
    participants with run_transaction, locks taken in random order (distributed
    deadlocks, broken by the detector) or in a fixed order;
(c) uncontended commits with the branch tag on and off. There is no switch for
    tagging: "off" replaces ``txmgr._tag.begin_fragment`` with a no-op select item
    inside this process only.

Starts its own servers unless ``--dsns`` (3 participant DSNs) and ``--log-dsn``
are given. Prints a markdown table; ``--json`` writes the results too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

import txmgr
from txmgr import _tag
from txmgr.deadlock import Detector

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _servers

HOT = 4
TABLE = "txmgr_bench_dl"


def _setup(dsns: list[str]) -> None:
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {TABLE}")
            c.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, balance bigint NOT NULL)")
            c.execute(f"INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(1, 100) g")


def _reset(dsns: list[str]) -> None:
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"UPDATE {TABLE} SET balance = 0")


def _total(dsns: list[str]) -> int:
    total = 0
    for dsn in dsns:
        with psycopg.connect(dsn) as c:
            row = c.execute(f"SELECT sum(balance) FROM {TABLE}").fetchone()
            total += int(row[0]) if row else 0
    return total


class _DetectorThread:
    def __init__(self, config: txmgr.Config, interval: float) -> None:
        self.detector = Detector(config)
        self.interval = interval
        self.cancelled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.cancelled += len(self.detector.run_pass().cancelled)
            except Exception as e:  # a pass that failed: the next one retries
                print(f"detector pass failed: {e}", file=sys.stderr)
            self._stop.wait(self.interval)

    def __enter__(self) -> _DetectorThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.detector.close()


def _percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))] if s else float("nan")


def _induce(tm: txmgr.TransactionManager, names: list[str], timeout: float) -> tuple[int, float]:
    """One deadlock around ``names``: transaction i locks row 1 on names[i], then
    row 1 on names[i+1]. Returns (victims, latency of the victim)."""
    k = len(names)
    barrier = threading.Barrier(k)
    sent = [0.0] * k
    outcome: list[tuple[str, float]] = [("", 0.0)] * k

    def run(i: int) -> None:
        try:
            with tm.transaction(timeout=timeout) as tx:
                tx.connection(names[i]).execute(
                    f"UPDATE {TABLE} SET balance = balance + 1 WHERE id = 1")
                barrier.wait()
                sent[i] = time.monotonic()
                tx.connection(names[(i + 1) % k]).execute(
                    f"UPDATE {TABLE} SET balance = balance - 1 WHERE id = 1")
            outcome[i] = ("committed", time.monotonic())
        except txmgr.DeadlockDetected:
            outcome[i] = ("victim", time.monotonic())
        except Exception as e:
            outcome[i] = (f"error: {e!r}", time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o, _ in outcome if o.startswith("error")]
    if errors:
        raise RuntimeError(f"induced deadlock failed: {errors}")
    victims = [at for o, at in outcome if o == "victim"]
    formed = max(sent)
    return len(victims), (victims[0] - formed) if victims else float("nan")


def _deadlocks(tm: txmgr.TransactionManager, names: list[str], n: int,
               timeout: float) -> dict[str, Any]:
    latencies, victims = [], []
    for _ in range(n):
        v, lat = _induce(tm, names, timeout)
        victims.append(v)
        latencies.append(lat)
    return {"deadlocks": n, "victims": victims, "p50": _percentile(latencies, 50),
            "p99": _percentile(latencies, 99)}


def _bank(tm: txmgr.TransactionManager, seconds: float, clients: int,
          random_order: bool, rows: int = HOT) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {"commits": 0, "attempts": 0, "longest": 0.0}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            x, y = rng.randint(1, rows), rng.randint(1, rows)
            amount = rng.choice((-1, 1))
            order = [("p0", x, -amount), ("p1", y, amount)]
            if random_order and rng.random() < 0.5:
                order.reverse()

            def fn(tx: txmgr.Transaction, order: list[tuple[str, int, int]] = order) -> None:
                with lock:
                    stats["attempts"] += 1
                for name, row, delta in order:
                    tx.connection(name).execute(
                        f"UPDATE {TABLE} SET balance = balance + %s WHERE id = %s", (delta, row))

            start = time.monotonic()
            txmgr.run_transaction(tm, fn, max_attempts=1000)
            took = time.monotonic() - start
            with lock:
                stats["commits"] += 1
                stats["longest"] = max(stats["longest"], took)

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {**stats, "elapsed": elapsed}


@contextlib.contextmanager
def _untagged() -> Iterator[None]:
    real = _tag.begin_fragment
    _tag.begin_fragment = lambda txid, conn: b"NULL"  # type: ignore[assignment]
    try:
        yield
    finally:
        _tag.begin_fragment = real  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadlocks", type=int, default=100, help="induced deadlocks per shape")
    ap.add_argument("--interval", type=float, default=1.0, help="detector pass interval (s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per bank run")
    ap.add_argument("--clients", type=int, default=8, help="client threads of the bank")
    ap.add_argument("--dsns", help="3 comma-separated participant DSNs instead of servers")
    ap.add_argument("--log-dsn", help="with --dsns: the decision log's database")
    ap.add_argument("--tag-rounds", type=int, default=7,
                    help="rounds of the tagging comparison, each tagged then untagged "
                         "(alternating which goes first)")
    ap.add_argument("--tag-seconds", type=float, default=5.0,
                    help="seconds of each tagging round")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.dsns:
            dsns = args.dsns.split(",")
            if len(dsns) != 3 or not args.log_dsn:
                ap.error("--dsns takes 3 DSNs, and --log-dsn is needed")
            log = args.log_dsn
        else:
            dbs = stack.enter_context(_servers.started(3, paxos=False))
            dsns, log = dbs.participants, dbs.log
        return _measure(args, dsns, log)


def _measure(args: argparse.Namespace, dsns: list[str], log: str) -> int:
    _setup(dsns)
    txmgr.migrate(log)
    participants = {f"p{i}": d for i, d in enumerate(dsns)}
    config = txmgr.Config(participants=participants, log=log)
    results: dict[str, Any] = {}
    timeout = max(30.0, 10 * args.interval)
    with txmgr.TransactionManager(participants, log) as tm:
        with _DetectorThread(config, args.interval) as det:
            results["dl2"] = _deadlocks(tm, ["p0", "p1"], args.deadlocks, timeout)
            results["dl3"] = _deadlocks(tm, ["p0", "p1", "p2"], args.deadlocks, timeout)
            _reset(dsns)  # the deadlocks' committed survivors moved money; start at 0
            for order in ("random", "fixed"):
                before = det.cancelled
                r = _bank(tm, args.seconds, args.clients, order == "random")
                r["victims"] = det.cancelled - before
                results[f"bank_{order}"] = r
        # (c) uncontended: one client, its own rows, no detector; rounds taken in
        # turn (on, off, then off, on, …) so that a drift of the machine falls on both.
        rounds: dict[str, list[dict[str, Any]]] = {"tag_on": [], "tag_off": []}
        for i in range(args.tag_rounds):
            for key in (("tag_on", "tag_off") if i % 2 == 0 else ("tag_off", "tag_on")):
                with _untagged() if key == "tag_off" else contextlib.nullcontext():
                    rounds[key].append(_bank(tm, args.tag_seconds, 1, False, rows=100))
        for key, runs in rounds.items():
            rates = sorted(r["commits"] / r["elapsed"] for r in runs)
            results[key] = {"commits": sum(r["commits"] for r in runs),
                            "elapsed": sum(r["elapsed"] for r in runs),
                            "rates": rates, "median": rates[len(rates) // 2]}
    results["money"] = _total(dsns[:2])
    ok = (all(v == 1 for k in ("dl2", "dl3") for v in results[k]["victims"])
          and results["money"] == 0)
    results["ok"] = ok
    _print(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


def _print(args: argparse.Namespace, r: dict[str, Any]) -> None:
    ms = 1000.0
    print(f"deadlocks: {args.deadlocks} per shape, detector interval {args.interval:g} s; "
          f"bank: {args.clients} clients, {HOT} hot accounts per participant, "
          f"{args.seconds:g} s per run")
    print()
    print("| measurement | result |")
    print("|---|---|")
    for key, label in (("dl2", "2 transactions over 2 servers"),
                       ("dl3", "3 transactions over 3 servers")):
        d = r[key]
        one = sum(1 for v in d["victims"] if v == 1)
        print(f"| detection latency, {label} | p50 {d['p50'] * ms:.0f} ms, "
              f"p99 {d['p99'] * ms:.0f} ms ({one}/{d['deadlocks']} with exactly one victim) |")
    for order in ("random", "fixed"):
        b = r[f"bank_{order}"]
        print(f"| contended bank, {order} lock order | {b['commits'] / b['elapsed']:.1f} "
              f"commits/s, {b['victims'] / b['elapsed']:.2f} victims/s, longest wait "
              f"{b['longest'] * ms:.0f} ms |")
    for key, label in (("tag_on", "tagged (as shipped)"),
                       ("tag_off", "untagged (begin_fragment monkeypatched to a no-op, "
                                   "this process only)")):
        b = r[key]
        print(f"| uncontended commits, 1 client, {label} | median "
              f"{b['median']:.1f} commits/s over {len(b['rates'])} rounds of "
              f"{args.tag_seconds:g} s ({', '.join(f'{x:.1f}' for x in b['rates'])}) |")
    cost = 1 - r["tag_on"]["median"] / r["tag_off"]["median"]
    print(f"| cost of tagging (1 - tagged/untagged, medians) | {cost * 100:+.1f}% |")
    print()
    print(f"money conserved: {'yes' if r['money'] == 0 else 'NO (' + str(r['money']) + ')'}")


if __name__ == "__main__":
    sys.exit(main())

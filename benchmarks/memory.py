"""Coordinator memory: does the resident set grow with the number of transactions?

    python3 benchmarks/memory.py                            # 100,000 transactions
    python3 benchmarks/memory.py --transactions 5000 --warmup 1000 --json out.json

Runs global transactions through one TransactionManager (two participants on
two throwaway servers, the decision log inside the first one, the same
one-row updates as benchmarks/run.py) and samples the process's resident set
size and its number of live Python objects (after a garbage collection) every
``--every`` transactions. Growth is measured from the end of the warm-up
(pools filled, statements prepared, caches warm). The goal of issue 6: less
than 10 MB over 100,000 transactions. Exit status 1 when ``--limit-mb`` is
exceeded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import _workload
from _contenders import Txmgr


def rss_bytes() -> int:
    """The resident set size of this process now (Linux: /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes there, KiB here
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=100_000,
                    help="transactions measured after the warm-up (default 100000)")
    ap.add_argument("--warmup", type=int, default=5_000, help="transactions before (default 5000)")
    ap.add_argument("--every", type=int, default=10_000, help="sample every N (default 10000)")
    ap.add_argument("--limit-mb", type=float, default=10.0,
                    help="RSS growth that fails the run (default 10)")
    ap.add_argument("--json", type=Path, help="also write the samples to this JSON file")
    ap.add_argument("--dsns", help="two comma-separated participant DSNs to use instead of "
                                   "starting servers (it creates txmgr_bench_* tables there)")
    args = ap.parse_args(argv)
    if min(args.transactions, args.every) < 1 or args.warmup < 0:
        ap.error("--transactions and --every must be positive, --warmup not negative")
    given = [d.strip() for d in (args.dsns or "").split(",") if d.strip()]
    if args.dsns and len(given) != 2:
        ap.error("--dsns takes exactly two DSNs")

    with contextlib.ExitStack() as stack:
        if not given:
            from txmgr.testing import PgServer

            given = [stack.enter_context(PgServer()).create_database(f"p{i}") for i in (0, 1)]
        dsns = dict(zip(("p0", "p1"), given, strict=True))
        # The hand-written contenders' log table goes to p1; txmgr's log is in p0.
        _workload.create_schema(given, given[1], 10_000)
        contender = Txmgr(log="participant")
        [one] = contender.open(dsns, given[1], 1)
        rng = random.Random(1)
        try:
            for _ in range(args.warmup):
                one(_workload.moves(rng, 2, 10_000))
            samples = [_sample(0)]
            started = time.perf_counter()
            for done in range(1, args.transactions + 1):
                one(_workload.moves(rng, 2, 10_000))
                if done % args.every == 0 or done == args.transactions:
                    samples.append(_sample(done))
                    print(f"{done:8d} transactions  rss {samples[-1]['rss_mb']:7.2f} MB  "
                          f"objects {samples[-1]['objects']:8d}", flush=True)
            elapsed = time.perf_counter() - started
        finally:
            contender.close()
    growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"]
    doc: dict[str, Any] = {
        "transactions": args.transactions,
        "warmup": args.warmup,
        "seconds": round(elapsed, 1),
        "rss_growth_mb": round(growth, 3),
        "object_growth": samples[-1]["objects"] - samples[0]["objects"],
        "limit_mb": args.limit_mb,
        "met": growth < args.limit_mb,
        "samples": samples,
    }
    print(f"RSS grew by {growth:.2f} MB over {args.transactions} transactions after a warm-up "
          f"of {args.warmup} (limit {args.limit_mb:g} MB: {'met' if doc['met'] else 'NOT met'}); "
          f"live objects {doc['object_growth']:+d}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if doc["met"] else 1


def _sample(done: int) -> dict[str, Any]:
    gc.collect()
    return {"transactions": done, "rss_mb": round(rss_bytes() / 2**20, 3),
            "objects": len(gc.get_objects())}


if __name__ == "__main__":
    sys.exit(main())

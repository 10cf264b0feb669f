"""txmgr against the alternatives: the same accounts workload, committed eight ways.

    python3 benchmarks/run.py                       # the full run (about 8 minutes)
    python3 benchmarks/run.py --seconds 3 --clients 1 --participants 2 --json out.json
    python3 benchmarks/run.py --compare before.json # print this run against an earlier one
    python3 benchmarks/run.py --clients 8 --participants 2 --seconds 20 \
        --contenders txmgr-log,txmgr-paxos,txmgr-paxos-1down   # Paxos mode's cost

It starts its own PostgreSQL servers (txmgr.testing.PgServer, fsync and
full_page_writes on, so commits cost what they cost in production): one per
participant and one for the dedicated log databases. Paxos mode's three log
databases (``txmgr_bench_acc1..3``) go on the same servers: the first on the
log server, the others on the first two participants' servers.
``--dsns``/``--log-dsn`` use existing databases instead (it creates and drops
its ``txmgr_bench_*`` tables there and migrates the txmgr log tables into the
log database and the first participant), and ``--paxos-dsns`` three more for
Paxos mode (migrated too; without it the Paxos contenders are left out).

For every configuration (participants x clients) every contender runs for
``--seconds`` in total, split into ``--rounds`` slices taken in turn, so that
drift of a shared machine hits every contender alike; read the ratios, not the
absolute numbers. Latency is one whole transaction, from its first statement to
its commit returning. After each slice the data is checked: the money is
conserved and the contender's count of committed transactions is exactly what
changed in the data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _report
import _servers
import _workload
import psycopg
from _contenders import Client, Contender, all_contenders

WARMUP = 0.3  # seconds of each slice not measured: pools fill, statements get prepared
MAX_ERRORS = 100  # per client and slice


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    contenders = [c for c in all_contenders() if c.name in args.contenders]
    skipped = {}
    if args.dsns and not args.paxos_dsns:  # given servers, no Paxos log databases given
        skipped = {c.name: "no --paxos-dsns given" for c in contenders if c.needs_acceptors}
        contenders = [c for c in contenders if not c.needs_acceptors]
        if skipped:
            print(f"skipping {', '.join(skipped)}: with --dsns, Paxos mode needs three log "
                  "databases, give them with --paxos-dsns", file=sys.stderr, flush=True)
    settings = {
        "seconds": args.seconds, "rounds": args.rounds, "clients": args.clients,
        "participants": args.participants, "contenders": [c.name for c in contenders],
        "skipped": skipped,
        "accounts": args.accounts, "servers": "given" if args.dsns else "started",
    }
    paxos = any(c.needs_acceptors for c in contenders)
    if paxos:
        settings["paxos_placement"] = (
            "given (--paxos-dsns; txmgr-paxos-1down takes the first down)" if args.dsns
            else _servers.PAXOS_PLACEMENT)
    with _databases(args, paxos=paxos) as (dsns, log_dsn, acceptors):
        _workload.create_schema(dsns, log_dsn, args.accounts, acceptors=acceptors)
        environment = _environment(dsns[0])
        results = []
        for p in args.participants:
            for c in args.clients:
                print(f"-- {p} participants, {c} clients", file=sys.stderr, flush=True)
                results += _configuration(contenders, dsns[:p], log_dsn, acceptors, c, args)
    summaries = [r.summary() for r in results]
    print(_report.table(summaries))
    if paxos_lines := _report.paxos_text(summaries):
        print(paxos_lines + "\n")
    doc = _report.document(summaries, settings, environment)
    print(_report.goals_text(doc["goals"]))
    if args.compare:
        print()
        print(_report.compare_text(summaries, args.compare))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    failed = [r for r in summaries if r["problems"] or not r["committed"]]
    for r in failed:
        print(f"FAILED {r['participants']}p {r['clients']}c {r['contender']}: "
              f"committed={r['committed']} {r['problems']} {r['error_samples']}", file=sys.stderr)
    return 1 if failed else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = [c.name for c in all_contenders()]
    paxos_names = {c.name for c in all_contenders() if c.needs_acceptors}

    def ints(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return values

    def contender_list(text: str) -> list[str]:
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        unknown = sorted(set(chosen) - set(names))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown contender(s) {unknown}: choose from {names}")
        return chosen

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="measured seconds per contender and configuration (default 10)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="slices the seconds are split into, contenders taking turns (default 5)")
    ap.add_argument("--clients", type=ints, default=[1, 8], help="client threads (default 1,8)")
    ap.add_argument("--participants", type=ints, default=[2, 3],
                    help="participant counts (default 2,3)")
    ap.add_argument("--contenders", type=contender_list,
                    help=f"comma-separated subset of {','.join(names)} (default: all)")
    ap.add_argument("--accounts", type=int, default=10_000, help="accounts per participant")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--compare", type=Path, help="an earlier --json file to compare with")
    ap.add_argument("--dsns", help="comma-separated participant DSNs to use instead of "
                                   "starting servers (as many as the largest --participants)")
    ap.add_argument("--log-dsn", help="with --dsns: the database for the dedicated logs")
    ap.add_argument("--paxos-dsns",
                    help="with --dsns: three comma-separated databases for Paxos mode's log, "
                         "the first on the log server (txmgr-paxos-1down takes it down); "
                         "without it the Paxos contenders are skipped")
    args = ap.parse_args(argv)
    if args.dsns:
        args.dsns = [d.strip() for d in args.dsns.split(",") if d.strip()]
        if len(args.dsns) < max(args.participants):
            ap.error(f"--dsns gives {len(args.dsns)} DSNs, --participants needs "
                     f"{max(args.participants)}")
        if not args.log_dsn:
            ap.error("--dsns needs --log-dsn too")
        if args.paxos_dsns:
            args.paxos_dsns = [d.strip() for d in args.paxos_dsns.split(",") if d.strip()]
            if len(args.paxos_dsns) != 3:
                ap.error(f"--paxos-dsns takes 3 DSNs, not {len(args.paxos_dsns)}")
        elif args.contenders is not None and set(args.contenders) & paxos_names:
            ap.error(f"{', '.join(sorted(set(args.contenders) & paxos_names))}: Paxos mode "
                     "needs --paxos-dsns (three log databases) with --dsns")
    elif args.log_dsn or args.paxos_dsns:
        ap.error("--log-dsn and --paxos-dsns go with --dsns")
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds and --seconds must be positive")
    if args.contenders is None:
        args.contenders = names
    return args


@contextlib.contextmanager
def _databases(
    args: argparse.Namespace, *, paxos: bool
) -> Iterator[tuple[list[str], str, list[str]]]:
    """Participant DSNs, the log DSN and the Paxos log DSNs (none unless ``paxos``):
    given, or on servers started (and destroyed) here."""
    if args.dsns:
        yield args.dsns, args.log_dsn, (args.paxos_dsns or []) if paxos else []
        return
    with _servers.started(max(args.participants), paxos=paxos) as dbs:
        yield dbs.participants, dbs.log, dbs.acceptors


def _configuration(contenders: list[Contender], dsns: list[str], log_dsn: str,
                   acceptors: list[str], clients: int,
                   args: argparse.Namespace) -> list[_report.Result]:
    names = _workload.participant_names(len(dsns))
    named = dict(zip(names, dsns, strict=True))
    results = {c.name: _report.Result(c.name, len(dsns), clients) for c in contenders}
    opened: dict[str, list[Client]] = {}
    try:
        for c in contenders:
            opened[c.name] = c.open(named, log_dsn, clients,
                                    acceptors=acceptors if c.needs_acceptors else ())
        for dsn in [*dsns, log_dsn, *acceptors]:
            _workload.execute(dsn, "CHECKPOINT")  # no checkpoint's full-page writes mid-run
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for c in order:
                _workload.clear_log(log_dsn)
                before = _workload.Snapshot.take(dsns)
                done = _slice(opened[c.name], len(dsns), args.accounts,
                              args.seconds / args.rounds, results[c.name])
                after = _workload.Snapshot.take(dsns)
                results[c.name].committed_total += done
                results[c.name].problems += _workload.check(before, after, done)
                results[c.name].problems += c.check(done)
    finally:
        for c in contenders:
            c.close()
    return list(results.values())


def _slice(clients: list[Client], participants: int, accounts: int, seconds: float,
           result: _report.Result) -> int:
    """Run the clients for ``WARMUP + seconds``; add the measured part to ``result``.
    Returns every transaction committed, warm-up included (for the data check)."""
    start = time.perf_counter() + WARMUP
    end = start + seconds
    lock = threading.Lock()
    committed = [0]
    finished: list[float] = []

    def work(index: int, one: Client) -> None:
        rng = random.Random(index * 7919 + int(start))
        latencies: list[float] = []
        done = errors = 0
        samples: list[str] = []
        last = start
        while True:
            moves = _workload.moves(rng, participants, accounts)
            t0 = time.perf_counter()
            if t0 >= end:
                break
            try:
                one(moves)
            except Exception as e:  # counted and shown; the run goes on
                errors += 1
                if len(samples) < 3:
                    samples.append(f"{type(e).__name__}: {e}")
                if errors >= MAX_ERRORS:  # broken, not unlucky: stop this client
                    break
                continue
            t1 = time.perf_counter()
            done += 1
            if t0 >= start:
                latencies.append(t1 - t0)
                last = t1
        with lock:
            committed[0] += done
            result.latencies += latencies
            result.errors += errors
            result.error_samples += samples[: max(0, 3 - len(result.error_samples))]
            finished.append(last)

    threads = [threading.Thread(target=work, args=(i, one)) for i, one in enumerate(clients)]
    before = len(result.latencies)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.committed += len(result.latencies) - before
    result.seconds += max(max(finished, default=end), end) - start
    return committed[0]


def _environment(dsn: str) -> dict[str, Any]:
    row = _workload.execute(dsn, "SELECT current_setting('server_version'), "
                                 "current_setting('fsync'), current_setting('synchronous_commit')")
    return {
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "postgres": row[0][0],
        "fsync": row[0][1],
        "synchronous_commit": row[0][2],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())

"""What one transaction costs each server: statements, WAL, CPU — per contender.

    python3 benchmarks/server_work.py                        # txmgr-log, txmgr-paxos, -1down
    python3 benchmarks/server_work.py --contenders plain,txmgr-inlog --transactions 2000

Where run.py measures throughput, this counts the work behind it. It starts
the servers as run.py does (one per participant, one for the logs, Paxos
mode's log databases placed alike, fsync on) with ``pg_stat_statements``
loaded, and runs ``--transactions`` transactions of the same workload through
each contender, one after another from one client thread. Per transaction and
per server it reports:

- statements executed (``pg_stat_statements``; a simple-protocol query of
  several statements counts each), and the most frequent ones;
- WAL written (bytes) and WAL flushes (``pg_stat_wal.wal_sync``);
- CPU time of the server's processes (``/proc``: backends, WAL writer, …);

and the client's CPU time (every thread of this process) and wall time.
Stages are counted, not timed, so the numbers hold on a busy machine; the
CPU times do not (compare them within one run). The data is checked as in
run.py after each contender.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _servers
import _workload
from _contenders import all_contenders

from txmgr.testing import PgServerError

PAXOS_DEFAULT = ["txmgr-log", "txmgr-paxos", "txmgr-paxos-1down"]
NO_EXTENSION = 3  # exit status: the servers cannot load pg_stat_statements
TICK = os.sysconf("SC_CLK_TCK")

# Literals and numbers out of the statement text, so that every gid's
# PREPARE TRANSACTION '…' counts as one statement (PostgreSQL 15 keeps
# utility statements apart by their text).
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"\b\d+\b")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _measure(args)
    except PgServerError as e:
        if "pg_stat_statements" not in str(e):
            raise
        print("server_work.py counts statements with the pg_stat_statements extension, which "
              "the PostgreSQL binaries found cannot load (the `embedded` extra's servers lack "
              "it): install PostgreSQL's contrib modules, or point TXMGR_PG_BIN at binaries "
              "that have them", file=sys.stderr)
        return NO_EXTENSION


def _measure(args: argparse.Namespace) -> int:
    chosen = [c for c in all_contenders() if c.name in args.contenders]
    # Room for every statement: each gid's PREPARE TRANSACTION and COMMIT PREPARED
    # is an entry of its own (a full table would evict entries: checked below).
    room = max(5000, 4 * (args.transactions + args.warmup) + 1000)
    settings = {"shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.max": str(room), "pg_stat_statements.track": "top",
                "pg_stat_statements.track_utility": "on"}
    report: dict[str, Any] = {"transactions": args.transactions,
                              "participants": args.participants, "contenders": {}}
    paxos = any(c.needs_acceptors for c in chosen)
    with _servers.started(args.participants, paxos=paxos, settings=settings) as dbs:
        _workload.create_schema(dbs.participants, dbs.log, args.accounts,
                                acceptors=dbs.acceptors)
        labels = [f"participant p{i}" for i in range(args.participants)] + ["log server"]
        for server in dbs.servers:
            _workload.execute(server.dsn(), "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        names = _workload.participant_names(args.participants)
        for contender in chosen:
            one = contender.open(dict(zip(names, dbs.participants, strict=True)), dbs.log, 1,
                                 acceptors=dbs.acceptors if contender.needs_acceptors else ())[0]
            rng = random.Random(1)
            try:
                for _ in range(args.warmup):
                    one(_workload.moves(rng, args.participants, args.accounts))
                before = _workload.Snapshot.take(dbs.participants)
                for server in dbs.servers:
                    _workload.execute(server.dsn(), "CHECKPOINT")
                    _workload.execute(server.dsn(), "SELECT pg_stat_statements_reset(), "
                                                    "pg_stat_reset_shared('wal')")
                lsn0 = [_lsn(s.dsn()) for s in dbs.servers]
                cpu0 = [_server_cpu(s.data_dir) for s in dbs.servers]
                client0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(args.transactions):
                    one(_workload.moves(rng, args.participants, args.accounts))
                client1, wall1 = time.process_time(), time.perf_counter()
                cpu1 = [_server_cpu(s.data_dir) for s in dbs.servers]
                lsn1 = [_lsn(s.dsn()) for s in dbs.servers]
                statements = [_statements(s.dsn()) for s in dbs.servers]
                problems = contender.check(args.warmup + args.transactions)
                problems += [f"{label}: pg_stat_statements dropped entries, the counts are low"
                             for label, s in zip(labels, dbs.servers, strict=True)
                             if _workload.execute(s.dsn(), "SELECT dealloc FROM "
                                                           "pg_stat_statements_info")[0][0]]
            finally:
                contender.close()
            per_server = {}
            for label, server, c0, c1, l0, l1, counted in zip(
                    labels, dbs.servers, cpu0, cpu1, lsn0, lsn1, statements, strict=True):
                per_server[label] = _server_work(server.dsn(), args.transactions, counted,
                                                 cpu=c1 - c0, wal=l1 - l0, top=args.top)
            after = _workload.Snapshot.take(dbs.participants)
            problems += _workload.check(before, after, args.transactions)
            report["contenders"][contender.name] = {
                "client_cpu_us": round((client1 - client0) / args.transactions * 1e6),
                "wall_us": round((wall1 - wall0) / args.transactions * 1e6),
                "servers": per_server,
                "problems": problems,
            }
            print(_text(contender.name, report["contenders"][contender.name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    failed = [n for n, r in report["contenders"].items() if r["problems"]]
    for name in failed:
        print(f"FAILED {name}: {report['contenders'][name]['problems']}", file=sys.stderr)
    return 1 if failed else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = [c.name for c in all_contenders()]
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=2000,
                    help="measured transactions per contender (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured ones before (200)")
    ap.add_argument("--participants", type=int, default=2, help="participants (default 2)")
    ap.add_argument("--contenders", default=",".join(PAXOS_DEFAULT),
                    help=f"comma-separated subset of {','.join(names)} "
                         f"(default {','.join(PAXOS_DEFAULT)})")
    ap.add_argument("--accounts", type=int, default=10_000, help="accounts per participant")
    ap.add_argument("--top", type=int, default=8, help="statements listed per server (8)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    args.contenders = [x.strip() for x in args.contenders.split(",") if x.strip()]
    unknown = sorted(set(args.contenders) - set(names))
    if unknown or not args.contenders:
        ap.error(f"unknown contender(s) {unknown}: choose from {names}")
    if args.transactions < 1 or args.warmup < 0 or args.participants < 2:
        ap.error("--transactions must be positive, --warmup not negative, --participants >= 2")
    return args


def _lsn(dsn: str) -> int:
    return int(_workload.execute(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def _server_cpu(data_dir: Path) -> float:
    """CPU seconds used so far by the postmaster and its children (as /proc shows them:
    a process that exited is not counted, so measure while the connections are open)."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        # after "pid (comm)": state ppid …; utime and stime are the 12th and 13th
        if int(proc.name) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def _statements(dsn: str) -> Counter[tuple[str, str]]:
    """Calls so far by (database, statement text without its literals)."""
    rows = _workload.execute(dsn, """
        SELECT d.datname, s.query, s.calls
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
        WHERE d.datname <> 'postgres'""")
    out: Counter[tuple[str, str]] = Counter()
    for datname, query, calls in rows:
        out[datname, _NUMBER.sub("N", _LITERAL.sub("'…'", " ".join(query.split())))] += calls
    return out


def _wal_syncs(dsn: str) -> int:
    """WAL flushes since the reset. Backends report theirs at most once a second
    while they live, and at exit: wait until the contender's sessions are gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _workload.execute(
            dsn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                 "AND datname <> 'postgres' AND pid <> pg_backend_pid()")[0][0]:
        time.sleep(0.05)
    return int(_workload.execute(dsn, "SELECT pg_stat_clear_snapshot(), wal_sync "
                                      "FROM pg_stat_wal")[0][1])


def _server_work(dsn: str, transactions: int, counted: Counter[tuple[str, str]], *,
                 cpu: float, wal: int, top: int) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    by_db: Counter[str] = Counter()
    for (datname, text), calls in counted.items():
        kinds[f"{datname}: {text[:110]}"] += calls
        by_db[datname] += calls
    syncs = _wal_syncs(dsn)
    return {
        "statements": round(sum(kinds.values()) / transactions, 2),
        "by_database": {k: round(v / transactions, 2) for k, v in sorted(by_db.items())},
        "top": [[k, round(v / transactions, 2)] for k, v in kinds.most_common(top)],
        "wal_bytes": round(wal / transactions),
        "wal_syncs": round(syncs / transactions, 2),
        "cpu_us": round(cpu / transactions * 1e6),
    }


def _text(name: str, r: dict[str, Any]) -> str:
    lines = [f"{name}: per transaction, client CPU {r['client_cpu_us']} µs, "
             f"wall {r['wall_us']} µs" + (f"  PROBLEMS {r['problems']}" if r["problems"] else "")]
    for label, s in r["servers"].items():
        lines.append(f"  {label:<15} {s['statements']:6.2f} statements  "
                     f"{s['wal_syncs']:5.2f} WAL flushes  {s['wal_bytes']:6d} WAL bytes  "
                     f"CPU {s['cpu_us']:5d} µs   "
                     + ", ".join(f"{db} {n:g}" for db, n in s["by_database"].items()))
        for text, n in s["top"]:
            lines.append(f"      {n:6.2f}  {text}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

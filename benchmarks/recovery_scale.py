"""Recovery at scale: resolve many in-doubt branches, against a bare loop of COMMIT PREPARED.

    python3 benchmarks/recovery_scale.py                    # 10,000 branches over 2 participants
    python3 benchmarks/recovery_scale.py --branches 2000 --log participant --json out.json

Starts two participant servers (and, with ``--log dedicated``, a third for the
log), fsync on. Each round it creates ``--branches`` prepared branches the way
a crashed coordinator leaves them — a committed decision row per global
transaction (its own decision transaction ``L``, so every gid carries a
distinct lxid) and one prepared branch per participant with a txmgr gid — and
times one ``txmgr.recover()`` pass over them. Then it creates the same number
again and times a bare loop of ``COMMIT PREPARED`` statements over the known
gids, one participant after the other: the floor of any recovery that sends one
statement per branch. The goal of issue 6: recovery at no less than half that
rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import txmgr
from txmgr import log as decision_log
from txmgr._gid import Gid, new_txid

PARTICIPANTS = ("p0", "p1")
BATCH = 200  # statements per simple query while creating branches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--branches", type=int, default=10_000,
                    help="prepared branches in total, over both participants (default 10000)")
    ap.add_argument("--log", choices=("dedicated", "participant"), default="dedicated",
                    help="the decision log on its own server, or inside participant p0")
    ap.add_argument("--rounds", type=int, default=1, help="recovery/bare-loop pairs (default 1)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--dsns", help="two comma-separated participant DSNs to use instead of "
                                   "starting servers (their max_prepared_transactions must "
                                   "hold half the branches; it creates txmgr_bench_rows there)")
    ap.add_argument("--log-dsn", help="with --dsns and --log dedicated: the log database")
    args = ap.parse_args(argv)
    if args.branches < 2 or args.rounds < 1:
        ap.error("--branches must be at least 2 and --rounds positive")
    given = [d.strip() for d in (args.dsns or "").split(",") if d.strip()]
    if args.dsns and len(given) != len(PARTICIPANTS):
        ap.error("--dsns takes exactly two DSNs")
    if given and args.log == "dedicated" and not args.log_dsn:
        ap.error("--dsns with --log dedicated needs --log-dsn")
    per_participant = args.branches // len(PARTICIPANTS)
    rounds = []
    servers = (
        contextlib.nullcontext((dict(zip(PARTICIPANTS, given, strict=True)),
                                args.log_dsn if args.log == "dedicated" else given[0]))
        if given else _servers(per_participant, args.log)
    )
    with servers as (dsns, log_dsn):
        for name, dsn in dsns.items():
            room = int(_execute(dsn, "SELECT current_setting('max_prepared_transactions')")[0][0])
            if room < per_participant:
                ap.error(f"{name} has max_prepared_transactions = {room}, fewer than the "
                         f"{per_participant} branches it would hold: lower --branches")
        for dsn in dsns.values():
            _execute(dsn, "DROP TABLE IF EXISTS txmgr_bench_rows")
            _execute(dsn, "CREATE TABLE txmgr_bench_rows (id bigint)")
        txmgr.migrate(log_dsn)
        config = txmgr.Config(participants=dsns, log=log_dsn if args.log == "dedicated" else "p0")
        for _ in range(args.rounds):
            rounds.append(_round(config, dsns, log_dsn, per_participant))
    branches = per_participant * len(PARTICIPANTS)
    recovery = min(r["recovery_seconds"] for r in rounds)
    bare = min(r["bare_loop_seconds"] for r in rounds)
    doc: dict[str, Any] = {
        "branches": branches, "log": args.log, "rounds": rounds,
        "recovery_per_second": round(branches / recovery, 1),
        "bare_loop_per_second": round(branches / bare, 1),
        "ratio": round(bare / recovery, 3),
        "goal": 0.5,
    }
    doc["met"] = doc["ratio"] >= doc["goal"]
    print(f"{branches} in-doubt branches over {len(PARTICIPANTS)} participants, log {args.log} "
          f"(best of {args.rounds})")
    print(f"  txmgr.recover():          {recovery:7.2f} s  {doc['recovery_per_second']:8.0f} "
          "branches/s")
    print(f"  bare COMMIT PREPARED loop: {bare:7.2f} s  {doc['bare_loop_per_second']:8.0f} "
          "branches/s")
    print(f"  ratio {doc['ratio']:.2f} (goal >= 0.5: {'met' if doc['met'] else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rounds) else 1


@contextlib.contextmanager
def _servers(per_participant: int, log: str) -> Iterator[tuple[dict[str, str], str]]:
    from txmgr.testing import PgServer

    settings = {"fsync": "on", "full_page_writes": "on", "max_connections": "50"}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(PgServer(max_prepared_transactions=per_participant + 50,
                                         settings=settings))
            for _ in PARTICIPANTS
        ]
        dsns = {name: s.create_database(name)
                for name, s in zip(PARTICIPANTS, servers, strict=True)}
        if log == "dedicated":
            yield dsns, stack.enter_context(PgServer(settings=settings)).create_database("txlog")
        else:
            yield dsns, dsns["p0"]


def _round(config: txmgr.Config, dsns: dict[str, str], log_dsn: str,
           per_participant: int) -> dict[str, Any]:
    _create(dsns, log_dsn, per_participant)
    _checkpoint([*dsns.values(), log_dsn])
    t = time.perf_counter()
    report = txmgr.recover(config)
    recovery = time.perf_counter() - t
    left = _prepared(dsns)
    ok = report.ok and report.committed == per_participant * len(dsns) and not any(left.values())
    if not ok:
        print(f"recovery did not finish everything: {report.summary()} left={left}",
              file=sys.stderr)

    gids = _create(dsns, log_dsn, per_participant)
    _checkpoint([*dsns.values(), log_dsn])
    t = time.perf_counter()
    for name, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            for gid in gids[name]:
                conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
    bare = time.perf_counter() - t
    _execute(log_dsn, "DELETE FROM txmgr_decision")
    return {"recovery_seconds": round(recovery, 3), "bare_loop_seconds": round(bare, 3),
            "recovery_report": report.summary(), "ok": ok}


def _create(dsns: dict[str, str], log_dsn: str, count: int) -> dict[str, list[str]]:
    """``count`` committed decisions, each with a prepared branch on every participant."""
    with psycopg.connect(log_dsn, autocommit=True) as conn:
        logid = decision_log.read_logid(conn, log_dsn)
        txids = [new_txid() for _ in range(count)]
        participants = sql.Literal(list(dsns))
        for i in range(0, count, BATCH):
            # Each decision in its own transaction: a distinct lxid per gid.
            conn.execute(sql.SQL(" ").join(
                sql.SQL("BEGIN; INSERT INTO txmgr_decision (txid, lxid, participants) "
                        "VALUES ({}, pg_current_xact_id(), {}::text[]); COMMIT;").format(
                    sql.Literal(txid), participants)
                for txid in txids[i:i + BATCH]
            ))
        lxids: dict[str, int] = dict(conn.execute(
            "SELECT txid, lxid::text::bigint FROM txmgr_decision WHERE txid = ANY(%s)", (txids,)
        ).fetchall())
    gids: dict[str, list[str]] = {}
    for name, dsn in dsns.items():
        gids[name] = [str(Gid(logid, txid, lxids[txid], name)) for txid in txids]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(0, count, BATCH):
                conn.execute(sql.SQL(" ").join(
                    sql.SQL("BEGIN; INSERT INTO txmgr_bench_rows VALUES ({}); "
                            "PREPARE TRANSACTION {};").format(sql.Literal(i + j), sql.Literal(g))
                    for j, g in enumerate(gids[name][i:i + BATCH])
                ))
    return gids


def _prepared(dsns: dict[str, str]) -> dict[str, int]:
    return {name: int(_execute(dsn, "SELECT count(*) FROM pg_prepared_xacts "
                                    "WHERE database = current_database()")[0][0])
            for name, dsn in dsns.items()}


def _checkpoint(dsns: list[str]) -> None:
    for dsn in set(dsns):
        _execute(dsn, "CHECKPOINT")


def _execute(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


if __name__ == "__main__":
    sys.exit(main())

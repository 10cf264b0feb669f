"""Short smoke runs of the benchmarks in benchmarks/ (they are not tests of speed).

Each script runs as a user runs it, on databases of the test servers, and its
JSON output is checked: every contender committed transactions without
errors, and — checked here again, independently of the script's own checks —
the money is conserved and every reported commit is in the data.
``TXMGR_SOAK=1`` runs longer, with 1 and 8 clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import query
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SOAK = os.environ.get("TXMGR_SOAK") == "1"
CONTENDERS = {"plain", "2pc-seq", "2pc-par", "sqla-2pc", "txmgr-log", "txmgr-inlog"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _participants(make_database: MakeDatabase, pg_servers: list[Server]) -> list[str]:
    """Two participant databases, on two servers when there are two."""
    return [make_database(pg_servers[i % len(pg_servers)]) for i in range(2)]


def test_run_compares_every_contender_and_conserves_money(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    dsns = _participants(make_database, pg_servers)
    log = make_database(pg_servers[0])
    out = tmp_path / "bench.json"
    proc = _run(
        "run.py", "--seconds", "3" if SOAK else "1", "--rounds", "1",
        "--clients", "1,8" if SOAK else "1", "--participants", "2",
        "--dsns", ",".join(dsns), "--log-dsn", log, "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["format"] == "txmgr-benchmark/1"
    assert doc["settings"]["participants"] == [2]
    results: list[dict[str, Any]] = doc["results"]
    clients = {1, 8} if SOAK else {1}
    assert {(r["contender"], r["clients"]) for r in results} == {
        (c, n) for c in CONTENDERS for n in clients
    }
    for r in results:
        assert r["committed"] > 0 and r["errors"] == 0 and r["problems"] == [], r
        assert r["tps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
        assert r["committed_total"] >= r["committed"]
    for ratio in doc["ratios"]:
        assert ratio["tps_ratio"] > 0 and ratio["versus"] != ratio["contender"]
    assert len(doc["ratios"]) == len(results) * (len(CONTENDERS) - 1)
    assert {g["goal"] for g in doc["goals"]} >= {"txmgr-log tx/s >= 1.0 x sqla-2pc"}
    assert all(isinstance(g["met"], bool) for g in doc["goals"])
    for name in CONTENDERS:
        assert name in proc.stdout  # the table

    # Independently of the script's checks: each transaction moved 1 from p0 to p1,
    # atomically, so the sums are -n and +n, n = every commit the script reported.
    committed = sum(r["committed_total"] for r in results)
    sums = [query(d, "SELECT sum(balance) FROM txmgr_bench_accounts")[0][0] for d in dsns]
    assert sums == [-committed, committed]
    for dsn in dsns:
        assert query(dsn, "SELECT count(*) FROM pg_prepared_xacts "
                          "WHERE database = current_database()") == [(0,)]


def test_memory_check_reports_no_growth_per_transaction(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    transactions = 20_000 if SOAK else 1_000
    out = tmp_path / "memory.json"
    _run(
        "memory.py", "--transactions", str(transactions), "--warmup", "300",
        "--every", "250", "--dsns", ",".join(_participants(make_database, pg_servers)),
        "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["transactions"] == transactions
    assert [s["transactions"] for s in doc["samples"]] == list(range(0, transactions + 1, 250))
    # Generous bounds: a leak of one object (or 5 KB) per transaction fails them.
    assert doc["object_growth"] < transactions / 4, doc["samples"]
    assert doc["rss_growth_mb"] < 10, doc["samples"]


def test_recovery_scale_resolves_every_branch(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    out = tmp_path / "recovery.json"
    dsns = _participants(make_database, pg_servers)
    for dsn in dsns:
        room = int(query(dsn, "SELECT current_setting('max_prepared_transactions')")[0][0])
        if room < 30:
            pytest.skip(f"the test servers hold {room} prepared transactions, 30 needed")
    proc = _run(
        "recovery_scale.py", "--branches", "60", "--dsns", ",".join(dsns),
        "--log-dsn", make_database(pg_servers[0]), "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["branches"] == 60
    [round_] = doc["rounds"]
    assert round_["ok"], proc.stdout + proc.stderr
    assert round_["recovery_report"].startswith("committed=60 rolled_back=0")
    assert doc["recovery_per_second"] > 0 and doc["bare_loop_per_second"] > 0

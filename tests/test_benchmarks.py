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
PAXOS = {"txmgr-paxos", "txmgr-paxos-1down"}


def _run(
    script: str, *args: str, returncode: int | None = 0
) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script; check its exit status (unless ``returncode`` is None)."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    if returncode is not None:
        assert proc.returncode == returncode, proc.stdout + proc.stderr
    return proc


def _assert_money_matches(dsns: list[str], results: list[dict[str, Any]]) -> None:
    """Independently of the script's checks: each transaction moved 1 from p0 to p1,
    atomically, so the sums are -n and +n, n = every commit the script reported."""
    committed = sum(r["committed_total"] for r in results)
    sums = [query(d, "SELECT sum(balance) FROM txmgr_bench_accounts")[0][0] for d in dsns]
    assert sums == [-committed, committed]
    for dsn in dsns:
        assert query(dsn, "SELECT count(*) FROM pg_prepared_xacts "
                          "WHERE database = current_database()") == [(0,)]


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
        "run.py", "--seconds", "3" if SOAK else "0.5", "--rounds", "1",
        "--clients", "1,8" if SOAK else "1", "--participants", "2",
        "--dsns", ",".join(dsns), "--log-dsn", log, "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["format"] == "txmgr-benchmark/1"
    assert doc["settings"]["participants"] == [2]
    # Given servers and no --paxos-dsns: the Paxos contenders are left out, and it says so.
    assert set(doc["settings"]["skipped"]) == PAXOS
    assert "skipping txmgr-paxos, txmgr-paxos-1down" in proc.stderr
    assert "--paxos-dsns" in proc.stderr
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
    _assert_money_matches(dsns, results)


def test_paxos_contenders_commit_with_one_log_database_down(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    dsns = _participants(make_database, pg_servers)
    log = make_database(pg_servers[0])
    acceptors = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    out = tmp_path / "bench.json"
    clients = [1, 8] if SOAK else [1]
    proc = _run(
        "run.py", "--seconds", "3" if SOAK else "0.5", "--rounds", "1",
        "--clients", ",".join(map(str, clients)), "--participants", "2",
        "--contenders", "txmgr-log,txmgr-paxos,txmgr-paxos-1down",
        "--dsns", ",".join(dsns), "--log-dsn", log, "--paxos-dsns", ",".join(acceptors),
        "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["settings"]["skipped"] == {}
    assert "given" in doc["settings"]["paxos_placement"]
    results: list[dict[str, Any]] = doc["results"]
    assert {(r["contender"], r["clients"]) for r in results} == {
        (c, n) for c in {"txmgr-log", *PAXOS} for n in clients
    }
    # problems == []: besides the data checks, every commit was decided by the
    # Paxos log, and in -1down the first log database never answered (the others did).
    for r in results:
        assert r["committed"] > 0 and r["errors"] == 0 and r["problems"] == [], r
    pairs = {(r["contender"], r["versus"], r["clients"]) for r in doc["ratios"]}
    for n in clients:
        assert {("txmgr-paxos", "txmgr-log", n), ("txmgr-paxos-1down", "txmgr-paxos", n)} <= pairs
    goals = {(g["goal"], g["clients"]) for g in doc["goals"]}
    assert ("txmgr-paxos-1down tx/s >= 0.7 x txmgr-paxos", 1) in goals
    assert (("txmgr-paxos tx/s >= 0.8 x txmgr-log", 8) in goals) == SOAK  # 8 clients only
    assert "txmgr-paxos-1down / txmgr-paxos" in proc.stdout
    # The down database's DSN is shown, masked, in the warning: never a password.
    assert "Connection refused" in proc.stderr or "cannot connect" in proc.stderr
    for server in pg_servers:
        if server.password:
            assert server.password not in proc.stdout + proc.stderr
    _assert_money_matches(dsns, results)
    for acceptor in acceptors[1:]:  # finished transactions leave no slot behind
        assert query(acceptor, "SELECT count(*) FROM txmgr_paxos") == [(0,)]


@pytest.mark.parametrize(("args", "message"), [
    (["--contenders", "txmgr-paxos"], "txmgr-paxos: Paxos mode needs --paxos-dsns"),
    (["--paxos-dsns", "a,b"], "--paxos-dsns takes 3 DSNs, not 2"),
])
def test_paxos_contenders_without_their_databases_are_refused(
    args: list[str], message: str
) -> None:
    proc = _run("run.py", "--dsns", "host=x1,host=x2,host=x3", "--log-dsn", "host=x4", *args,
                returncode=2)  # refused while parsing: nothing connects to those hosts
    assert message in proc.stderr


def test_server_work_counts_each_servers_statements(tmp_path: Path) -> None:
    """server_work.py starts servers of its own (pg_stat_statements loaded): the
    participants' work is the same in every mode, and the log server's acceptor
    gets nothing while it is down."""
    out = tmp_path / "work.json"
    proc = _run(
        "server_work.py", "--transactions", "20", "--warmup", "3",
        "--contenders", "txmgr-log,txmgr-paxos,txmgr-paxos-1down", "--json", str(out),
        returncode=None,
    )  # fmt: skip
    if proc.returncode == 3:  # the binaries found cannot load the extension
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    work = doc["contenders"]
    assert set(work) == {"txmgr-log", *PAXOS}
    for name, r in work.items():
        assert r["problems"] == [] and r["client_cpu_us"] > 0, (name, r)
        for participant in ("participant p0", "participant p1"):
            own = r["servers"][participant]["by_database"][participant[-2:]]
            assert own == work["txmgr-log"]["servers"][participant]["by_database"][
                participant[-2:]], (name, participant)  # Paxos mode adds nothing there
    assert work["txmgr-log"]["servers"]["log server"]["by_database"]["txlog"] >= 1
    paxos = work["txmgr-paxos"]["servers"]
    # (> 0, not 2 per transaction: a log database slow to answer is left out for a while)
    assert paxos["log server"]["by_database"]["txmgr_bench_acc1"] > 0
    assert paxos["participant p0"]["by_database"]["txmgr_bench_acc2"] > 0
    assert work["txmgr-paxos-1down"]["servers"]["log server"]["statements"] == 0
    assert "txmgr-paxos-1down: per transaction" in proc.stdout


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


def test_deadlock_benchmark_breaks_each_induced_deadlock_once_and_conserves_money(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    dsns = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    log = make_database(pg_servers[0])
    out = tmp_path / "deadlock.json"
    proc = _run(
        "deadlock.py", "--deadlocks", "3", "--seconds", "1", "--interval", "0.2",
        "--tag-rounds", "2", "--tag-seconds", "0.5",
        "--dsns", ",".join(dsns), "--log-dsn", log, "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    for shape in ("dl2", "dl3"):
        assert doc[shape]["victims"] == [1, 1, 1]  # exactly one victim per deadlock
    assert doc["ok"] and doc["money"] == 0
    assert doc["bank_random"]["commits"] > 0 and doc["bank_fixed"]["commits"] > 0
    assert doc["tag_on"]["commits"] > 0 and doc["tag_off"]["commits"] > 0
    sums = [query(d, "SELECT sum(balance) FROM txmgr_bench_dl")[0][0] for d in dsns[:2]]
    assert sum(sums) == 0  # checked here again, independently of the script
    for dsn in dsns:
        assert query(dsn, "SELECT count(*) FROM pg_prepared_xacts "
                          "WHERE database = current_database()") == [(0,)]
    assert "| detection latency" in proc.stdout and "monkeypatched" in proc.stdout
    assert len(doc["tag_on"]["rates"]) == len(doc["tag_off"]["rates"]) == 2  # rounds in turn
    assert "cost of tagging" in proc.stdout

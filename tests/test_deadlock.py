"""Distributed deadlock detection (issue 16) on real servers.

Every test forms its waits for real (threads, each one global transaction)
and asserts outcomes: who was the victim, who committed, that nothing stays
prepared or open. Waits are bounded only as failure guards (GUARD seconds).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, query
from txmgr._tag import parse
from txmgr._waitgraph import Backend, WaitGraph
from txmgr.deadlock import Detector, DetectorReport

GUARD = float(os.environ.get("DL_GUARD", 60))  # seconds: a test that waits longer failed


def _tagged(bank: Bank) -> list[tuple[Any, ...]]:
    """Sessions still tagged as branches of a global transaction, on every participant."""
    rows: list[tuple[Any, ...]] = []
    for dsn in bank.dsns.values():
        rows += query(dsn, "SELECT pid, application_name FROM pg_stat_activity "
                           "WHERE datname = current_database() AND "
                           "starts_with(application_name, 'txm:')")
    return rows


def _until(what: str, check: Callable[[], bool]) -> None:
    """Wait for a condition (polling, bounded by GUARD as a failure guard)."""
    end = time.monotonic() + GUARD
    while not check():
        assert time.monotonic() < end, f"still not {what} after {GUARD:g}s"
        threading.Event().wait(0.02)


def _break_one(detector: Detector) -> DetectorReport:
    """Run detector passes until one cancels a victim."""
    reports: list[DetectorReport] = []

    def cancelled() -> bool:
        reports.append(detector.run_pass())
        return bool(reports[-1].cancelled)

    try:
        _until("a deadlock victim cancelled", cancelled)
    except AssertionError as e:
        raise AssertionError(f"{e}; the last pass: {reports[-1]}") from None
    return reports[-1]


class Workers:
    """Global transactions on threads; each runs its statements in order, the
    first statements of all of them before any second (a barrier)."""

    def __init__(self, tm: txmgr.TransactionManager, plans: dict[str, list[tuple[str, int]]]):
        self.tm = tm
        self.results: dict[str, BaseException | str] = {}
        self.txids: dict[str, str] = {}
        self._barrier = threading.Barrier(len(plans))
        self._threads = [threading.Thread(target=self._run, args=(n, p), daemon=True)
                         for n, p in plans.items()]

    def _run(self, name: str, plan: list[tuple[str, int]]) -> None:
        try:
            with self.tm.transaction() as tx:
                self.txids[name] = tx.txid
                for i, (participant, account) in enumerate(plan):
                    if i == 1:
                        self._barrier.wait(GUARD)
                    tx.connection(participant).execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (account,)
                    )
            self.results[name] = "committed"
        except BaseException as e:
            self.results[name] = e

    def __enter__(self) -> Workers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join(GUARD)
            assert not t.is_alive(), "a transaction is still blocked"


@pytest.fixture
def three(make_bank: MakeBank) -> Iterator[Bank]:
    """Participants a, b (two servers) and c (a's server, its own database)."""
    yield make_bank(("a", "b", "c"))


def _detector(bank: Bank) -> Iterator[Detector]:
    d = Detector(bank.config())
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def detector(three: Bank) -> Iterator[Detector]:
    yield from _detector(three)


def test_a_two_transaction_cycle_over_two_servers_loses_its_youngest(
    three: Bank, detector: Detector
) -> None:
    tm = three.manager()
    with Workers(tm, {"t1": [("a", 1), ("b", 1)], "t2": [("b", 1), ("a", 1)]}) as w:
        report = _break_one(detector)
    victims = [n for n, r in w.results.items() if isinstance(r, txmgr.DeadlockDetected)]
    assert len(victims) == 1, w.results
    (victim,) = victims
    (winner,) = set(w.results) - {victim}
    assert w.results[winner] == "committed"
    error = w.results[victim]
    assert isinstance(error, txmgr.DeadlockDetected)
    assert isinstance(error, txmgr.TransactionAborted)
    assert error.txid == w.txids[victim] == report.cancelled[0]
    assert error.others == (w.txids[winner],)
    assert "accounts" in error.relations and "accounts" in str(error)
    assert isinstance(error.__cause__, psycopg.errors.QueryCanceled)
    # The winner's increments only; nothing left prepared, open, or recorded.
    assert three.balance("a") == three.balance("b") == START + 1
    assert three.prepared() == []
    tm.close()
    assert _tagged(three) == []
    assert query(three.log_dsn, "SELECT count(*) FROM txmgr_deadlock_victim") == [(0,)]


def test_a_three_transaction_cycle_over_three_participants(
    three: Bank, detector: Detector
) -> None:
    tm = three.manager()
    plans = {"t1": [("a", 1), ("b", 1)], "t2": [("b", 1), ("c", 1)], "t3": [("c", 1), ("a", 1)]}
    with Workers(tm, plans) as w:
        report = _break_one(detector)
    victims = [n for n, r in w.results.items() if isinstance(r, txmgr.DeadlockDetected)]
    assert len(victims) == 1, w.results
    assert sorted(r for r in w.results.values() if r == "committed") == ["committed"] * 2
    (dl,) = [d for d in report.deadlocks if d.victim is not None]
    assert len(dl.members) == 3
    error = w.results[victims[0]]
    assert isinstance(error, txmgr.DeadlockDetected)
    assert sorted(error.others) == sorted(t for n, t in w.txids.items() if n != victims[0])
    # Each participant's account 1 was incremented by the two that committed.
    assert sum(three.balance(p) for p in "abc") == 3 * START + 4
    assert three.prepared() == []
    tm.close()
    assert _tagged(three) == []


def test_a_cycle_through_a_session_that_is_not_txmgrs(three: Bank, detector: Detector) -> None:
    """t1 waits on b for a plain session S, S waits on b for t2, t2 waits on a for t1:
    a cycle over two servers; S is never cancelled, one of t1, t2 is."""
    tm = three.manager()
    with psycopg.connect(three.dsns["b"]) as s:
        s.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        s_done = threading.Event()
        s_error: list[BaseException] = []

        def plain_second() -> None:
            try:
                s.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
                s.commit()
            except BaseException as e:
                s_error.append(e)
            s_done.set()

        with Workers(tm, {"t1": [("a", 1), ("b", 1)], "t2": [("b", 2), ("a", 1)]}) as w:
            _until("t1 and t2 wait", lambda: len(detector.gather()[0].waits) >= 2)
            plain = threading.Thread(target=plain_second, daemon=True)
            plain.start()
            report = _break_one(detector)
            # Whoever won, the plain session must get its lock and commit for the
            # transaction that waits for it to go on.
            plain.join(GUARD)
        assert s_done.is_set() and s_error == []
    victims = [n for n, r in w.results.items() if isinstance(r, txmgr.DeadlockDetected)]
    assert len(victims) == 1, w.results
    (dl,) = [d for d in report.deadlocks if d.victim is not None]
    assert any(m.startswith("pid ") and m.endswith(" on b") for m in dl.members)
    error = w.results[victims[0]]
    assert isinstance(error, txmgr.DeadlockDetected)
    assert any(o.startswith("pid ") for o in error.others)
    assert three.prepared() == []


def test_a_wait_behind_a_prepared_branch_is_never_cancelled(
    three: Bank, detector: Detector
) -> None:
    with psycopg.connect(three.dsns["a"]) as x:
        x.execute("UPDATE accounts SET balance = balance + 100 WHERE id = 1")
        x.execute("PREPARE TRANSACTION 'other_app_1'")
    tm = three.manager()
    with Workers(tm, {"t1": [("b", 1), ("a", 1)]}) as w:
        _until("t1 waits behind the prepared branch",
               lambda: any(wt.holder == "prepared on a" for wt in detector.run_pass().waits))
        reports = [detector.run_pass() for _ in range(5)]
        assert all(r.cancelled == [] for r in reports)
        assert all(d.victim is None for r in reports for d in r.deadlocks)
        assert w.results == {}  # still waiting
        query(three.dsns["a"], "COMMIT PREPARED 'other_app_1'")
    assert w.results == {"t1": "committed"}
    assert three.balance("a") == START + 101


# -- the graph's rules, without servers ----------------------------------------


def _b(participant: str, pid: int, txid: str | None, blockers: tuple[int, ...] = (),
       voted: bool = False, start: int = 0) -> Backend:
    from datetime import UTC, datetime, timedelta

    from txmgr._tag import Tag

    return Backend(participant, pid, Tag(txid, voted) if txid else None,
                   datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=start), blockers,
                   ("accounts",), None)


T1, T2, T3 = "1" * 16, "2" * 16, "3" * 16


def test_the_youngest_transaction_of_a_cycle_is_the_victim() -> None:
    graph = WaitGraph([
        _b("a", 10, T1, start=1), _b("a", 11, T2, blockers=(10,), start=2),
        _b("b", 20, T1, blockers=(21,), start=1), _b("b", 21, T2, start=2),
    ])
    (dl,) = graph.deadlocks()
    assert dl.victim == T2 and dl.others == (T1,)
    assert [(w.participant, w.pid) for w in dl.waits] == [("a", 11)]


def test_a_transaction_that_voted_is_never_the_victim() -> None:
    graph = WaitGraph([
        _b("a", 10, T1, start=1), _b("a", 11, T2, blockers=(10,), start=2, voted=True),
        _b("b", 20, T1, blockers=(21,), start=1), _b("b", 21, T2, start=2, voted=True),
    ])
    assert [d.victim for d in graph.deadlocks()] == [T1]
    only_voted = WaitGraph([
        _b("a", 10, T1, voted=True), _b("a", 11, T2, blockers=(10,), voted=True),
        _b("b", 20, T1, blockers=(21,), voted=True), _b("b", 21, T2, voted=True),
    ])
    assert [d.victim for d in only_voted.deadlocks()] == [None]


def test_no_cycle_passes_through_a_prepared_transaction_or_a_mere_chain() -> None:
    graph = WaitGraph([
        _b("a", 11, T2, blockers=(0,)),  # behind a prepared transaction
        _b("b", 20, T1, blockers=(21,)), _b("b", 21, T2), _b("b", 22, T3, blockers=(20,)),
    ])
    assert graph.deadlocks() == []
    assert {w.holder for w in graph.waits} == {"prepared on a", f"tx {T2}", f"tx {T1}"}


def test_two_cycles_lose_one_victim_each() -> None:
    graph = WaitGraph([
        _b("a", 10, T1, blockers=(11,), start=1), _b("a", 11, T2, blockers=(10,), start=2),
        _b("b", 20, T3, blockers=(21,), start=3), _b("b", 21, None, blockers=(20,)),
    ])
    assert sorted(d.victim or "" for d in graph.deadlocks()) == sorted([T2, T3])


def test_the_tag_survives_the_applications_own_name() -> None:
    assert parse(f"txm:{T1}:a myapp") == parse(f"txm:{T1}:a")
    tag = parse(f"txm:{T1}:v myapp")
    assert tag is not None and tag.voted and tag.txid == T1
    assert parse("myapp") is None and parse(None) is None and parse(f"txm:{T1}:ax") is None


def test_the_active_daemon_breaks_a_cycle_and_counts_it(three: Bank) -> None:
    """No detector of the test's own: the daemon's leader runs it on its interval."""
    from txmgr.daemon import Daemon

    config = txmgr.Config(participants=three.dsns, log=three.log, deadlock_interval=0.2,
                          recovery_interval=60)
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        tm = three.manager()
        with Workers(tm, {"t1": [("a", 1), ("b", 1)], "t2": [("b", 1), ("a", 1)]}) as w:
            pass  # the workers end when the daemon has broken the cycle
    finally:
        daemon.stop.set()
        runner.join(GUARD)
    outcomes = sorted(type(r).__name__ if not isinstance(r, str) else r
                      for r in w.results.values())
    assert outcomes == ["DeadlockDetected", "committed"]
    try:
        registry = daemon.metrics.registry
    except txmgr.ConfigError:
        return  # no prometheus_client: the counts are not kept
    assert registry.get_sample_value("txmgr_deadlocks_detected_total") == 1
    assert registry.get_sample_value("txmgr_deadlock_victims_cancelled_total") == 1
    assert (registry.get_sample_value("txmgr_deadlock_pass_duration_seconds_count") or 0) >= 1


def test_status_shows_who_waits_for_whom_across_servers(
    three: Bank, detector: Detector, tmp_path: Any
) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "txmgr.toml"
    path.write_text(
        f"[log]\ndsn = {json.dumps(three.log_dsn)}\n[participants]\n"
        + "".join(f"{n} = {json.dumps(d)}\n" for n, d in three.dsns.items())
    )

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "txmgr.cli", "status", "--config",
                               str(path), *args], capture_output=True, text=True, timeout=120,
                              check=False)

    tm = three.manager()
    with Workers(tm, {"t1": [("a", 1), ("b", 1)], "t2": [("b", 1), ("a", 1)]}) as w:
        _until("both wait", lambda: len(detector.gather()[0].waits) >= 2)
        shown = status("--json")
        table = status()
        _break_one(detector)
    assert shown.returncode == 0, shown.stderr
    waits = json.loads(shown.stdout)["waits"]
    t1, t2 = w.txids["t1"], w.txids["t2"]
    got = sorted((x["waiter"], x["participant"], x["blocked_by"]) for x in waits)
    assert got == sorted([(t1, "b", t2), (t2, "a", t1)])
    assert all("accounts" in x["relations"] and x["waited_seconds"] >= 0 for x in waits)
    assert "lock waits: 2" in table.stdout and t1 in table.stdout and t2 in table.stdout


def test_async_the_victim_gets_deadlock_detected(three: Bank, detector: Detector) -> None:
    import asyncio

    async def main() -> dict[str, BaseException | str]:
        results: dict[str, BaseException | str] = {}
        both_first = asyncio.Barrier(2)
        async with txmgr.AsyncTransactionManager(three.dsns, three.log) as tm:

            async def work(name: str, first: str, second: str) -> None:
                try:
                    async with tm.transaction() as tx:
                        await (await tx.connection(first)).execute(
                            "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                        await both_first.wait()
                        await (await tx.connection(second)).execute(
                            "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                    results[name] = "committed"
                except BaseException as e:
                    results[name] = e

            tasks = [asyncio.create_task(work("t1", "a", "b")),
                     asyncio.create_task(work("t2", "b", "a"))]
            await asyncio.to_thread(_break_one, detector)
            await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
        return results

    results = asyncio.run(main())
    outcomes = sorted(type(r).__name__ if not isinstance(r, str) else r
                      for r in results.values())
    assert outcomes == ["DeadlockDetected", "committed"]
    assert three.balance("a") == three.balance("b") == START + 1
    assert three.prepared() == []


def test_run_transaction_reruns_the_victim_and_both_commit(
    three: Bank, detector: Detector
) -> None:
    """The detector's victim is retryable: txmgr.run_transaction reruns it after
    the winner's commit, so both transfers land (each attempt with a deadline)."""
    tm = three.manager()
    barrier = threading.Barrier(2)
    attempts = {"t1": 0, "t2": 0}
    results: dict[str, BaseException | str] = {}
    stop = threading.Event()

    def run(name: str, plan: list[tuple[str, int]]) -> None:
        def fn(tx: txmgr.Transaction) -> None:
            attempts[name] += 1
            for i, (participant, account) in enumerate(plan):
                if i == 1 and attempts[name] == 1:
                    barrier.wait(GUARD)  # both hold their first lock: a cycle
                tx.connection(participant).execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (account,))
        try:
            txmgr.run_transaction(tm, fn, timeout=GUARD)
            results[name] = "committed"
        except BaseException as e:
            results[name] = e

    def detect() -> None:
        while not stop.is_set():
            detector.run_pass()
            stop.wait(0.05)

    threads = [threading.Thread(target=run, args=("t1", [("a", 1), ("b", 1)])),
               threading.Thread(target=run, args=("t2", [("b", 1), ("a", 1)]))]
    watcher = threading.Thread(target=detect, daemon=True)
    watcher.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD)
            assert not t.is_alive(), "a transaction is still blocked"
    finally:
        stop.set()
        watcher.join(GUARD)
    assert results == {"t1": "committed", "t2": "committed"}
    assert sorted(attempts.values()) == [1, 2]  # the victim ran twice, the winner once
    assert three.balance("a") == three.balance("b") == START + 2
    assert three.prepared() == []
    tm.close()

"""The recovery daemon: its loop (with a fake clock), and real daemons against real servers."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from ops_support import (
    KV_TABLE,
    Cluster,
    DaemonProcess,
    metric,
    query,
    wait_for,
    write_config,
)
from txmgr._leader import LeaderState
from txmgr._logging import configure_logging
from txmgr.config import Config
from txmgr.daemon import BACKOFF_START, Daemon
from txmgr.manager import TransactionManager
from txmgr.recovery import Recoverer, RecoveryReport
from txmgr.testing import PgServer

Daemons = Callable[..., DaemonProcess]
CONFIG = Config(participants={"orders": "postgresql://u:pw@h/o"}, log="postgresql://u:pw@h/l")


# -- the loop, without servers or sleeping ---------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLeader:
    def __init__(self, states: list[LeaderState]) -> None:
        self.states = states
        self.logid: str | None = "0011aabb"
        self.last_error: str | None = None
        self.released = 0
        self.acquisitions = 0
        self._held = False

    def ensure(self) -> LeaderState:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.last_error = "connection refused" if state == "unreachable" else None
        if state == "active" and not self._held:
            self.acquisitions += 1
        self._held = state == "active"
        return state

    def release(self) -> None:
        self.released += 1


class FakeRecoverer:
    def __init__(self, clock: FakeClock, took: float = 0.0,
                 during: Callable[[], None] | None = None) -> None:
        self.clock, self.took, self.during = clock, took, during
        self.passes = 0
        self.closed = 0

    def run_pass(self) -> RecoveryReport:
        self.passes += 1
        self.clock.now += self.took
        if self.during:
            self.during()
        return RecoveryReport()

    def close(self) -> None:
        self.closed += 1


def _daemon(leader: FakeLeader, recoverer: FakeRecoverer, clock: FakeClock, *,
            waits: list[float], steps: int, interval: float = 10.0,
            jitter: float = 0.9) -> Daemon:
    def wait(seconds: float) -> bool:
        waits.append(round(seconds, 6))
        clock.now += seconds
        return len(waits) >= steps

    return Daemon(CONFIG, interval=interval, clock=clock, wait=wait,
                  jitter=lambda lo, hi: jitter, leader=leader, recoverer=recoverer)


def test_steps_start_one_jittered_interval_apart() -> None:
    clock, waits = FakeClock(), list[float]()
    leader, rec = FakeLeader(["active"]), FakeRecoverer(clock, took=0.3)
    d = _daemon(leader, rec, clock, waits=waits, steps=3)
    d.run()
    # 10 s x 0.9 jitter, counted from the start of the step: the pass took 0.3 s.
    assert waits == [8.7, 8.7, 8.7]
    assert rec.passes == 3
    assert (leader.released, rec.closed) == (1, 1)  # closed on the way out
    assert d.metrics.passes._value.get() == 3
    assert d.metrics.active._value.get() == 0  # not active any more once stopped


def test_jitter_range_keeps_a_standby_within_one_interval() -> None:
    seen: list[tuple[float, float]] = []

    def jitter(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    d = Daemon(CONFIG, interval=10, jitter=jitter,
               leader=FakeLeader(["standby"]), recoverer=FakeRecoverer(FakeClock()))
    assert d.next_delay() == 10.0
    assert seen == [(0.8, 1.0)]


def test_backoff_while_the_log_is_unreachable_then_back_to_the_interval() -> None:
    clock, waits = FakeClock(), list[float]()
    leader = FakeLeader([*(["unreachable"] * 6), "active"])  # type: ignore[list-item]
    rec = FakeRecoverer(clock)
    d = _daemon(leader, rec, clock, waits=waits, steps=8, jitter=1.0)
    healthy: list[bool] = []
    real_step = d.step

    def step() -> Any:
        out = real_step()
        healthy.append(d.health()[0])
        return out

    d.step = step  # type: ignore[method-assign]
    d.run()
    assert waits == [BACKOFF_START, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert healthy == [False] * 6 + [True] * 2
    assert rec.passes == 2  # only once the log answered and the lock was ours
    assert d.metrics.errors.labels("log")._value.get() == 6


def test_a_stop_during_a_pass_finishes_that_pass_and_nothing_more() -> None:
    clock, waits = FakeClock(), list[float]()
    stop = threading.Event()
    finished: list[int] = []

    def signal_arrives() -> None:
        stop.set()
        finished.append(1)

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return stop.is_set()

    rec = FakeRecoverer(clock, took=1.0, during=signal_arrives)
    d = Daemon(CONFIG, interval=10, stop=stop, clock=clock, wait=wait,
               leader=FakeLeader(["active"]), recoverer=rec)
    d.run()
    assert (rec.passes, finished, waits) == (1, [1], [])


def test_standby_runs_no_pass_and_losing_the_lock_drops_recovery_connections() -> None:
    clock, waits = FakeClock(), list[float]()
    leader = FakeLeader(["standby", "active", "active", "standby", "active"])
    rec = FakeRecoverer(clock)
    d = _daemon(leader, rec, clock, waits=waits, steps=5)
    active: list[bool] = []
    real_step = d.step

    def step() -> Any:
        out = real_step()
        active.append(d.active)
        assert d.metrics.active._value.get() == (1 if d.active else 0)
        return out

    d.step = step  # type: ignore[method-assign]
    d.run()
    assert active == [False, True, True, False, True]
    assert rec.passes == 3
    assert rec.closed == 2  # once on losing the lock, once on the way out


def test_json_logs_carry_fields_and_never_a_password() -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", stream=out)
    try:
        logging.getLogger("txmgr.recovery").info(
            "resolved txid=%s", "ab", extra={"txid": "ab", "gid": "g", "participant": "orders",
                                             "outcome": "committed"})
        logging.getLogger("txmgr.daemon").warning(
            "cannot connect to postgresql://app:hunter2@db/x")
    finally:
        configure_logging("text", "WARNING")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "txid", "gid", "participant", "outcome")} \
        == {"level": "info", "logger": "txmgr.recovery", "txid": "ab", "gid": "g",
            "participant": "orders", "outcome": "committed"}
    assert "hunter2" not in second["message"] and "app:****@db" in second["message"]


# -- real daemons ------------------------------------------------------------------


def _resolutions(d: DaemonProcess) -> set[tuple[str, str, str]]:
    return {(e["txid"], e["participant"], e["outcome"])
            for e in d.events() if "outcome" in e and "gid" in e}


def _nothing_left(cluster: Cluster) -> bool:
    return cluster.all_prepared() == {"orders": [], "billing": []} \
        and cluster.decision_count() == 0


def test_daemon_finishes_what_killed_coordinators_left(
    cluster: Cluster, daemons: Daemons
) -> None:
    committed = cluster.transfer("after_decision", "k1")
    half = cluster.transfer("after_commit_prepared", "k2")
    undecided = cluster.transfer("before_decision", "k3")
    early = cluster.transfer("after_prepare", "k4")
    assert sum(map(len, cluster.all_prepared().values())) >= 5
    d = daemons(cluster.config_path)
    wait_for(lambda: _nothing_left(cluster), what="every branch resolved, every row gone")
    assert cluster.kv("orders") == cluster.kv("billing") == {"k1": 1, "k2": 1}
    got = _resolutions(d)
    assert {(committed, "orders", "committed"), (committed, "billing", "committed"),
            (undecided, "orders", "rolled back"), (undecided, "billing", "rolled back")} <= got
    assert {t for t, _, o in got if o == "committed"} == {committed, half}
    assert {t for t, _, o in got if o == "rolled back"} == {undecided, early}
    line = next(e for e in d.events() if e.get("txid") == committed)
    assert line["gid"].startswith(f"txm1_{cluster.logid}_{committed}_")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0
    text = d.log_file.read_text()
    assert all(s.password and s.password not in text for s in cluster.servers)


def test_two_daemons_one_active_and_failover_after_sigkill(
    cluster: Cluster, daemons: Daemons
) -> None:
    interval = 0.5
    first = daemons(cluster.config_path, interval=interval)
    first.wait_event("active")
    second = daemons(cluster.config_path, interval=interval)
    second.wait_event("standby")
    holder = cluster.lock_holder()
    assert holder is not None
    assert holder.startswith(first.identity_prefix)
    # Exactly one is active, by their own account too.
    assert metric(first.scrape(), "txmgr_daemon_active") == 1
    assert metric(second.scrape(), "txmgr_daemon_active") == 0

    first.proc.kill()
    killed_at = time.monotonic()
    first.wait()
    second.wait_event("active", timeout=10)
    took = time.monotonic() - killed_at
    assert took < interval + 1.0, f"standby took {took:.2f}s to take over"
    holder = cluster.lock_holder()
    assert holder is not None and holder.startswith(second.identity_prefix)
    assert metric(second.scrape(), "txmgr_daemon_active") == 1

    txid = cluster.transfer("after_decision", "after-failover")
    wait_for(lambda: _nothing_left(cluster), what="the new active daemon to recover")
    assert (txid, "orders", "committed") in _resolutions(second)


def test_sigterm_and_sigint_finish_and_exit_zero(cluster: Cluster, daemons: Daemons) -> None:
    active = daemons(cluster.config_path)
    active.wait_event("active")
    standby = daemons(cluster.config_path)
    standby.wait_event("standby")
    standby.proc.send_signal(signal.SIGINT)
    assert standby.wait() == 0
    active.proc.send_signal(signal.SIGTERM)
    assert active.wait() == 0
    for d in (active, standby):
        assert d.find("stopped"), d.log_file.read_text()
    assert cluster.lock_holder() is None  # released, not left to a dying session
    assert query(cluster.log, "SELECT count(*) FROM pg_stat_activity WHERE "
                 "application_name LIKE 'txmgr-daemon%%'")[0][0] == 0


def test_losing_the_lock_connection_means_standing_down_then_retaking(
    cluster: Cluster, daemons: Daemons
) -> None:
    d = daemons(cluster.config_path)
    d.wait_event("active")
    query(cluster.log, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name LIKE %s", (d.identity_prefix + "%",))
    d.wait_event("lost_leadership")
    wait_for(lambda: len(d.find("active")) == 2, what="the daemon to take the lock again")
    holder = cluster.lock_holder()
    assert holder is not None and holder.startswith(d.identity_prefix)


def test_a_participant_that_is_down_does_not_stop_the_others(
    cluster: Cluster, daemons: Daemons, crash_server: PgServer
) -> None:
    billing = crash_server.create_database()
    query(billing, KV_TABLE)
    participants = {"orders": cluster.participants["orders"], "billing": billing}
    config = write_config(cluster.tmp / "down.toml", participants, cluster.log)
    stmt = "INSERT INTO kv VALUES ('x', 1)"
    txid = cluster.kill_coordinator("after_decision", {"orders": [stmt], "billing": [stmt]},
                                    participants=participants)
    crash_server.stop("fast")  # the prepared branch survives in its data directory
    d = daemons(config)
    wait_for(lambda: cluster.prepared("orders") == [], what="orders to be recovered")
    assert cluster.kv("orders") == {"x": 1}
    wait_for(lambda: len(d.find("unreachable", participant="billing")) >= 2,
             what="billing reported unreachable on every pass")
    samples = d.scrape()
    assert metric(samples, "txmgr_participant_up", participant="billing") == 0
    assert metric(samples, "txmgr_participant_up", participant="orders") == 1
    assert cluster.decision_count() == 1  # kept until billing's branch is finished too

    crash_server.restart()
    wait_for(lambda: cluster.decision_count() == 0, what="billing recovered after restart")
    assert query(billing, "SELECT k, v FROM kv") == [("x", 1)]
    assert query(billing, "SELECT gid FROM pg_prepared_xacts") == []
    assert (txid, "billing", "committed") in _resolutions(d)
    assert metric(d.scrape(), "txmgr_participant_up", participant="billing") == 1
    text = d.log_file.read_text()
    assert crash_server.password not in text and "****@" in text


# -- the decision log stays small ---------------------------------------------------


class CountingRecoverer:
    """A real Recoverer that checks, after each pass, the bound on decision rows."""

    def __init__(self, config: Config, log_dsn: str, done: Callable[[], int]) -> None:
        self._inner = Recoverer(config)
        self._log = psycopg.connect(log_dsn, autocommit=True)
        self._done = done
        self.samples: list[tuple[int, int]] = []  # (rows after the pass, allowed)
        self.committed: set[str] = set()  # txids of branches this recoverer committed

    def run_pass(self) -> RecoveryReport:
        before = self._done()
        report = self._inner.run_pass()
        self.committed |= {r.txid for r in report.resolutions if r.outcome == "committed"}
        rows = self._log.execute("SELECT count(*) FROM txmgr_decision").fetchone()
        assert rows is not None
        # Rows left = decisions made since the pass read the table + those in flight.
        self.samples.append((int(rows[0]), self._done() - before + THREADS))
        return report

    def close(self) -> None:
        self._inner.close()


THREADS = 2


def test_the_decision_log_stays_small_with_the_daemon_running(cluster: Cluster) -> None:
    n = 300
    done = 0
    lock = threading.Lock()

    def count() -> int:
        with lock:
            return done

    config = cluster.config
    recoverer = CountingRecoverer(config, cluster.log, count)
    daemon = Daemon(config, interval=0.1, recoverer=recoverer)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    tm = TransactionManager(cluster.participants, cluster.log, pool_min_size=0)
    try:
        def work(offset: int) -> None:
            nonlocal done
            for i in range(offset, n, THREADS):
                with tm.transaction() as tx:
                    for name in ("orders", "billing"):
                        tx.connection(name).execute("INSERT INTO kv VALUES (%s, %s)",
                                                    (f"t{i}", i))
                with lock:
                    done += 1

        workers = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # A coordinator killed after its decision leaves a row nobody else deletes.
        killed = cluster.transfer("after_decision", "killed")
        wait_for(lambda: killed in recoverer.committed, what="the daemon to commit it")
        passes = len(recoverer.samples)
        wait_for(lambda: len(recoverer.samples) >= passes + 1, what="one more pass")
        # The manager is still open: its last rows, and the killed one's, were
        # deleted by the daemon.
        assert cluster.decision_count() == 0
    finally:
        daemon.stop.set()
        runner.join(timeout=30)
        tm.close()
    assert len(recoverer.samples) >= 5
    over = [(rows, allowed) for rows, allowed in recoverer.samples if rows > allowed]
    assert over == [], f"decision rows above the bound after some passes: {over}"
    assert len(cluster.kv("orders")) == len(cluster.kv("billing")) == n + 1
    assert cluster.all_prepared() == {"orders": [], "billing": []}
    assert os.environ.get("TXMGR_TEST_DSNS") or daemon.metrics.active._value.get() == 0


def test_run_from_the_command_line_module(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "txmgr.cli", "daemon", "--help"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0
    assert "--interval" in proc.stdout and "--metrics-port" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "txmgr.cli", "daemon", "--config",
                          str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_an_unexpected_error_in_a_step_is_logged_and_the_loop_goes_on() -> None:
    clock, waits = FakeClock(), list[float]()

    class Flaky(FakeRecoverer):
        def run_pass(self) -> RecoveryReport:
            if self.passes == 0:
                self.passes += 1
                raise RuntimeError("boom")
            return super().run_pass()

    rec = Flaky(clock)
    d = _daemon(FakeLeader(["active"]), rec, clock, waits=waits, steps=3, jitter=1.0)
    d.run()
    assert rec.passes == 3
    assert waits == [BACKOFF_START, 10.0, 10.0]  # backed off once, then the interval
    assert d.metrics.errors.labels("daemon")._value.get() == 1


def test_a_metrics_port_in_use_is_a_configuration_error(cluster: Cluster) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "txmgr.cli", "daemon", "--config", str(cluster.config_path),
             "--metrics-port", str(port)],
            capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr

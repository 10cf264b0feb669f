"""Edge cases of the operations code found in review: a long log outage, DSNs
that libpq cannot parse (and would quote with their password), a gid with an
lxid beyond bigint, gauges of an unreachable participant."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ops_support import Cluster, prepare_branch, run_cli, write_config
from txmgr._gid import Gid, new_txid
from txmgr._leader import LeaderState
from txmgr.config import Config
from txmgr.daemon import Daemon
from txmgr.errors import ConfigError
from txmgr.metrics import DaemonMetrics
from txmgr.recovery import RecoveryReport, recover
from txmgr.status import BranchStatus, StatusReport, inspect

CONFIG = Config(participants={"orders": "postgresql://u:pw@h/o"}, log="postgresql://u:pw@h/l")

# A password with a stray '%' in a URL DSN ("50%off"): libpq refuses to parse
# it and quotes the whole token - the password - in its error message.
SECRET = "50%offS3cret"
BAD_DSN = f"postgresql://app:{SECRET}@127.0.0.1:9/db"  # "%of" is no valid escape
GOOD_DSN = "postgresql://app:50%25offS3cret@127.0.0.1:9/db"  # the same, encoded; no server


# -- 1. the daemon dies after ~1025 consecutive failures (float overflow) ------------


class _Unreachable:
    logid: str | None = "0011aabb"
    last_error: str | None = "connection refused"
    acquisitions = 0

    def ensure(self) -> LeaderState:
        return "unreachable"

    def release(self) -> None:
        pass


class _NoRecoverer:
    def run_pass(self) -> RecoveryReport:
        raise AssertionError("never active")

    def close(self) -> None:
        pass


def test_a_long_log_outage_does_not_kill_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    """BACKOFF_START * 2.0 ** (failures - 1) overflows a float at 1025 failures:
    the OverflowError escapes run() (next_delay() is outside the try) and the
    daemon exits. With a 10 s interval that is a log outage of ~2.5 hours."""
    caplog.set_level(logging.CRITICAL)
    clock = [0.0]
    steps = [0]

    def wait(seconds: float) -> bool:
        clock[0] += seconds
        steps[0] += 1
        return steps[0] >= 1100

    d = Daemon(CONFIG, interval=10, clock=lambda: clock[0], wait=wait,
               jitter=lambda lo, hi: 1.0, leader=_Unreachable(), recoverer=_NoRecoverer())
    d.run()  # must only return when wait() says stop
    assert steps[0] == 1100


# -- 2. passwords leak through libpq's DSN parse errors -----------------------------


def test_status_never_prints_a_password_of_an_unparsable_dsn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "t.toml", {"orders": BAD_DSN}, BAD_DSN)
    code, out, err = run_cli(capsys, "status", "--config", str(config))
    assert code == 2  # refused when the configuration is read
    assert SECRET not in out + err, out + err
    assert "percent-encode" in out + err


def test_the_daemon_never_logs_a_password_of_an_unparsable_dsn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:  # refused before any daemon starts
        Config(participants={"orders": BAD_DSN}, log=BAD_DSN)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(info.value)
    assert SECRET not in text, text
    # A DSN that parses but whose server rejects it is reported masked by the daemon.
    config = Config(participants={"orders": GOOD_DSN}, log=GOOD_DSN)
    d = Daemon(config, interval=10)
    try:
        step = d.step()
    finally:
        d.close()
    assert step.state == "unreachable"
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(d.health())
    assert SECRET not in text, text


def test_resolve_never_prints_a_password_of_an_unparsable_dsn(tmp_path: Path) -> None:
    config = write_config(tmp_path / "t.toml", {"orders": BAD_DSN}, BAD_DSN)
    proc = subprocess.run(
        [sys.executable, "-m", "txmgr.cli", "resolve", "some-gid", "--commit",
         "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert SECRET not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr  # a configuration error, not a traceback
    assert "Traceback" not in proc.stderr


# -- 3. one malformed gid of our log stops all recovery and all status verdicts -----


def _poison(cluster: Cluster) -> str:
    """A gid with this log's prefix whose lxid does not fit a bigint: not ours."""
    gid = f"txm1_{cluster.logid}_{new_txid()}_{2**64 - 1}_orders"
    assert Gid.parse(gid) is None
    prepare_branch(cluster.participants["orders"], gid, [])
    return gid


def test_one_gid_with_a_huge_lxid_does_not_stop_recovery_of_the_others(
    cluster: Cluster,
) -> None:
    good, _ = cluster.our_branch("billing", "commit", ["INSERT INTO kv VALUES ('k', 1)"])
    _poison(cluster)
    report = recover(cluster.config)
    assert report.log_reachable, report.errors
    assert good not in cluster.prepared("billing"), report.errors
    assert cluster.kv("billing") == {"k": 1}


def test_one_gid_with_a_huge_lxid_does_not_blind_status(cluster: Cluster) -> None:
    good, _ = cluster.our_branch("billing", "commit")
    _poison(cluster)
    report = inspect(cluster.config)
    verdicts = {b.gid: b.decision for b in report.branches}
    assert report.log_error is None, report.log_error
    assert verdicts[good] == "commit"


# -- 4. metrics: an unreachable participant's in-doubt gauges drop to 0 -------------


def _branch(participant: str, age: float) -> BranchStatus:
    from datetime import UTC, datetime

    return BranchStatus(participant, "g", datetime.now(UTC), age, "app", "commit", None, 1, (), 1)


def test_in_doubt_gauge_of_an_unreachable_participant_is_not_claimed_zero() -> None:
    """oldest_in_doubt_seconds keeps its last value for an unreachable participant
    ("unknown: keep the last value rather than claim 0"), but in_doubt_branches
    is set to 0 for it: the two gauges then contradict each other, and a
    count-based alert clears while the participant is down."""
    m = DaemonMetrics(["orders"])
    m.record_status(StatusReport(branches=[_branch("orders", 600.0)]))
    m.record_status(StatusReport(unreachable={"orders": "connection refused"}))

    def value(name: str, **labels: Any) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("txmgr_oldest_in_doubt_seconds", participant="orders") == 600.0
    assert value("txmgr_in_doubt_branches", participant="orders", decision="commit") == 1.0

"""Failpoints: every protocol step, crashed for real, ends as the decision says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import txmgr
from support import ACCOUNTS, START, Bank, MakeBank, transfer
from txmgr import failpoints
from txmgr.errors import ConfigError, TransactionAborted
from txmgr.transaction import TransactionState


@pytest.fixture(autouse=True)
def _clean_failpoints() -> Iterator[None]:
    failpoints.clear()
    yield
    failpoints.clear()


# -- pure logic -------------------------------------------------------------------


def test_parse_and_switch() -> None:
    failpoints.load("after_prepare=crash@0.05, before_decision=sleep(0.25)")
    assert failpoints.active() == {"after_prepare": "crash", "before_decision": "sleep"}
    failpoints.disable("after_prepare")
    assert failpoints.active() == {"before_decision": "sleep"}
    failpoints.clear()
    assert failpoints.active() == {}


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("after_prepare=explode", "crash, raise or sleep"),
        ("after_prepare=crash@1.5", "crash, raise or sleep"),
        ("after_prepar=crash", "use one of before_vote"),
        ("after_prepare", "name=action"),
    ],
)
def test_bad_spec_is_a_config_error(spec: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        failpoints.load(spec)
    assert failpoints.active() == {}


def test_probability_draws_are_reproducible() -> None:
    def run() -> int:
        failpoints.clear()
        failpoints.seed(7)
        failpoints.enable("before_vote", "raise@0.3")
        for _ in range(200):
            try:
                failpoints.fire("before_vote")
            except failpoints.FailpointError:
                pass
        return failpoints.hits("before_vote")

    first = run()
    assert 20 < first < 120  # about 60 of 200
    assert run() == first


def test_off_points_do_nothing() -> None:
    failpoints.enable("after_decision", "raise")
    failpoints.fire("before_decision")  # another point: no effect
    assert failpoints.hits("before_decision") == 0
    with pytest.raises(failpoints.FailpointError, match="after_decision"):
        failpoints.fire("after_decision")
    assert failpoints.hits("after_decision") == 1


# -- crashes at every step, against real servers ----------------------------------

BEFORE_DECISION = ["before_vote", "before_prepare", "after_prepare", "before_decision"]
AFTER_DECISION = [
    "after_decision", "before_commit_prepared", "after_commit_prepared", "before_cleanup",
]


def _settle(bank: Bank) -> None:
    report = txmgr.recover(bank.config())
    assert report.errors == []
    assert bank.prepared() == []


@pytest.mark.crash
@pytest.mark.parametrize("log", ["dedicated", "a"])
@pytest.mark.parametrize("point", BEFORE_DECISION)
def test_crash_before_decision_rolls_back(make_bank: MakeBank, point: str, log: str) -> None:
    bank = make_bank(("a", "b", "c"), log=log)
    bank.crash_at(point, transfer(100, "b", "c"))
    _settle(bank)
    assert (bank.balance("b"), bank.balance("c")) == (START, START)
    assert bank.decisions() == []


@pytest.mark.crash
@pytest.mark.parametrize("log", ["dedicated", "a"])
@pytest.mark.parametrize("point", AFTER_DECISION)
def test_crash_after_decision_commits(make_bank: MakeBank, point: str, log: str) -> None:
    bank = make_bank(("a", "b", "c"), log=log)
    bank.crash_at(point, transfer(100, "b", "c"))
    _settle(bank)
    assert (bank.balance("b"), bank.balance("c")) == (START - 100, START + 100)
    assert bank.total() == bank.expected_total


@pytest.mark.crash
def test_crash_before_one_phase_commit_rolls_back(bank: Bank) -> None:
    bank.crash_at("before_one_phase", {"a": ["UPDATE accounts SET balance = 0 WHERE id = 1"]})
    _settle(bank)
    assert bank.balance("a") == START


def test_raise_before_decision_aborts_cleanly(bank: Bank) -> None:
    tm = bank.manager()
    for point in BEFORE_DECISION:
        failpoints.clear()
        failpoints.enable(point, "raise")
        with pytest.raises(TransactionAborted, match=point) as info:
            with tm.transaction() as tx:
                for name, stmts in transfer(5, "a", "b").items():
                    for stmt in stmts:
                        tx.connection(name).execute(stmt)
        assert isinstance(info.value.__cause__, failpoints.FailpointError)
        assert tx.state is TransactionState.ROLLED_BACK
        assert bank.prepared() == []
    assert bank.total() == bank.expected_total
    assert bank.balance("a") == START


def test_raise_after_decision_still_commits(bank: Bank) -> None:
    tm = bank.manager()
    failpoints.enable("after_decision", "raise")
    failpoints.enable("after_commit_prepared", "raise")
    with tm.transaction() as tx:
        for name, stmts in transfer(5, "a", "b").items():
            for stmt in stmts:
                tx.connection(name).execute(stmt)
    assert tx.state is TransactionState.COMMITTED
    assert failpoints.hits("after_decision") == 1
    assert failpoints.hits("after_commit_prepared") == 2
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


def test_raise_before_commit_prepared_leaves_the_branch_to_recovery(bank: Bank) -> None:
    tm = bank.manager()
    failpoints.enable("before_commit_prepared", "raise")
    with tm.transaction() as tx:
        for name, stmts in transfer(5, "a", "b").items():
            for stmt in stmts:
                tx.connection(name).execute(stmt)
    assert tx.state is TransactionState.COMMITTED_PENDING
    assert len(bank.prepared()) == 2
    _settle(bank)
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)
    assert bank.total() == ACCOUNTS * START * 2


def test_environment_switches_points_on_in_a_new_process() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "TXMGR_FAILPOINTS": "after_decision=crash,before_vote=sleep(0.01)@0.5",
           "TXMGR_FAILPOINTS_SEED": "3"}
    out = subprocess.run(
        [sys.executable, "-c", "from txmgr import failpoints; print(sorted(failpoints.active()))"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "['after_decision', 'before_vote']"
    env["TXMGR_FAILPOINTS"] = "after_decision=boom"
    bad = subprocess.run([sys.executable, "-c", "import txmgr.failpoints"], env=env,
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    assert "crash, raise or sleep" in bad.stderr

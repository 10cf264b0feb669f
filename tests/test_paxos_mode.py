"""Paxos mode wired into txmgr: TransactionManager(log=PaxosLog([...])) and recovery.

Real servers throughout: two participant databases (a bank, see support.py)
and three log databases migrated with ``txmgr.migrate`` (revision 0003 holds
the acceptor tables). A log database is down when the FaultProxy in front of
it is stopped; a coordinator crashes in a subprocess at a failpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import txmgr
from ops_support import DaemonProcess, metric, prepare_branch, wait_for
from support import KILLED_COORDINATOR, Bank, MakeBank, query, run_coordinator, transfer
from txmgr.failpoints import CRASH_EXIT
from txmgr.log import SCHEMA_REVISION
from txmgr.paxos import PAXOS_GID_PREFIX
from txmgr.paxos._log import paxos_gid
from txmgr.testing import Server
from txmgr.testing.proxy import FaultProxy
from txmgr.testing.pytest_plugin import MakeDatabase


@pytest.fixture
def acceptors(make_database: MakeDatabase, pg_servers: list[Server]) -> list[str]:
    """Three log databases, spread over the session's servers, migrated to head."""
    dsns = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    for dsn in dsns:
        txmgr.migrate(dsn)
    return dsns


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    made: list[FaultProxy] = []
    yield made
    for p in made:
        p.stop()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Managers and logs to close before the databases are dropped."""
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        thing.close()


def proxied(proxies: list[FaultProxy], dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    proxy = FaultProxy(str(params["host"]), int(str(params["port"]))).start()
    proxies.append(proxy)
    return proxy.dsn(dsn)


def paxos_log(closing: list[Any], dsns: list[str]) -> txmgr.PaxosLog:
    log = txmgr.PaxosLog(dsns, connect_timeout=5)
    closing.append(log)
    return log


def manager(closing: list[Any], bank: Bank, dsns: list[str]) -> txmgr.TransactionManager:
    tm = txmgr.TransactionManager(bank.dsns, log=txmgr.PaxosLog(dsns, connect_timeout=5),
                                  connect_timeout=5)
    closing.append(tm)  # closes its PaxosLog too
    return tm


def run(tm: txmgr.TransactionManager, statements: dict[str, list[str]]) -> str:
    with tm.transaction() as tx:
        for name, stmts in statements.items():
            for stmt in stmts:
                tx.connection(name).execute(stmt)
    return tx.txid


def paxos_prepared(bank: Bank) -> list[str]:
    return sorted(
        r[0] for dsn in bank.dsns.values()
        for r in query(dsn, "SELECT gid FROM pg_prepared_xacts WHERE starts_with(gid, %s)",
                       (PAXOS_GID_PREFIX,))
    )


def slot_txids(log: txmgr.PaxosLog) -> set[str]:
    return {t for st in log.slots() for t in st.slots}


def crash_at(bank: Bank, dsns: list[str], failpoint: str,
             statements: dict[str, list[str]]) -> str:
    """A coordinator subprocess with a Paxos log, ended by a ``crash`` failpoint; its txid."""
    spec = {"participants": bank.dsns, "log": {"paxos": dsns}, "statements": statements,
            "failpoint": failpoint}
    return run_coordinator(KILLED_COORDINATOR, spec, exit_code=CRASH_EXIT, timeout=120)


def recover(bank: Bank, closing: list[Any], dsns: list[str]) -> txmgr.RecoveryReport:
    config = txmgr.Config(participants=bank.dsns, log=paxos_log(closing, dsns))
    # Grace 0: the coordinator is known dead, recovery may decide at once.
    recoverer = txmgr.Recoverer(config, paxos_grace=0)
    try:
        return recoverer.run_pass()
    finally:
        recoverer.close()


# -- commits -------------------------------------------------------------------------


def test_a_transfer_commits_through_paxos(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]
) -> None:
    bank = make_bank()
    tm = manager(closing, bank, acceptors)
    observer = paxos_log(closing, acceptors)
    txid = run(tm, transfer(30, "a", "b"))
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)
    assert bank.total() == bank.expected_total
    assert paxos_prepared(bank) == []
    out = observer.slots([txid])
    assert sum(1 for st in out if txid in st.slots and st.slots[txid].holds_commit) >= 2
    # One writer: one-phase commit, the log databases are not asked at all.
    single = run(tm, {"a": ["UPDATE accounts SET balance = balance + 1 WHERE id = 2"]})
    assert bank.balance("a", 2) == 1001
    assert single not in slot_txids(observer)
    tm.close()  # deletes the finished transaction's slots
    assert txid not in slot_txids(observer)


class SeenTxids(txmgr.Hooks):
    """Records the txid each hook is given; ``after_vote`` fails on request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.fail_after_vote = False

    def after_vote(self, txid: str, writers: list[str]) -> None:
        self.seen.append(("after_vote", txid))
        if self.fail_after_vote:
            raise RuntimeError("after_vote says no")

    def before_decision(self, txid: str, lxid: int) -> None:
        self.seen.append(("before_decision", txid))


def test_commit_gives_the_transaction_its_registered_txid(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]
) -> None:
    bank = make_bank()
    hooks = SeenTxids()
    tm = txmgr.TransactionManager(bank.dsns, log=txmgr.PaxosLog(acceptors, connect_timeout=5),
                                  connect_timeout=5, hooks=hooks)
    closing.append(tm)
    observer = paxos_log(closing, acceptors)
    with tm.transaction() as tx:
        provisional = tx.txid
        for name, stmts in transfer(10, "a", "b").items():
            for stmt in stmts:
                tx.connection(name).execute(stmt)
    # The hooks, the transaction and the log databases agree on the final txid.
    assert hooks.seen == [("after_vote", tx.txid), ("before_decision", tx.txid)]
    assert tx.txid != provisional and provisional not in slot_txids(observer)
    assert sum(1 for st in observer.slots([tx.txid]) if st.slots[tx.txid].holds_commit) >= 2
    # A hook failing after registration: aborted, and its registration is
    # deleted by the next decision (nothing was proposed for it).
    hooks.fail_after_vote = True
    with pytest.raises(txmgr.TransactionAborted, match="after_vote hook failed"):
        run(tm, transfer(10, "a", "b"))
    failed = hooks.seen[-1][1]
    assert failed in slot_txids(observer)
    hooks.fail_after_vote = False
    run(tm, transfer(10, "a", "b"))
    # Gone from the majority the next decision went to; the third log
    # database gets the deletion with a later statement, or on close().
    assert sum(1 for st in observer.slots([failed]) if failed in st.slots) <= 1
    assert (bank.balance("a"), bank.balance("b")) == (980, 1020)
    assert paxos_prepared(bank) == []
    tm.close()
    assert failed not in slot_txids(observer)


def test_a_failed_prepare_aborts_and_leaves_nothing(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]
) -> None:
    bank = make_bank()
    # A deferred unique constraint is checked by PREPARE TRANSACTION: b votes no.
    query(bank.dsns["b"], "CREATE TABLE once (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    tm = manager(closing, bank, acceptors)
    statements = transfer(30, "a", "b")
    statements["b"] += ["INSERT INTO once VALUES (1), (1)"]
    with pytest.raises(txmgr.TransactionAborted, match="could not prepare"):
        run(tm, statements)
    assert (bank.balance("a"), bank.balance("b")) == (1000, 1000)
    assert paxos_prepared(bank) == []


def test_one_log_database_down_commits_continue(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy]
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]
    tm = manager(closing, bank, dsns)
    run(tm, transfer(10, "a", "b"))
    proxies[0].stop()  # down: connections refused, open ones gone
    for _ in range(3):
        run(tm, transfer(10, "a", "b"))
    assert (bank.balance("a"), bank.balance("b")) == (960, 1040)
    assert paxos_prepared(bank) == []


def test_two_log_databases_down_abort_with_nothing_prepared(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy]
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], proxied(proxies, acceptors[1]), proxied(proxies, acceptors[2])]
    tm = manager(closing, bank, dsns)
    run(tm, transfer(10, "a", "b"))
    for p in proxies:
        p.stop()
    with pytest.raises(txmgr.TransactionAborted, match="Paxos log") as caught:
        run(tm, transfer(10, "a", "b"))
    assert isinstance(caught.value.__cause__, txmgr.LogQuorumUnavailable)
    assert (bank.balance("a"), bank.balance("b")) == (990, 1010)
    assert paxos_prepared(bank) == []


# -- a crashed coordinator, and recovery -------------------------------------------------


#: Every failpoint of a two-phase commit, and what recovery must make of a crash there.
EVERY_STEP = [("before_vote", 0), ("before_prepare", 0), ("after_prepare", 0),
              ("before_decision", 0), ("after_decision", 30), ("before_commit_prepared", 30),
              ("after_commit_prepared", 30), ("before_cleanup", 30)]


#: With every log database up, the steps where the log's state differs (the
#: others are the same code path with one more answer).
SOME_STEPS = [("before_prepare", 0), ("before_decision", 0), ("after_decision", 30),
              ("after_commit_prepared", 30)]


@pytest.mark.parametrize(("failpoint", "moved", "down"),
                         [(f, m, True) for f, m in EVERY_STEP]
                         + [(f, m, False) for f, m in SOME_STEPS])
def test_a_coordinator_killed_at_every_step_is_finished_as_decided(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
    failpoint: str, moved: int, down: bool,
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]
    if down:  # down for the coordinator and for recovery alike
        proxies[0].stop()
    txid = crash_at(bank, dsns, failpoint, transfer(30, "a", "b"))
    report = recover(bank, closing, dsns)
    assert report.ok, report.errors
    assert paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (1000 - moved, 1000 + moved)
    assert bank.total() == bank.expected_total
    # Its slots are gone from every log database that answers.
    assert txid not in slot_txids(paxos_log(closing, dsns))
    assert recover(bank, closing, dsns).resolutions == []  # nothing left to do


def test_a_commit_chosen_while_recovery_lists_the_branches_keeps_its_slots(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the torture test (two transfers at once per client). Recovery
    lists the participants one after another, then asks the log. A coordinator
    may prepare its last branch after that branch's participant was listed and
    have commit chosen before the log is asked: recovery then learns commit and
    finishes the one branch it saw — and must not take the transaction for
    finished and delete its slots, or the branch it did not see would later be
    rolled back as forgotten."""
    bank = make_bank()
    coordinator = paxos_log(closing, acceptors)
    txid, voters = coordinator.take()
    gids = {p: paxos_gid(txid, voters, p) for p in ("a", "b")}
    prepare_branch(bank.dsns["b"], gids["b"],
                   ["UPDATE accounts SET balance = balance + 30 WHERE id = 1"])
    recovery_log = paxos_log(closing, acceptors)
    learn = recovery_log.learn

    def racing_learn(found: dict[str, Any]) -> dict[str, Any]:
        # Between recovery's listing and its question to the log, the
        # coordinator prepares "a" and has commit chosen.
        assert sorted(found) == [txid]
        prepare_branch(bank.dsns["a"], gids["a"],
                       ["UPDATE accounts SET balance = balance - 30 WHERE id = 1"])
        assert coordinator.propose_commit(txid, voters, ["a", "b"]).commits
        return learn(found)

    monkeypatch.setattr(recovery_log, "learn", racing_learn)
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns, log=recovery_log),
                                paxos_grace=0)
    try:
        first = recoverer.run_pass()
        assert first.committed == 1 and bank.balance("b") == 1030
        assert txid in slot_txids(coordinator)  # "a" is prepared: the slots stay
        monkeypatch.setattr(recovery_log, "learn", learn)
        second = recoverer.run_pass()
    finally:
        recoverer.close()
    assert (second.committed, second.rolled_back) == (1, 0)
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)
    assert paxos_prepared(bank) == []
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns, log=recovery_log),
                                paxos_grace=0)
    try:
        recoverer.run_pass()  # now the slots go: nothing is prepared any more
    finally:
        recoverer.close()
    assert txid not in slot_txids(coordinator)


def test_a_commit_hidden_by_a_log_database_down_is_finished_without_waiting(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]
    # Ballot 0 reaches the second and third log databases (the first decision of
    # a PaxosLog takes the second turn); then the third goes down. A read of
    # the other two cannot tell commit was chosen: one accepted it, one did not.
    txid = crash_at(bank, dsns, "after_decision", transfer(30, "a", "b"))
    proxies[0].stop()
    log = paxos_log(closing, dsns)
    assert log.learn({txid: voters_of(bank, txid)})[txid].decision == "undecided"
    # Recovery with the default grace (a minute) finishes it now: a commit was
    # proposed, so the coordinator is past waiting for, and phase 1 finds it.
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                             log=paxos_log(closing, dsns)))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    assert report.committed == 2 and paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)


def voters_of(bank: Bank, txid: str) -> Any:
    from txmgr.paxos import PaxosGid
    gids = [PaxosGid.parse(g) for g in paxos_prepared(bank)]
    return next(g.voters for g in gids if g is not None and g.txid == txid)


def test_two_log_databases_down_hold_an_in_doubt_transaction_until_one_returns(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
) -> None:
    bank = make_bank()
    dsns = [proxied(proxies, acceptors[0]), proxied(proxies, acceptors[1]), acceptors[2]]
    crash_at(bank, dsns, "after_decision", transfer(30, "a", "b"))
    assert len(paxos_prepared(bank)) == 2
    # Two go down: every statement sent to them is lost.
    rules = [p.add_rule(r"EXECUTE", "drop_before", times=None) for p in proxies[:2]]
    # No majority: recovery may not guess, and changes nothing.
    stuck = recover(bank, closing, dsns)
    assert stuck.committed == stuck.rolled_back == 0
    assert len(paxos_prepared(bank)) == 2
    assert {r.outcome for r in stuck.resolutions} == {"in progress"}
    assert (bank.balance("a"), bank.balance("b")) == (1000, 1000)
    # One returns: a majority again, and the decision (commit) is finished.
    proxies[1].remove_rule(rules[1])
    report = recover(bank, closing, dsns)
    assert report.committed == 2 and paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)


def test_config_from_toml_in_paxos_mode(tmp_path: Any, acceptors: list[str],
                                        closing: list[Any]) -> None:
    path = tmp_path / "txmgr.toml"
    path.write_text(
        "[log]\nmode = \"paxos\"\ndsns = " + json.dumps(acceptors) + "\n"
        "[participants]\na = \"postgresql://u@h/a\"\n"
    )
    config = txmgr.Config.from_file(path)
    log = config.paxos_log
    assert isinstance(log, txmgr.PaxosLog) and log.dsns == tuple(acceptors)
    closing.append(log)
    assert config.log_participant is None
    with pytest.raises(txmgr.ConfigError, match="Paxos log"):
        _ = config.log_dsn
    path.write_text("[log]\nmode = \"paxos\"\ndsn = \"postgresql://u@h/x\"\n"
                    "[participants]\na = \"postgresql://u@h/a\"\n")
    with pytest.raises(txmgr.ConfigError, match="needs dsns"):
        txmgr.Config.from_file(path)
    path.write_text("[log]\nmode = \"paxos\"\ndsns = [\"postgresql://u@h/x\"]\n"
                    "[participants]\na = \"postgresql://u@h/a\"\n")
    with pytest.raises(txmgr.ConfigError, match="odd number"):
        txmgr.Config.from_file(path)


def test_cli_migrates_every_log_database_and_recovers(
    tmp_path: Any, make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server],
    closing: list[Any],
) -> None:
    bank = make_bank()
    dsns = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    path = tmp_path / "txmgr.toml"
    path.write_text(
        "[log]\nmode = \"paxos\"\ndsns = " + json.dumps(dsns) + "\n[participants]\n"
        + "".join(f"{name} = {json.dumps(dsn)}\n" for name, dsn in bank.dsns.items())
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "txmgr.cli", *args, "--config", str(path)],
                              capture_output=True, text=True, timeout=120, check=False)

    migrated = cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.count(f"migrated from empty to {SCHEMA_REVISION}") == 3
    paxos_log(closing, dsns).check()  # every log database has the acceptor tables
    crash_at(bank, dsns, "after_decision", transfer(30, "a", "b"))
    recovered = cli("recover")
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stdout.strip().splitlines()[-1].startswith("committed=2 rolled_back=0")
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)


def test_recovery_deletes_a_registration_nothing_was_prepared_for(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]
) -> None:
    bank = make_bank()
    observer = paxos_log(closing, acceptors)
    coordinator = paxos_log(closing, acceptors)
    txid = "0123456789abcdef"
    coordinator.begin(txid)  # registered, nothing prepared yet
    config = txmgr.Config(participants=bank.dsns, log=paxos_log(closing, acceptors))
    patient = txmgr.Recoverer(config, paxos_grace=3600)
    try:
        report = patient.run_pass()  # its coordinator is alive: left alone
        assert txid in slot_txids(observer)
        coordinator.beacon.close()  # the coordinator dies: its liveness locks end
        report = patient.run_pass()  # gone: its registration goes at once, grace or not
    finally:
        patient.close()
    assert report.ok, report.errors
    assert txid not in slot_txids(observer)


# -- txmgr daemon and txmgr status ---------------------------------------------------------


def paxos_config(path: Path, bank: Bank, dsns: list[str]) -> Path:
    path.write_text(
        "[log]\nmode = \"paxos\"\ndsns = " + json.dumps(dsns) + "\n[participants]\n"
        + "".join(f"{name} = {json.dumps(dsn)}\n" for name, dsn in bank.dsns.items())
    )
    return path


def test_daemon_finishes_a_crashed_coordinator_with_one_log_database_down(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str], proxies: list[FaultProxy]
) -> None:
    bank = make_bank()
    down = proxied(proxies, acceptors[0])
    # The first log database is down: the recovery lock goes to the next one.
    dsns = [down, acceptors[1], acceptors[2]]
    crash_at(bank, dsns, "after_decision", transfer(30, "a", "b"))
    assert len(paxos_prepared(bank)) == 2
    proxies[0].stop()
    config = paxos_config(tmp_path / "txmgr.toml", bank, dsns)
    d = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        active = d.wait_event("active")
        # The lock is on the first log database that answers: the second one.
        assert active["logid"] == query(acceptors[1], "SELECT logid FROM txmgr_log_meta")[0][0]
        wait_for(lambda: not paxos_prepared(bank), 30, "the daemon to finish the branches")
        assert (bank.balance("a"), bank.balance("b")) == (970, 1030)
        samples = d.scrape()
        assert metric(samples, "txmgr_daemon_active") == 1
        assert metric(samples, "txmgr_participant_up", participant="a") == 1
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0, d.log_file.read_text()
    finally:
        d.kill()
    assert d.find("stopped"), d.log_file.read_text()
    assert not d.find("error"), d.log_file.read_text()  # no step failed


def test_status_json_shows_the_decision_and_every_acceptor(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str], proxies: list[FaultProxy]
) -> None:
    bank = make_bank()
    dsns = [proxied(proxies, acceptors[0]), acceptors[1], acceptors[2]]
    undecided = crash_at(bank, dsns, "before_decision", transfer(10, "a", "b"))
    # Ballot 0 goes to a majority, the second and third log databases here
    # (the first decision of a PaxosLog takes the second turn of three).
    committed = crash_at(bank, dsns, "after_decision", transfer(20, "a", "b", 2))
    proxies[0].stop()  # one log database down: a majority still answers
    config = paxos_config(tmp_path / "txmgr.toml", bank, dsns)

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "txmgr.cli", "status", "--json", "--config", str(config),
             *args], capture_output=True, text=True, timeout=120, check=False)

    done = status()
    assert done.returncode == 0, (done.stdout, done.stderr)
    doc = json.loads(done.stdout)
    assert doc["mode"] == "paxos" and doc["ok"] is True and doc["log_error"] is None
    verdicts = {(b["participant"], b["txid"]): b["decision"] for b in doc["branches"]}
    assert verdicts == {("a", undecided): "undecided", ("b", undecided): "undecided",
                        ("a", committed): "commit", ("b", committed): "commit"}
    assert all(b["gid"].startswith(PAXOS_GID_PREFIX) for b in doc["branches"])
    txs = {t["txid"]: t for t in doc["paxos"]["transactions"]}
    assert set(txs) == {undecided, committed}
    assert (txs[undecided]["learned"], txs[committed]["learned"]) == ("undecided", "commit")
    for t in txs.values():
        views = t["acceptors"]
        assert [v["error"] is None for v in views] == [False, True, True]  # the proxied one
        assert all(v["voter"] and v["has_slot"] for v in views[1:])
    assert all(v["accepted_value"] is None for v in txs[undecided]["acceptors"])
    assert any(v["accepted_value"] == "commit(a,b)" and v["accepted_ballot"] == 0
               for v in txs[committed]["acceptors"])
    slot_counts = doc["paxos"]["acceptors"]
    assert list(slot_counts.values()) == [None, 2, 2]
    table = subprocess.run(
        [sys.executable, "-m", "txmgr.cli", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False)
    assert table.returncode == 0, table.stderr
    assert f"paxos transaction {undecided}: undecided" in table.stdout
    assert f"paxos transaction {committed}: commit" in table.stdout
    assert table.stdout.count("DOWN: ") == 2, table.stdout
    stuck = status("--older-than", "0")
    assert stuck.returncode == 1, stuck.stdout
    assert json.loads(stuck.stdout)["stuck"] == 4


def test_a_recoverer_that_does_not_know_a_participant_keeps_the_slots(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],
) -> None:
    """Issue 15, finding 1: a commit over a, b, c; its coordinator died after
    COMMIT PREPARED on a and b. A recoverer configured with a and b only (another
    application sharing the log databases) must keep the slots, which name c, or
    a recoverer that knows c would find no record and roll c back."""
    bank = make_bank(names=("a", "b", "c"))
    coordinator = paxos_log(closing, acceptors)  # an observer of the slots
    # The coordinator commits a and b (in that order), then is SIGKILLed
    # before the COMMIT PREPARED of c.
    spec = {"participants": bank.dsns, "log": {"paxos": acceptors},
            "statements": {"a": ["UPDATE accounts SET balance = balance - 20 WHERE id = 1"],
                           "b": ["UPDATE accounts SET balance = balance + 10 WHERE id = 1"],
                           "c": ["UPDATE accounts SET balance = balance + 10 WHERE id = 1"]},
            "kill_at": "after_commit_prepared", "commits": 2}
    txid = run_coordinator(KILLED_COORDINATOR, spec, exit_code=-9, timeout=120)
    assert (bank.balance("a"), bank.balance("b")) == (980, 1010)
    left = [name for name, dsn in bank.dsns.items()
            for _ in query(dsn, "SELECT 1 FROM pg_prepared_xacts WHERE starts_with(gid, %s) "
                                "AND database = current_database()", (PAXOS_GID_PREFIX,))]
    assert left == ["c"]

    partial = {p: bank.dsns[p] for p in ("a", "b")}
    other_app = txmgr.Recoverer(txmgr.Config(participants=partial,
                                             log=paxos_log(closing, acceptors)),
                                paxos_grace=0)
    try:
        first = other_app.run_pass()
    finally:
        other_app.close()
    assert txid in slot_txids(coordinator)  # c is not known here: the slots stay
    assert first.decisions_deleted == 0 and first.decisions_pending >= 1
    assert any("c" in line and txid in line for line in first.kept), first.kept

    full = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                        log=paxos_log(closing, acceptors)), paxos_grace=0)
    try:
        second = full.run_pass()
        assert (second.committed, second.rolled_back) == (1, 0)
        full.run_pass()  # every branch finished: the slots go now
    finally:
        full.close()
    assert (bank.balance("a"), bank.balance("b"), bank.balance("c")) == (980, 1010, 1010)
    assert paxos_prepared(bank) == []
    assert txid not in slot_txids(coordinator)


# -- the coordinator's liveness sign (txmgr.paxos._beacon) -----------------------------


def test_a_dead_coordinators_transactions_are_rolled_back_on_the_next_pass(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
) -> None:
    """Issue 16: coordinators SIGKILLed (a crash failpoint: os._exit) with their
    branches prepared and nothing proposed, one of three log databases down.
    Recovery with the default grace (the log idle timeout, a minute) rolls them
    back on its first pass: their coordinators' liveness locks are free on a
    majority. A live coordinator's transaction at the same stage is left alone."""
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]
    proxies[0].stop()
    dead = {crash_at(bank, dsns, "before_decision", transfer(10 * i, "a", "b", account=i))
            for i in (1, 2)}
    live = paxos_log(closing, dsns)
    txid, voters = live.take()
    gids = {p: paxos_gid(txid, voters, p) for p in ("a", "b")}
    prepare_branch(bank.dsns["a"], gids["a"],
                   ["UPDATE accounts SET balance = balance - 30 WHERE id = 3"])
    prepare_branch(bank.dsns["b"], gids["b"],
                   ["UPDATE accounts SET balance = balance + 30 WHERE id = 3"])
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                             log=paxos_log(closing, dsns)))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    by_txid: dict[str, set[str]] = {}
    for r in report.resolutions:
        by_txid.setdefault(r.txid, set()).add(r.outcome)
    assert {t: by_txid.get(t) for t in dead} == {t: {"rolled back"} for t in dead}, \
        report.resolutions
    assert by_txid[txid] == {"in progress"}
    assert sorted(paxos_prepared(bank)) == sorted(gids.values())
    # The live coordinator finishes its own transaction.
    assert live.propose_commit(txid, voters, ["a", "b"]).commits
    for p in ("a", "b"):
        query(bank.dsns[p], sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gids[p])))
    assert (bank.balance("a", 3), bank.balance("b", 3)) == (970, 1030)
    assert (bank.balance("a", 1), bank.balance("a", 2)) == (1000, 1000)
    assert bank.total() == bank.expected_total


def test_recovery_never_preempts_a_live_coordinator_whose_commit_reached_a_minority(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15, finding 7: a healthy coordinator's ballot 0 has reached one log
    database, which then goes down; the coordinator is still waiting for the
    others. Recovery saw the commit in its scan and used to run phase 1 at once:
    the two remaining databases promised, abort was chosen, and the live
    coordinator lost its transaction. Now its liveness lock (held on the two
    remaining databases) keeps recovery off, and the coordinator commits."""
    from txmgr.paxos._acceptor import accept_query
    from txmgr.paxos._core import BALLOT0, Value
    from txmgr.paxos._round import run_round

    bank = make_bank()
    dsns = [proxied(proxies, acceptors[0]), acceptors[1], acceptors[2]]
    coordinator = paxos_log(closing, dsns)
    txid, voters = coordinator.take()
    gids = {p: paxos_gid(txid, voters, p) for p in ("a", "b")}
    for p, delta in (("a", -30), ("b", 30)):
        prepare_branch(bank.dsns[p], gids[p],
                       [f"UPDATE accounts SET balance = balance + {delta} WHERE id = 1"])
    # The coordinator's ballot 0 reaches the first log database only (so far).
    [(_, answer)] = run_round(coordinator, accept_query(txid, BALLOT0, Value.commit(["a", "b"])),
                              enough=lambda answers: bool(answers),
                              only=[coordinator.links[0]])
    assert not isinstance(answer, str) and answer.replies[txid].status == "ok"

    recovery_log = paxos_log(closing, dsns)
    learn = recovery_log.learn

    def learn_then_lose_the_first(found: dict[str, Any]) -> dict[str, Any]:
        out = learn(found)  # one commit of three: not chosen, undecided
        proxies[0].stop()  # and the database that holds it goes down
        return out

    monkeypatch.setattr(recovery_log, "learn", learn_then_lose_the_first)
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns, log=recovery_log))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    assert (report.committed, report.rolled_back) == (0, 0), report.resolutions
    assert report.in_progress == 2
    assert "alive" in report.resolutions[0].detail
    # The coordinator goes on: the two remaining databases accept its ballot 0.
    assert coordinator.propose_commit(txid, voters, ["a", "b"]).commits


def test_a_hung_coordinator_loses_its_liveness_lock_after_the_beacon_timeout(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],
) -> None:
    """A coordinator that stops running (here: its beacon thread is stopped, as
    in a SIGSTOPped process) no longer touches its beacons: each log database
    ends them after ``beacon_timeout`` (idle_in_transaction_session_timeout,
    set inside the beacon's transaction), and recovery then decides."""
    bank = make_bank()
    hung = txmgr.PaxosLog(acceptors, connect_timeout=5, beacon_timeout=1)
    closing.append(hung)
    txid, voters = hung.take()
    gids = {p: paxos_gid(txid, voters, p) for p in ("a", "b")}
    for p in ("a", "b"):
        prepare_branch(bank.dsns[p], gids[p],
                       ["UPDATE accounts SET balance = balance WHERE id = 1"])
    observer = paxos_log(closing, acceptors)
    assert all(st.alive.get(txid) is True for st in observer.slots([txid]))
    hung.beacon._stop.set()  # the process stops running
    wait_for(lambda: all(st.alive.get(txid) is False for st in observer.slots([txid])),
             what="every log database to end the hung coordinator's beacon")
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                             log=paxos_log(closing, acceptors)))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    assert (report.committed, report.rolled_back) == (0, 2), report.resolutions
    # The coordinator comes back: its ballot 0 is refused (the slots went with
    # the rolled-back branches), it learns that commit can never be chosen.
    assert hung.propose_commit(txid, voters, ["a", "b"]).rolls_back


def test_a_silent_log_database_does_not_end_the_beacons_on_the_others(
    acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
) -> None:
    """One log database stops answering (its proxy swallows the beacon's touch: a
    host that still acknowledges TCP). Its beacon ends there; the beacons on the
    other two must still be touched, so the coordinator stays alive. (One thread
    used to touch every beacon in turn: it hung on the silent database, every
    beacon expired after beacon_timeout, and recovery aborted the live
    coordinator's transactions, as the Paxos torture showed.)"""
    coordinator = txmgr.PaxosLog([proxied(proxies, acceptors[0]), *acceptors[1:]],
                                 connect_timeout=5, beacon_timeout=1)
    closing.append(coordinator)
    txid, _ = coordinator.take()
    observer = paxos_log(closing, acceptors)

    def alive() -> list[bool | None]:
        return [st.alive.get(txid) for st in observer.slots([txid])]

    assert alive() == [True, True, True]
    proxies[0].add_rule(r"^SELECT 1$", "blackhole", times=None)
    wait_for(lambda: alive()[0] is False, what="the silent database to end its beacon")
    # Three beacon timeouts more: the other two stay held throughout.
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        assert alive()[1:] == [True, True]
    proxies[0].drop_all()  # the stuck touch ends; the thread closes that beacon


def test_a_transaction_its_live_coordinator_gave_up_is_decided_by_recovery(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], proxies: list[FaultProxy],
) -> None:
    """A coordinator that raises OutcomeUnknown (its commit did not reach a
    majority) lives on, but no longer drives that transaction: it retires its
    liveness key (txmgr.paxos._beacon), so recovery decides the transaction on
    its next pass instead of waiting for the process to exit."""
    bank = make_bank()
    dsns = [acceptors[0], proxied(proxies, acceptors[1]), proxied(proxies, acceptors[2])]
    rules = [(p, p.add_rule(r'EXECUTE "txmgr_paxos_accept', "blackhole", times=None))
             for p in proxies]
    tm = txmgr.TransactionManager(bank.dsns, log=txmgr.PaxosLog(dsns, connect_timeout=2),
                                  connect_timeout=5)
    closing.append(tm)
    with pytest.raises(txmgr.OutcomeUnknown):
        run(tm, transfer(30, "a", "b"))
    assert len(paxos_prepared(bank)) == 2
    for p, rule in rules:
        p.remove_rule(rule)
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                             log=paxos_log(closing, dsns)))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    assert report.committed + report.rolled_back == 2, report.resolutions
    assert paxos_prepared(bank) == []
    assert bank.total() == bank.expected_total
    # The manager goes on under a new key.
    run(tm, transfer(5, "b", "a", account=2))
    assert (bank.balance("a", 2), bank.balance("b", 2)) == (1005, 995)

"""The failure matrix: coordinators killed with SIGKILL, servers crashed and restarted.

Each test ends with a recovery pass and checks the required end state: every
branch committed or none, nothing left prepared, no decision row left over.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, RecoveryLoop, own_server, query, transfer
from txmgr.hooks import Hooks
from txmgr.testing import PgServer

pytestmark = pytest.mark.crash


def recover_until_settled(bank: Bank, timeout: float = 20.0) -> txmgr.RecoveryReport:
    """Recovery passes until no branch is "in progress" (a killed coordinator's
    decision transaction ends as soon as the log server notices the closed socket)."""
    deadline = time.monotonic() + timeout
    while True:
        report = txmgr.recover(bank.config())
        if report.in_progress == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


@pytest.mark.parametrize("kill_at", ["after_vote", "after_prepare", "before_decision"])
def test_killed_before_decision_rolls_back(bank: Bank, kill_at: str) -> None:
    bank.kill_coordinator(kill_at, transfer(100, "a", "b"))
    if kill_at == "before_decision":
        assert len(bank.prepared()) == 2  # both branches were in doubt
    report = recover_until_settled(bank)
    assert report.ok, report.errors
    assert report.committed == 0
    assert report.rolled_back == len(report.resolutions)
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []
    assert bank.decisions() == []


@pytest.mark.parametrize("kill_at", ["after_decision", "after_commit_prepared"])
def test_killed_after_decision_commits(bank: Bank, kill_at: str) -> None:
    txid = bank.kill_coordinator(kill_at, transfer(100, "a", "b"))
    assert bank.decisions() == [txid]
    left = bank.prepared()
    assert len(left) == (2 if kill_at == "after_decision" else 1)
    assert all(f"_{txid}_" in gid for gid in left)
    report = recover_until_settled(bank)
    assert report.ok, report.errors
    assert report.committed == len(left) and report.rolled_back == 0
    assert (bank.balance("a"), bank.balance("b")) == (START - 100, START + 100)
    assert bank.prepared() == []
    assert bank.decisions() == []  # the finished decision row was cleaned up


def test_killed_after_decision_with_log_inside_participant(make_bank: MakeBank) -> None:
    bank = make_bank(("a", "b", "c"), log="a")
    statements = transfer(30, "b", "c")
    statements["a"] = ["UPDATE accounts SET balance = balance + 1 WHERE id = 1"]
    bank.kill_coordinator("after_decision", statements)
    report = recover_until_settled(bank)
    assert report.committed == 2
    assert [bank.balance(n) for n in "abc"] == [START + 1, START - 30, START + 30]
    assert bank.decisions() == []


def test_killed_before_decision_with_log_inside_participant(make_bank: MakeBank) -> None:
    bank = make_bank(("a", "b", "c"), log="a")
    statements = transfer(30, "b", "c")
    statements["a"] = ["UPDATE accounts SET balance = balance + 1 WHERE id = 1"]
    bank.kill_coordinator("before_decision", statements)
    report = recover_until_settled(bank)
    assert report.rolled_back == 2
    assert [bank.balance(n) for n in "abc"] == [START] * 3


def test_recovery_ignores_foreign_prepared_transactions(bank: Bank, make_bank: MakeBank) -> None:
    # Not txmgr's at all, and a txmgr gid of another log: both left alone.
    with psycopg.connect(bank.dsns["a"]) as conn:
        conn.execute("UPDATE accounts SET balance = 1 WHERE id = 2")
        conn.execute("PREPARE TRANSACTION 'someone_elses'")
    other = make_bank()
    other_log_participants = {"a": bank.dsns["a"], "b": bank.dsns["b"]}
    other_bank = Bank(other_log_participants, other.log)
    other_bank.kill_coordinator("after_decision", transfer(5, "a", "b", account=3))
    report = txmgr.recover(bank.config())
    assert report.resolutions == [] and report.ok
    gids = [r[0] for r in query(bank.dsns["a"], "SELECT gid FROM pg_prepared_xacts "
                                                "WHERE database = current_database()")]
    assert "someone_elses" in gids and len(gids) == 2
    query(bank.dsns["a"], "ROLLBACK PREPARED 'someone_elses'")
    assert txmgr.recover(other_bank.config()).committed == 2


class Gate(Hooks):
    """Holds the coordinator before its decision until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def before_decision(self, txid: str, lxid: int) -> None:
        self.reached.set()
        assert self.release.wait(30)


def test_recovery_never_touches_a_transaction_in_flight(bank: Bank) -> None:
    gate = Gate()
    tm = bank.manager(hooks=gate)
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            with tm.transaction() as tx:
                tx.connection("a").execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                tx.connection("b").execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=commit)
    t.start()
    assert gate.reached.wait(30)
    try:
        report = txmgr.recover(bank.config())
        # Both branches are prepared and in doubt, and recovery leaves them be.
        assert [r.outcome for r in report.resolutions] == ["in progress", "in progress"]
        assert len(bank.prepared()) == 2
    finally:
        gate.release.set()
        t.join()
    assert errors == []
    assert (bank.balance("a"), bank.balance("b")) == (START - 1, START + 1)


def test_recovery_racing_many_live_commits(bank: Bank) -> None:
    tm = bank.manager(pool_max_size=4)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(25):
                with tm.transaction() as tx:
                    tx.connection("a").execute(
                        "UPDATE accounts SET balance = balance - 1 WHERE id = %s", (i,))
                    tx.connection("b").execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (i,))
        except BaseException as e:
            errors.append(e)

    with RecoveryLoop(bank.config()) as loop:
        workers = [threading.Thread(target=work, args=(i,)) for i in (1, 2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    reports = loop.reports
    assert errors == []
    assert reports, "recovery never ran"
    # Recovery may finish a branch whose decision is already committed (racing
    # the coordinator's own COMMIT PREPARED), but never rolls anything back.
    assert sum(rep.rolled_back for rep in reports) == 0
    assert all(rep.ok for rep in reports), [rep.errors for rep in reports]
    assert bank.balance("a", 1) + bank.balance("a", 2) == 2 * START - 50
    assert bank.total() == bank.expected_total
    assert bank.prepared() == []


def bank_on(make_bank: MakeBank, server: PgServer, pg_server: Any, where: str) -> Bank:
    """A bank with participant "b" (where="participant") or the log (where="log") on ``server``."""
    if where == "participant":
        return make_bank(("a", "b"), servers=[pg_server, server])
    bank = make_bank(("a", "b"), servers=[pg_server])
    log_dsn = server.create_database()
    txmgr.migrate(log_dsn)
    return Bank(bank.dsns, log_dsn)


@pytest.mark.parametrize("kill_at", ["before_decision", "after_decision"])
def test_participant_restart_keeps_prepared_branch(
    make_bank: MakeBank, crash_server: PgServer, pg_server: Any, kill_at: str
) -> None:
    bank = bank_on(make_bank, crash_server, pg_server, "participant")
    bank.kill_coordinator(kill_at, transfer(40, "a", "b"))
    assert len(bank.prepared("b")) == 1
    crash_server.crash()  # pg_ctl stop -m immediate
    crash_server.restart()
    assert len(bank.prepared("b")) == 1  # the branch survived the crash
    report = recover_until_settled(bank)
    assert report.ok, report.errors
    committed = kill_at == "after_decision"
    expected = (START - 40, START + 40) if committed else (START, START)
    assert (bank.balance("a"), bank.balance("b")) == expected
    assert bank.prepared() == []


def test_participant_down_during_recovery(
    make_bank: MakeBank, crash_server: PgServer, pg_server: Any
) -> None:
    bank = bank_on(make_bank, crash_server, pg_server, "participant")
    txid = bank.kill_coordinator("after_decision", transfer(40, "a", "b"))
    crash_server.crash()
    report = txmgr.recover(bank.config())
    assert report.unreachable == ["b"] and not report.ok
    assert report.committed == 1  # "a" is finished although "b" is down
    assert bank.decisions() == [txid]  # kept: "b" still has to commit
    crash_server.restart()
    report = txmgr.recover(bank.config())
    assert report.ok and report.committed == 1
    assert (bank.balance("a"), bank.balance("b")) == (START - 40, START + 40)
    assert bank.decisions() == []


class CrashLogBeforeDecision(Hooks):
    def __init__(self, server: PgServer) -> None:
        self.server = server

    def before_decision(self, txid: str, lxid: int) -> None:
        self.server.crash()
        self.server.restart()


def test_log_restart_while_decision_open_rolls_back(
    make_bank: MakeBank, pg_server: Any
) -> None:
    # A slow WAL writer makes it likely that the decision transaction's xid
    # never reaches the WAL, so the restarted log server hands it out again:
    # recovery must not take that other transaction's commit for ours.
    with own_server(settings={"wal_writer_delay": "10s"}) as log_server:
        bank = bank_on(make_bank, log_server, pg_server, "log")
        tm = bank.manager(hooks=CrashLogBeforeDecision(log_server))
        with pytest.raises(txmgr.TransactionAborted), tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
            tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
        gids = bank.prepared()
        # Reuse xids on the log: commit transactions until its counter passes every lxid.
        lxids = [int(g.split("_")[3]) for g in gids]
        with psycopg.connect(bank.log_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE burn (x int)")
            for _ in range(max(lxids, default=0) + 2):
                row = conn.execute("INSERT INTO burn VALUES (1) RETURNING "
                                   "pg_current_xact_id()::text::bigint").fetchone()
                assert row is not None
                if row[0] > max(lxids, default=0):
                    break
        report = recover_until_settled(bank)
        assert report.ok and report.committed == 0
        assert (bank.balance("a"), bank.balance("b")) == (START, START)
        assert bank.prepared() == []
        tm.close()


class Hang(Hooks):
    """The coordinator hangs before its decision until the log has aborted it."""

    def __init__(self, log_dsn: str) -> None:
        self.log_dsn = log_dsn

    def before_decision(self, txid: str, lxid: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the condition, not a fixed time
            status = query(self.log_dsn, "SELECT pg_xact_status(%s::text::xid8)", (lxid,))
            if status[0][0] == "aborted":
                return
            time.sleep(0.1)
        raise AssertionError("the log never aborted the idle decision transaction")


def test_coordinator_hanging_past_idle_timeout_is_aborted(bank: Bank) -> None:
    tm = bank.manager(log_idle_timeout=1.0, hooks=Hang(bank.log_dsn))
    with pytest.raises(txmgr.TransactionAborted, match="did not commit"), tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []  # the late coordinator rolled its own branches back


class DropConnectionAfterVote(Hooks):
    def __init__(self, bank: Bank) -> None:
        self.bank = bank
        self.armed = True

    def after_vote(self, txid: str, writers: list[str]) -> None:
        if not self.armed:
            return
        self.armed = False
        # Kill participant b's session: its PREPARE TRANSACTION then fails on a dead connection.
        query(self.bank.dsns["b"], "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
              "WHERE datname = current_database() AND pid <> pg_backend_pid() "
              "AND query LIKE '%%pg_current_xact_id_if_assigned%%'")


def test_connection_lost_at_prepare_rolls_back(bank: Bank) -> None:
    tm = bank.manager(hooks=DropConnectionAfterVote(bank))
    with pytest.raises(txmgr.TransactionAborted, match="could not prepare"), tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
    report = recover_until_settled(bank)
    assert report.ok
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []
    # The manager is still usable: the broken connection was discarded by the pool.
    with tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


class StopLogBeforeDecision(Hooks):
    def __init__(self, server: PgServer) -> None:
        self.server = server

    def before_decision(self, txid: str, lxid: int) -> None:
        self.server.crash()  # and it stays down


def test_log_down_at_decision_gives_outcome_unknown(
    make_bank: MakeBank, crash_server: PgServer, pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import txmgr.transaction

    monkeypatch.setattr(txmgr.transaction, "CONFIRM_PATIENCE", 0.5)
    bank = bank_on(make_bank, crash_server, pg_server, "log")
    tm = bank.manager(connect_timeout=1, hooks=StopLogBeforeDecision(crash_server))
    with pytest.raises(txmgr.OutcomeUnknown) as info, tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
    assert info.value.txid == tx.txid
    assert len(bank.prepared()) == 2  # in doubt until the log is back
    report = txmgr.recover(bank.config())
    assert not report.log_reachable and report.resolutions == []  # nothing decided blindly
    crash_server.restart()
    report = recover_until_settled(bank)
    assert report.ok and report.rolled_back == 2  # L never committed
    assert (bank.balance("a"), bank.balance("b")) == (START, START)

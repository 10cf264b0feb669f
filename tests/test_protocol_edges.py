"""Edge cases of the protocol found in review: a lost COMMIT reply raced by
recovery, a lost recovery connection, unguarded manual COMMIT, failing hooks,
backslash-quoted SQL, and a busy COMMIT PREPARED."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, own_server, query
from txmgr._gid import Gid, new_txid
from txmgr.hooks import Hooks


def move(tx: txmgr.Transaction, amount: int, src: str = "a", dst: str = "b") -> None:
    tx.connection(src).execute("UPDATE accounts SET balance = balance - %s WHERE id = 1",
                               (amount,))
    tx.connection(dst).execute("UPDATE accounts SET balance = balance + %s WHERE id = 1",
                               (amount,))


def recover_until_settled(config: txmgr.Config, timeout: float = 20.0) -> txmgr.RecoveryReport:
    deadline = time.monotonic() + timeout
    while True:
        report = txmgr.recover(config)
        if report.in_progress == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# 1. A lost COMMIT reply of L, settled by _confirm, is reported as TransactionAborted
#    when recovery has meanwhile committed every branch and deleted the decision row.


class TerminateDecisionCommit(Hooks):
    """While L's COMMIT waits for synchronous replication (already committed
    locally), terminate its backend: the coordinator loses the COMMIT reply."""

    def __init__(self, log_dsn: str) -> None:
        self.log_dsn = log_dsn
        self.thread: threading.Thread | None = None
        self.terminated = threading.Event()

    def before_decision(self, txid: str, lxid: int) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 20
            with psycopg.connect(self.log_dsn, autocommit=True) as c:
                while time.monotonic() < deadline:
                    rows = c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE wait_event = 'SyncRep' AND backend_xid::text = %s",
                        (str(lxid % 2**32),),
                    ).fetchall()
                    if rows:
                        self.terminated.set()
                        return
                    time.sleep(0.02)  # polling for a condition, not fixing a race

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()


def test_lost_commit_reply_after_recovery_finished_is_not_aborted(
    make_bank: MakeBank, pg_server: Any
) -> None:
    # The log server makes L (which SETs LOCAL synchronous_commit = on) wait for a
    # synchronous standby that never comes; everything else commits locally.
    with own_server(settings={"synchronous_standby_names": "nobody",
                            "synchronous_commit": "local"}) as log_server:
        parts = make_bank(("a", "b"), servers=[pg_server])
        log_dsn = log_server.create_database()
        txmgr.migrate(log_dsn)
        bank = Bank(parts.dsns, log_dsn)
        hooks = TerminateDecisionCommit(log_dsn)
        tm = txmgr.TransactionManager(bank.dsns, log_dsn, hooks=hooks)
        real_confirm = tm.confirm_connection

        def confirm_after_recovery() -> psycopg.Connection[Any]:
            # A recovery pass (the daemon) runs while the coordinator reconnects.
            recover_until_settled(bank.config())
            return real_confirm()

        tm.confirm_connection = confirm_after_recovery  # type: ignore[method-assign]
        try:
            outcome: BaseException | None = None
            try:
                with tm.transaction() as tx:
                    move(tx, 10)
            except BaseException as e:
                outcome = e
            assert hooks.terminated.is_set()
            # The decision committed and both branches are committed ...
            assert (bank.balance("a"), bank.balance("b")) == (START - 10, START + 10)
            assert bank.prepared() == []
            # ... so the caller must not be told "rolled back, nothing was committed".
            assert not isinstance(outcome, txmgr.TransactionAborted), outcome
        finally:
            tm.close()


# --------------------------------------------------------------------------------------
# 2. Recovery: after one COMMIT/ROLLBACK PREPARED fails with a connection error the
#    participant connection is dropped, and the next branch of that participant
#    crashes the whole pass with KeyError.


def test_recovery_pass_survives_a_lost_participant_connection(bank: Bank) -> None:
    tm = bank.manager()
    logid = tm.logid()
    with psycopg.connect(bank.log_dsn, autocommit=True) as c:
        c.execute("BEGIN")
        lxid = int(c.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]
        c.execute("ROLLBACK")  # L aborted: every branch must be rolled back
    gids = []
    for account in (1, 2, 3):
        gid = str(Gid(logid, new_txid(), lxid, "a"))
        with psycopg.connect(bank.dsns["a"], autocommit=True) as c:
            c.execute("BEGIN")
            c.execute("UPDATE accounts SET balance = 0 WHERE id = %s", (account,))
            c.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(psycopg.sql.Literal(gid)))
        gids.append(gid)

    recoverer: txmgr.Recoverer

    def kill_recovery_connection(res: txmgr.Resolution) -> None:
        pid = recoverer._conns.get("a", bank.dsns["a"]).info.backend_pid
        query(bank.dsns["a"], "SELECT pg_terminate_backend(%s)", (pid,))
        while query(bank.dsns["a"], "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
            time.sleep(0.01)  # until that backend is gone (a condition, not a delay)

    recoverer = txmgr.Recoverer(bank.config(), on_resolution=kill_recovery_connection)
    try:
        report = recoverer.run_pass()  # must not raise (it once did: KeyError)
    finally:
        recoverer.close()
    assert report.rolled_back >= 1 and report.errors
    report = txmgr.recover(bank.config())
    assert bank.prepared() == []


# --------------------------------------------------------------------------------------
# 3. A cursor constructed directly (psycopg.ClientCursor(conn)) is not guarded:
#    txmgr cannot stop its COMMIT, but it must not claim that nothing committed.


def test_manual_commit_through_client_cursor_is_reported_honestly(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.ManualTransactionControl, match="may be committed") as info:
        with tm.transaction() as tx:
            move(tx, 10)
            psycopg.ClientCursor(tx.connection("b")).execute("COMMIT")
    assert not isinstance(info.value, txmgr.TransactionAborted)
    assert "'b'" in str(info.value)
    # "a" was rolled back; "b" committed by hand, exactly as the error says.
    assert (bank.balance("a"), bank.balance("b")) == (START, START + 10)
    assert bank.prepared() == []


# --------------------------------------------------------------------------------------
# 4. A hook failing before the decision is documented as "treated like a failure at
#    that point of the protocol": the transaction should abort (TransactionAborted)
#    and roll back its prepared branches, not leave them in doubt for recovery.


class FailBeforeDecision(Hooks):
    def before_decision(self, txid: str, lxid: int) -> None:
        raise RuntimeError("hook failed")


def test_hook_failure_before_decision_aborts_cleanly(bank: Bank) -> None:
    tm = bank.manager(hooks=FailBeforeDecision())
    with pytest.raises(Exception) as info, tm.transaction() as tx:
        move(tx, 10)
    prepared_left = bank.prepared()
    assert isinstance(info.value, txmgr.TransactionAborted), repr(info.value)
    assert tx.state is txmgr.TransactionState.ROLLED_BACK, tx.state
    assert prepared_left == []


# --------------------------------------------------------------------------------------
# 5. The SQL scanner assumes standard_conforming_strings = on; a branch may turn it
#    off (a session setting), and then a COMMIT hidden after a backslash-quote passes.


def test_manual_commit_hidden_by_backslash_quote_is_refused(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.TxmgrError) as info, tm.transaction() as tx:
        move(tx, 10)
        b = tx.connection("b")
        b.execute("SET LOCAL standard_conforming_strings = off")
        b.execute("SELECT 'x\\''; COMMIT; --'")
    assert (bank.balance("a"), bank.balance("b")) == (START, START), repr(info.value)
    assert isinstance(info.value, txmgr.ManualTransactionControl), repr(info.value)


# --------------------------------------------------------------------------------------
# 6. COMMIT PREPARED answered "is busy" (55000) is taken as "committed elsewhere": the
#    coordinator forgets the txid and its next decision deletes the row while the
#    branch is still prepared, breaking the invariant the "row decides" rule rests on
#    (a branch still prepared always finds its row). Had the other session failed
#    before writing its commit record, recovery would now ROLLBACK PREPARED it.


class BusyFinisher(Hooks):
    """Just before the coordinator's COMMIT PREPARED of "b", another session (a
    recovery pass, say) is inside COMMIT PREPARED of the same gid and holds it."""

    def __init__(self, dsn_b: str) -> None:
        self.dsn_b = dsn_b
        self.gid: str | None = None
        self.holder: threading.Thread | None = None

    def before_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        if participant != "b" or self.gid is not None:
            return
        self.gid = gid

        def hold() -> None:
            with psycopg.connect(self.dsn_b, autocommit=True) as c:
                c.execute("SET synchronous_commit = on")  # waits for the absent standby
                c.execute(psycopg.sql.SQL("COMMIT PREPARED {}").format(psycopg.sql.Literal(gid)))

        self.holder = threading.Thread(target=hold, daemon=True)
        self.holder.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait for the condition, not a fixed time
            if query(self.dsn_b, "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'SyncRep'"):
                return
            time.sleep(0.02)
        raise AssertionError("the finisher never started")


def test_busy_commit_prepared_does_not_delete_the_decision_early(
    make_bank: MakeBank, pg_server: Any
) -> None:
    with own_server(settings={"synchronous_standby_names": "nobody",
                            "synchronous_commit": "local"}) as server_b:
        bank = make_bank(("a", "b"), servers=[pg_server, server_b])
        hooks = BusyFinisher(bank.dsns["b"])
        tm = bank.manager(hooks=hooks)
        try:
            with tm.transaction() as tx:
                move(tx, 10)
            first = tx.txid
            # The coordinator reports success and has forgotten the txid; the next
            # decision transaction deletes its row.
            with tm.transaction() as tx2:
                tx2.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 3")
                tx2.connection("b").execute("UPDATE accounts SET balance = 0 WHERE id = 3")
            still_prepared = [g for g in bank.prepared("b") if f"_{first}_" in g]
            rows = bank.decisions()
            assert not (still_prepared and first not in rows), (
                f"branch {still_prepared} is still prepared but decision row of {first} "
                f"was deleted: {rows}"
            )
        finally:
            query(bank.dsns["b"], "ALTER SYSTEM SET synchronous_standby_names = ''")
            query(bank.dsns["b"], "SELECT pg_reload_conf()")
            if hooks.holder is not None:
                hooks.holder.join(20)
            tm.close()


def test_stale_log_connection_is_replaced(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        move(tx, 1)
    # Every pooled log connection dies (as when the log server restarts).
    query(bank.dsns["a"], "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
          "WHERE datname = %s AND pid <> pg_backend_pid()",
          (psycopg.conninfo.conninfo_to_dict(bank.log_dsn)["dbname"],))
    with tm.transaction() as tx:
        move(tx, 2)
    assert (bank.balance("a"), bank.balance("b")) == (START - 3, START + 3)

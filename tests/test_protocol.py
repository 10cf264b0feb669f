"""Commit and rollback across real participants, without crashes."""

from __future__ import annotations

import threading

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank
from txmgr.hooks import Hooks


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def after_vote(self, txid: str, writers: list[str]) -> None:
        self.events.append(("vote", *sorted(writers)))

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        self.events.append(("prepare", participant))

    def after_decision(self, txid: str, lxid: int) -> None:
        self.events.append(("decision",))


def move(tx: txmgr.Transaction, amount: int, src: str, dst: str) -> None:
    tx.connection(src).execute("UPDATE accounts SET balance = balance - %s WHERE id = 1",
                               (amount,))
    tx.connection(dst).execute("UPDATE accounts SET balance = balance + %s WHERE id = 1",
                               (amount,))


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_commit_across_participants(make_bank: MakeBank, names: tuple[str, ...]) -> None:
    bank = make_bank(names)
    tm = bank.manager()
    with tm.transaction() as tx:
        for n in names:
            tx.connection(n).execute("UPDATE accounts SET balance = balance + 7 WHERE id = 1")
    assert tx.state is txmgr.TransactionState.COMMITTED
    assert [bank.balance(n) for n in names] == [START + 7] * len(names)
    assert bank.prepared() == []


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_exception_rolls_back_every_branch(make_bank: MakeBank, names: tuple[str, ...]) -> None:
    bank = make_bank(names)
    tm = bank.manager()
    with pytest.raises(ZeroDivisionError), tm.transaction() as tx:
        for n in names:
            tx.connection(n).execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        1 / 0
    assert tx.state is txmgr.TransactionState.ROLLED_BACK
    assert [bank.balance(n) for n in names] == [START] * len(names)
    assert bank.prepared() == []
    assert bank.decisions() == []


def test_explicit_rollback(bank: Bank) -> None:
    tm = bank.manager()
    tx = tm.transaction()
    move(tx, 50, "a", "b")
    tx.rollback()
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    with pytest.raises(txmgr.TransactionStateError, match="rolled back"):
        tx.connection("a")


def test_participant_voting_no_aborts_every_branch(bank: Bank) -> None:
    # A deferred constraint is checked at PREPARE TRANSACTION: the branch votes no.
    for dsn in bank.dsns.values():
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE uniq (k int, CONSTRAINT u UNIQUE (k) DEFERRABLE "
                      "INITIALLY DEFERRED)")
    rec = Recorder()
    tm = bank.manager(hooks=rec)
    with pytest.raises(txmgr.TransactionAborted, match="could not prepare") as info:
        with tm.transaction() as tx:
            move(tx, 10, "a", "b")
            tx.connection("b").execute("INSERT INTO uniq VALUES (1), (1)")
    assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
    assert info.value.txid == tx.txid
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []
    assert bank.decisions() == []
    assert ("decision",) not in rec.events


def test_failed_statement_inside_block_aborts(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.TransactionAborted, match="a statement failed"):
        with tm.transaction() as tx:
            move(tx, 10, "a", "b")
            try:
                tx.connection("a").execute("SELECT 1/0")
            except psycopg.errors.DivisionByZero:
                pass  # swallowed by the application: the branch is still aborted
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_single_writer_commits_in_one_phase(bank: Bank) -> None:
    rec = Recorder()
    tm = bank.manager(hooks=rec)
    with tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = 1 WHERE id = 1")
        tx.connection("b").execute("SELECT balance FROM accounts").fetchall()  # read only
    assert bank.balance("a") == 1
    assert rec.events == [("vote", "a")]  # no prepare, no decision
    assert bank.decisions() == []


def test_read_only_participant_is_not_prepared(make_bank: MakeBank) -> None:
    bank = make_bank(("a", "b", "c"))
    rec = Recorder()
    tm = bank.manager(hooks=rec)
    with tm.transaction() as tx:
        move(tx, 5, "a", "b")
        tx.connection("c").execute("SELECT sum(balance) FROM accounts").fetchone()
    assert rec.events[0] == ("vote", "a", "b")
    assert sorted(e for e in rec.events if e[0] == "prepare") == [("prepare", "a"),
                                                                  ("prepare", "b")]
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


def test_empty_transaction(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        pass
    assert tx.state is txmgr.TransactionState.COMMITTED


@pytest.mark.parametrize("writers", [("a", "b"), ("b", "c"), ("a",)])
def test_log_inside_participant(make_bank: MakeBank, writers: tuple[str, ...]) -> None:
    bank = make_bank(("a", "b", "c"), log="a")
    rec = Recorder()
    tm = bank.manager(hooks=rec)
    with tm.transaction() as tx:
        for n in writers:
            tx.connection(n).execute("UPDATE accounts SET balance = balance + 3 WHERE id = 1")
    for n in ("a", "b", "c"):
        assert bank.balance(n) == START + (3 if n in writers else 0)
    prepared = {e[1] for e in rec.events if e[0] == "prepare"}
    # "a" holds the decision: it commits in one phase and is never prepared.
    assert "a" not in prepared
    assert prepared == (set(writers) - {"a"} if len(writers) > 1 else set())
    assert bank.prepared() == []
    tm.close()
    assert bank.decisions() == []


def test_two_databases_of_one_server(make_bank: MakeBank, pg_server: object) -> None:
    bank = make_bank(("a", "b"), servers=[pg_server])
    tm = bank.manager()
    for _ in range(3):
        with tm.transaction() as tx:
            move(tx, 10, "a", "b")
    assert (bank.balance("a"), bank.balance("b")) == (START - 30, START + 30)
    assert bank.prepared() == []


def test_decision_rows_are_deleted(bank: Bank) -> None:
    tm = bank.manager()
    for _ in range(5):
        with tm.transaction() as tx:
            move(tx, 1, "a", "b")
    # Each decision transaction deletes the rows finished before it: one is left.
    assert len(bank.decisions()) == 1
    tm.close()
    assert bank.decisions() == []


def test_savepoints_inside_a_branch(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        conn = tx.connection("a")
        conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            conn.execute("SELECT 1/0")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
    assert (bank.balance("a"), bank.balance("b")) == (START - 1, START + 1)


def test_one_manager_shared_by_threads(bank: Bank) -> None:
    tm = bank.manager(pool_max_size=8)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        # Always "a" before "b": txmgr does not detect deadlocks across databases.
        delta = 1 if i % 2 else -1
        try:
            for k in range(15):
                with tm.transaction() as tx:
                    account = 1 + (i + k) % 4
                    tx.connection("a").execute(
                        "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                        (delta, account))
                    tx.connection("b").execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                        (delta, account))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert bank.total() == bank.expected_total
    assert bank.prepared() == []


def test_from_config_file(bank: Bank, tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "txmgr.toml"
    lines = ["[log]", f'dsn = "{bank.log_dsn}"', "[participants]"]
    lines += [f'{n} = "{d}"' for n, d in bank.dsns.items()]
    path.write_text("\n".join(lines) + "\n")
    tm = txmgr.TransactionManager.from_config(path)
    try:
        with tm.transaction() as tx:
            move(tx, 9, "a", "b")
    finally:
        tm.close()
    assert (bank.balance("a"), bank.balance("b")) == (START - 9, START + 9)


def test_step_timeout_from_file_and_checked(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "txmgr.toml"
    head = '[log]\ndsn = "postgresql://u@h/log"\n[participants]\na = "postgresql://u@h/a"\n'
    path.write_text(head)
    assert txmgr.Config.from_file(path).step_timeout is None  # the default: no limit
    path.write_text(head + "[pool]\nstep_timeout = 2.5\n")
    assert txmgr.Config.from_file(path).step_timeout == 2.5
    for bad in ("0", "-1"):
        path.write_text(head + f"[pool]\nstep_timeout = {bad}\n")
        with pytest.raises(txmgr.ConfigError, match="step_timeout"):
            txmgr.Config.from_file(path)
    unlimited = txmgr.Config({"a": "postgresql://u@h/a"}, "postgresql://u@h/log",
                             step_timeout=None)
    assert unlimited.step_timeout is None


def test_log_loss_only_matters_with_two_writers(bank: Bank) -> None:
    tm = bank.manager(connect_timeout=1)  # the log's absence shows within a second
    with tm.transaction() as tx:  # the manager has checked and used the log
        move(tx, 1, "a", "b")
    logdb = psycopg.conninfo.conninfo_to_dict(bank.log_dsn)["dbname"]
    with psycopg.connect(bank.dsns["a"], autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
            psycopg.sql.Identifier(str(logdb))))
    # One writer and one reader: one-phase commit, the log is not needed.
    with tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 2")
        tx.connection("b").execute("SELECT 1").fetchone()
    assert bank.balance("a", 2) == START - 5
    # Two writers need the decision: without the log nothing commits.
    with pytest.raises(txmgr.TransactionAborted, match="could not open the decision"):
        with tm.transaction() as tx:
            move(tx, 7, "a", "b")
    assert (bank.balance("a"), bank.balance("b")) == (START - 1, START + 1)
    assert bank.prepared() == []

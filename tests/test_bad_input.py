"""Bad input gets a typed error that says how to fix it, leaves nothing prepared
or half-committed, and never shows a password."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, own_server


def assert_untouched(bank: Bank) -> None:
    assert [bank.balance(n) for n in bank.dsns] == [START] * len(bank.dsns)
    assert bank.prepared() == []
    assert bank.decisions() == []


def test_max_prepared_transactions_zero(make_bank: MakeBank, pg_server: Any) -> None:
    with own_server(max_prepared_transactions=0) as no_2pc:
        bank = make_bank(("a", "b"), servers=[pg_server, no_2pc])
        tm = bank.manager()
        with pytest.raises(txmgr.PreparedTransactionsDisabled) as info, tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            tx.connection("b").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        message = str(info.value)
        assert "'b'" in message and "max_prepared_transactions" in message
        assert "restart" in message  # the fix
        assert info.value.participant == "b"
        assert no_2pc.password not in message
        assert_untouched(bank)
        tm.close()


def test_unknown_participant(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.UnknownParticipant, match=r"'nope'.*\['a', 'b'\]"):
        with tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            tx.connection("nope")
    assert_untouched(bank)


@pytest.mark.parametrize("name", ["Orders", "1st", "a-b", "x" * 33, "", "orders "])
def test_invalid_participant_name(bank: Bank, name: str) -> None:
    with pytest.raises(txmgr.InvalidParticipantName, match=r"\[a-z\]\[a-z0-9_\]"):
        txmgr.TransactionManager({name: bank.dsns["a"], "b": bank.dsns["b"]}, bank.log)


def with_password(dsn: str, password: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["password"] = password
    return psycopg.conninfo.make_conninfo("", **params)


def test_wrong_password_is_masked(bank: Bank) -> None:
    secret = "wr0ng-S3cret"
    dsns = dict(bank.dsns, b=with_password(bank.dsns["b"], secret))
    tm = txmgr.TransactionManager(dsns, bank.log)
    try:
        with pytest.raises(txmgr.ParticipantUnavailable) as info, tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            tx.connection("b")
    finally:
        tm.close()
    message = str(info.value)
    assert secret not in message and "password=****" in message
    assert "'b'" in message and "password" in message.lower()
    assert secret not in repr(tm)
    assert_untouched(bank)


def test_unreachable_host(bank: Bank) -> None:
    dead = "postgresql://app:hunter2@127.0.0.1:9/orders"  # port 9: nothing listens
    tm = txmgr.TransactionManager({"a": bank.dsns["a"], "dead": dead}, bank.log,
                                  connect_timeout=2)
    try:
        with pytest.raises(txmgr.ParticipantUnavailable) as info, tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            tx.connection("dead")
    finally:
        tm.close()
    assert "hunter2" not in str(info.value)
    assert "postgresql://app:****@127.0.0.1:9/orders" in str(info.value)
    assert_untouched(bank)


def test_unreachable_log(bank: Bank) -> None:
    tm = txmgr.TransactionManager(bank.dsns, "postgresql://app:hunter2@127.0.0.1:9/txlog",
                                  connect_timeout=2)
    with pytest.raises(txmgr.ParticipantUnavailable, match="cannot connect to 'log'") as info:
        tm.transaction()
    assert "hunter2" not in str(info.value)
    tm.close()


ManualEnd = Callable[[psycopg.Connection[Any]], object]
MANUAL_ENDS: dict[str, ManualEnd] = {
    "sql-commit": lambda c: c.execute("COMMIT"),
    "sql-rollback": lambda c: c.execute("rollback"),
    "sql-end-after-comment": lambda c: c.execute("/* done */ END"),
    "sql-in-multi-statement": lambda c: c.execute("SELECT 1; COMMIT"),
    "sql-prepare-transaction": lambda c: c.execute("PREPARE TRANSACTION 'mine'"),
    "cursor-commit": lambda c: c.cursor().execute("commit"),
    "method-commit": lambda c: c.commit(),
    "method-rollback": lambda c: c.rollback(),
    "autocommit": lambda c: setattr(c, "autocommit", True),
}


@pytest.mark.parametrize("how", sorted(MANUAL_ENDS))
def test_manual_transaction_control_is_refused(bank: Bank, how: str) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.ManualTransactionControl, match="not allowed"), tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        conn = tx.connection("b")
        conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        MANUAL_ENDS[how](conn)
    assert_untouched(bank)


def test_savepoint_statements_are_allowed(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        conn = tx.connection("a")
        conn.execute("SAVEPOINT s")
        conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("SELECT 'commit; rollback'")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
    assert (bank.balance("a"), bank.balance("b")) == (START, START + 1)


def test_missing_log_schema(bank: Bank, make_database: Any) -> None:
    empty_log = make_database()
    tm = txmgr.TransactionManager(bank.dsns, empty_log)
    with pytest.raises(txmgr.LogSchemaError, match="txmgr migrate"):
        tm.transaction()
    tm.close()


def test_outdated_log_schema(bank: Bank, make_database: Any) -> None:
    old_log = make_database()
    txmgr.migrate(old_log, revision="0001")
    tm = txmgr.TransactionManager(bank.dsns, old_log)
    with pytest.raises(txmgr.LogSchemaError, match=r"'0001'.*txmgr migrate"):
        tm.transaction()
    tm.close()
    txmgr.migrate(old_log)
    tm = txmgr.TransactionManager(bank.dsns, old_log)
    with tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = 1 WHERE id = 1")
    tm.close()


def test_log_neither_participant_nor_dsn(bank: Bank) -> None:
    with pytest.raises(txmgr.ConfigError, match="neither a configured participant nor a DSN"):
        txmgr.TransactionManager(bank.dsns, "txlog")


def test_use_after_commit(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        tx.connection("a").execute("SELECT 1")
    with pytest.raises(txmgr.TransactionStateError, match="'connection\\(\\)'"):
        tx.connection("a")
    with pytest.raises(txmgr.TransactionStateError, match="'commit\\(\\)'"):
        tx.commit()


def test_transaction_on_a_closed_manager(bank: Bank) -> None:
    tm = bank.manager()
    tm.close()
    with pytest.raises(txmgr.TransactionStateError, match="closed TransactionManager"):
        tm.transaction()

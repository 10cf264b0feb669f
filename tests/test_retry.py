"""txmgr.run_transaction / arun_transaction: rerun a transaction after a retryable error.

The errors come from real servers: a deadlock PostgreSQL detects between two
global transactions on one participant, a write skew under SERIALIZABLE, and
SQLSTATEs raised by PL/pgSQL (``RAISE … USING ERRCODE``) where the point is
the classification, not how the server got there. The backoff's bounds are
pure arithmetic, tested with a fake sleep and random.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from psycopg import sql

import txmgr
from support import START, Bank, MakeBank, query
from txmgr._retry import backoff_delay, is_retryable

RAISE = "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{}'; END $$"


class Sleeps:
    """A fake sleep that records what it was asked to wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_deadlock_victim_is_rerun_and_both_commit(make_bank: MakeBank) -> None:
    bank = make_bank()
    tm = bank.manager()
    both_locked = threading.Barrier(2, timeout=60)  # a guard against a hang, not a timing
    attempts = {"ab": 0, "ba": 0}
    errors: list[BaseException] = []

    def transfer(order: str) -> None:
        first, second = (1, 2) if order == "ab" else (2, 1)

        def fn(tx: txmgr.Transaction) -> None:
            attempts[order] += 1
            a = tx.connection("a")
            a.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (first,))
            if attempts[order] == 1:
                both_locked.wait()  # each holds one row: the next UPDATEs deadlock
            a.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (second,))
            tx.connection("b").execute("UPDATE accounts SET balance = balance + 0 WHERE id = 1")

        try:
            txmgr.run_transaction(tm, fn, sleep=Sleeps())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=transfer, args=(o,)) for o in ("ab", "ba")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # PostgreSQL cancelled exactly one of them (40P01); it ran again and committed.
    assert sorted(attempts.values()) == [1, 2]
    assert bank.balance("a", 1) == START and bank.balance("a", 2) == START
    assert bank.prepared() == []


def test_serialization_failure_is_rerun(make_bank: MakeBank) -> None:
    bank = make_bank()
    with psycopg.connect(bank.dsns["a"], autocommit=True) as conn:
        db = conn.execute("SELECT current_database()").fetchone()
        assert db is not None
        conn.execute(sql.SQL(
            "ALTER DATABASE {} SET default_transaction_isolation = serializable"
        ).format(sql.Identifier(db[0])))
    tm = bank.manager()
    both_read = threading.Barrier(2, timeout=60)
    first_committed = threading.Event()
    attempts = {1: 0, 2: 0}
    sleeps = {1: Sleeps(), 2: Sleeps()}
    errors: list[BaseException] = []

    def writer(account: int) -> None:
        # Write skew: each reads both rows, then moves money out of "its" row
        # only if the two together stay above a floor that both reads allow.
        def fn(tx: txmgr.Transaction) -> None:
            attempts[account] += 1
            a = tx.connection("a")
            total = a.execute("SELECT sum(balance) FROM accounts WHERE id IN (1, 2)").fetchone()
            assert total is not None
            if attempts[account] == 1:
                both_read.wait()
                if account == 2:
                    assert first_committed.wait(60)
            a.execute("UPDATE accounts SET balance = balance - 10 WHERE id = %s", (account,))
            tx.connection("b").execute(
                "UPDATE accounts SET balance = balance + 10 WHERE id = %s", (account,))

        try:
            txmgr.run_transaction(tm, fn, sleep=sleeps[account])
        except BaseException as e:
            errors.append(e)
        finally:
            if account == 1:
                first_committed.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert attempts == {1: 1, 2: 2}  # the second was the SSI victim, once
    assert len(sleeps[2].calls) == 1
    assert bank.total() == bank.expected_total
    assert bank.balance("a", 2) == START - 10 and bank.balance("b", 2) == START + 10


def test_a_failed_prepare_with_40001_is_a_retryable_abort(make_bank: MakeBank) -> None:
    """A serialization failure at PREPARE TRANSACTION (here from a deferred
    constraint trigger, which fires there) reaches the user as TransactionAborted;
    it is retryable, and run_transaction reruns it."""
    bank = make_bank()
    query(bank.dsns["a"], """
        CREATE SEQUENCE once;
        CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('once') = 1 THEN
                RAISE EXCEPTION 'injected at commit' USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER fail_once AFTER UPDATE ON accounts
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_once();
    """)
    tm = bank.manager()

    def fn(tx: txmgr.Transaction) -> int:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
        return 42

    with pytest.raises(txmgr.TransactionAborted) as info:
        with tm.transaction() as tx:
            fn(tx)
    assert info.value.retryable
    assert bank.total() == bank.expected_total
    query(bank.dsns["a"], "SELECT setval('once', 1, false)")  # fail the next attempt again
    sleeps = Sleeps()
    assert txmgr.run_transaction(tm, fn, sleep=sleeps) == 42
    assert len(sleeps.calls) == 1
    assert bank.balance("a") == START - 5 and bank.balance("b") == START + 5


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_retries_stop_after_max_attempts(bank: Bank, sqlstate: str) -> None:
    tm = bank.manager()
    sleeps = Sleeps()
    attempts = 0

    def fn(tx: txmgr.Transaction) -> None:
        nonlocal attempts
        attempts += 1
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
        tx.connection("b").execute(RAISE.format(sqlstate))

    with pytest.raises(psycopg.Error) as info:
        txmgr.run_transaction(tm, fn, max_attempts=4, sleep=sleeps, random=lambda: 1.0)
    assert info.value.sqlstate == sqlstate
    assert attempts == 4
    assert sleeps.calls == [0.05, 0.1, 0.2]
    assert "gave up after 4 attempts" in "".join(getattr(info.value, "__notes__", []))
    assert bank.balance("a") == START and bank.prepared() == []


@pytest.mark.parametrize("sqlstate", ["23514", "42P01", "57014", "55P03"])
def test_non_retryable_errors_are_raised_at_once(bank: Bank, sqlstate: str) -> None:
    """A check violation, an undefined table, and (unless asked) timeouts: one attempt."""
    tm = bank.manager()
    sleeps = Sleeps()
    attempts = 0

    def fn(tx: txmgr.Transaction) -> None:
        nonlocal attempts
        attempts += 1
        tx.connection("a").execute(RAISE.format(sqlstate))

    with pytest.raises(psycopg.Error) as info:
        txmgr.run_transaction(tm, fn, sleep=sleeps)
    assert info.value.sqlstate == sqlstate
    assert attempts == 1 and sleeps.calls == []


@pytest.mark.parametrize("sqlstate", ["57014", "55P03"])
def test_timeouts_are_rerun_when_asked(bank: Bank, sqlstate: str) -> None:
    tm = bank.manager()
    attempts = 0

    def fn(tx: txmgr.Transaction) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            tx.connection("a").execute(RAISE.format(sqlstate))
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
        return "done"

    assert txmgr.run_transaction(tm, fn, retry_timeouts=True, sleep=Sleeps()) == "done"
    assert attempts == 2 and bank.balance("a") == START - 1


def test_outcome_unknown_and_other_errors_are_never_rerun(bank: Bank) -> None:
    tm = bank.manager()
    for error in (txmgr.OutcomeUnknown("lost the log", txid="t"), ValueError("bug"),
                  txmgr.ConfigError("bad")):
        attempts = 0

        def fn(tx: txmgr.Transaction, error: Exception = error) -> None:
            nonlocal attempts
            attempts += 1
            raise error

        with pytest.raises(type(error)):
            txmgr.run_transaction(tm, fn, sleep=Sleeps(), retry_timeouts=True)
        assert attempts == 1


def test_async_rerun_after_a_deadlock_error(bank: Bank) -> None:
    attempts = 0
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def fn(tx: txmgr.AsyncTransaction) -> int:
        nonlocal attempts
        attempts += 1
        a = await tx.connection("a")
        await a.execute("UPDATE accounts SET balance = balance - 3 WHERE id = 1")
        b = await tx.connection("b")
        if attempts < 3:
            await b.execute(RAISE.format("40P01"))
        await b.execute("UPDATE accounts SET balance = balance + 3 WHERE id = 1")
        return attempts

    async def scenario() -> int:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as atm:
            return await txmgr.arun_transaction(atm, fn, sleep=fake_sleep, random=lambda: 0.5)

    assert asyncio.run(scenario()) == 3
    assert sleeps == [0.025, 0.05]
    assert bank.balance("a") == START - 3 and bank.balance("b") == START + 3


def test_async_non_retryable_raised_at_once(bank: Bank) -> None:
    attempts = 0

    async def fn(tx: txmgr.AsyncTransaction) -> None:
        nonlocal attempts
        attempts += 1
        await (await tx.connection("a")).execute(RAISE.format("23505"))

    async def never(seconds: float) -> None:
        raise AssertionError("slept")

    async def scenario() -> None:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as atm:
            await txmgr.arun_transaction(atm, fn, sleep=never)

    with pytest.raises(psycopg.errors.UniqueViolation):
        asyncio.run(scenario())
    assert attempts == 1


# -- pure logic: the backoff and the classification -------------------------------


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    top = [backoff_delay(n, initial=0.1, maximum=1.0, random=lambda: 0.999999)
           for n in range(1, 8)]
    assert top == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0], rel=1e-5)
    assert backoff_delay(5, initial=0.1, maximum=1.0, random=lambda: 0.0) == 0.0
    assert backoff_delay(3, initial=0.1, maximum=1.0, random=lambda: 0.5) == pytest.approx(0.2)
    assert backoff_delay(10_000, initial=0.1, maximum=1.0, random=lambda: 1.0) == 1.0


def test_run_transaction_checks_its_arguments(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.ConfigError, match="max_attempts"):
        txmgr.run_transaction(tm, lambda tx: None, max_attempts=0)
    with pytest.raises(txmgr.ConfigError, match="initial_delay"):
        txmgr.run_transaction(tm, lambda tx: None, initial_delay=3, max_delay=1)


def _caused_by(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


class _State(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("error", "plain", "with_timeouts"), [
    (_caused_by(txmgr.TransactionAborted("x"), _State("40001")), True, True),
    (_caused_by(txmgr.TransactionAborted("x"), _State("40P01")), True, True),
    (_caused_by(txmgr.TransactionAborted("x"), _State("23505")), False, False),
    (_caused_by(txmgr.TransactionAborted("x"), _State("57014")), False, True),
    (txmgr.TransactionAborted("no cause"), False, False),
    (txmgr.DeadlockDetected("deadlock victim"), True, True),
    (txmgr.TransactionTimeout("deadline", timeout=2.0), False, True),
    (_caused_by(txmgr.OutcomeUnknown("?"), _State("40001")), False, False),
    (_caused_by(txmgr.ParticipantUnavailable("down", participant="a"), _State("57014")),
     False, False),
    (_State("40P01"), True, True),
    (_State("55P03"), False, True),
])
def test_which_errors_are_retryable(error: Exception, plain: bool, with_timeouts: bool) -> None:
    assert is_retryable(error) is plain
    assert is_retryable(error, timeouts=with_timeouts) is with_timeouts
    if isinstance(error, txmgr.TxmgrError):
        assert error.retryable is (plain and isinstance(error, txmgr.TransactionAborted))

"""txmgr.sqlalchemy: SQLAlchemy Core and ORM on the branches of a global transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txmgr
from orm_models import Recorder
from support import START, Bank, query
from txmgr.sqlalchemy import SQLAlchemy, SQLAlchemyTransaction


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    total: Mapped[int]


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


# The same table for Core statements.
accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("balance", sa.Integer))
# Its unique constraint is checked at PREPARE TRANSACTION: the branch votes no.
uniq = sa.Table("uniq", sa.MetaData(), sa.Column("k", sa.Integer))


@pytest.fixture
def tables(bank: Bank) -> Bank:
    for dsn in bank.dsns.values():
        query(dsn, "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
        query(dsn, "CREATE TABLE uniq (k int, CONSTRAINT u UNIQUE (k) DEFERRABLE "
                   "INITIALLY DEFERRED)")
    return bank


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def db(tables: Bank, recorder: Recorder) -> SQLAlchemy:
    return SQLAlchemy(tables.manager(hooks=recorder))


def orders(bank: Bank, name: str = "a") -> list[tuple[Any, ...]]:
    return query(bank.dsns[name], "SELECT id, total FROM orders ORDER BY id")


def pay(tx: SQLAlchemyTransaction, order_id: int = 7, total: int = 40) -> None:
    """An ORM insert on "a" (left pending) and a Core update on "b"."""
    tx.session("a").add(Order(id=order_id, total=total))
    tx.connection("b").execute(
        sa.update(accounts).where(accounts.c.id == 1)
        .values(balance=accounts.c.balance - total)
    )


def assert_untouched(bank: Bank) -> None:
    assert orders(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []


# -- commit and rollback ----------------------------------------------------------


def test_orm_insert_and_core_update_commit_atomically(
    tables: Bank, db: SQLAlchemy, recorder: Recorder
) -> None:
    with db.transaction() as tx:
        pay(tx)
        session = tx.session("a")
        # add() without a query flushes nothing: the block must flush before the vote.
        assert [o.id for o in session.new] == [7]
    assert tx.state is txmgr.TransactionState.COMMITTED
    assert orders(tables) == [(7, 40)]
    assert tables.balance("b") == START - 40
    # Both branches wrote by vote time, so both were prepared (two-phase commit).
    assert recorder.writers == [["a", "b"]]
    assert sorted(recorder.prepared) == ["a", "b"]
    assert tables.prepared() == []


def test_sqlalchemy_runs_on_the_branch_connection(db: SQLAlchemy) -> None:
    with db.transaction() as tx:
        raw = tx.raw_connection("a")
        conn = tx.connection("a")
        session = tx.session("a")
        assert conn.connection.driver_connection is raw
        assert session.connection() is conn
        assert tx.connection("a") is conn and tx.session("a") is session
        raw.execute("INSERT INTO orders VALUES (1, 10)")
        # Uncommitted psycopg work is visible to the ORM: the same transaction.
        assert session.get(Order, 1) is not None
        session.add(Order(id=2, total=20))
        session.flush()
        assert raw.execute("SELECT count(*) FROM orders").fetchone() == (2,)
        txid = raw.execute("SELECT current_setting('txmgr.txid')").fetchone()
        assert txid == (tx.txid,)


def test_exception_rolls_back_every_branch(tables: Bank, db: SQLAlchemy) -> None:
    with pytest.raises(ZeroDivisionError), db.transaction() as tx:
        pay(tx)
        tx.session("a").flush()
        1 / 0
    assert tx.state is txmgr.TransactionState.ROLLED_BACK
    assert_untouched(tables)
    assert tables.decisions() == []


def test_deferred_constraint_at_prepare_aborts_every_branch(
    tables: Bank, db: SQLAlchemy, recorder: Recorder
) -> None:
    with pytest.raises(txmgr.TransactionAborted, match="could not prepare") as info:
        with db.transaction() as tx:
            pay(tx)
            tx.connection("b").execute(sa.insert(uniq), [{"k": 1}, {"k": 1}])
    assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
    assert recorder.writers == [["a", "b"]]  # the ORM insert had been flushed
    assert_untouched(tables)
    assert tables.decisions() == []


def test_failed_flush_at_block_end_aborts(tables: Bank, db: SQLAlchemy) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")
    with pytest.raises(txmgr.TransactionAborted, match="flushing the session of participant "
                                                       "'a' failed") as info:
        with db.transaction() as tx:
            pay(tx, order_id=7)  # a duplicate key, only found when the block flushes
    assert isinstance(info.value.__cause__, sa_exc.IntegrityError)
    assert orders(tables) == [(7, 1)]
    assert tables.balance("b") == START


def test_swallowed_flush_error_still_aborts(tables: Bank, db: SQLAlchemy) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")
    with pytest.raises(txmgr.TransactionAborted, match="SQLAlchemy rolled back") as info:
        with db.transaction() as tx:
            pay(tx, order_id=7)
            with pytest.raises(sa_exc.IntegrityError):  # not hidden by SQLAlchemy's cleanup
                tx.session("a").flush()
    assert isinstance(info.value.__cause__, sa_exc.IntegrityError)
    assert orders(tables) == [(7, 1)]
    assert tables.balance("b") == START


def test_savepoints_inside_a_branch(tables: Bank, db: SQLAlchemy) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")
    with db.transaction() as tx:
        session = tx.session("a")
        session.add(Order(id=8, total=80))
        with pytest.raises(sa_exc.IntegrityError), session.begin_nested():
            session.add(Order(id=7, total=2))  # duplicate: only the savepoint rolls back
        conn = tx.connection("b")
        with conn.begin_nested() as sp:
            conn.execute(sa.update(accounts).values(balance=0))
            sp.rollback()
        pay(tx, order_id=9, total=5)
    assert orders(tables) == [(7, 1), (8, 80), (9, 5)]
    assert (tables.balance("b", 1), tables.balance("b", 2)) == (START - 5, START)


def test_ddl_and_orm_updates_through_the_branch(tables: Bank, db: SQLAlchemy) -> None:
    extra = sa.Table("extra", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    with db.transaction() as tx:
        extra.create(tx.connection("a"))
        tx.connection("a").execute(sa.insert(extra).values(id=1))
        account = tx.session("b").get(Account, 2)
        assert account is not None
        account.balance -= 100  # a dirty object, flushed by the block
    assert query(tables.dsns["a"], "SELECT id FROM extra") == [(1,)]
    assert tables.balance("b", 2) == START - 100


def test_server_side_cursor_and_core_reads_in_the_branch(tables: Bank, db: SQLAlchemy) -> None:
    with db.transaction() as tx:
        session = tx.session("b")
        ids = [a.id for a in session.scalars(
            sa.select(Account).order_by(Account.id).execution_options(yield_per=2))]
        assert ids == [1, 2, 3, 4]
        # (Statement options: Connection.execution_options() would change the
        # Connection in place, for the session too.)
        streamed = tx.connection("a").execute(
            sa.select(accounts.c.balance).execution_options(stream_results=True))
        assert sum(streamed.scalars()) == 4 * START
        pay(tx)
    assert orders(tables) == [(7, 40)]


# -- ending a branch by hand is refused ------------------------------------------


def _session_commit(tx: SQLAlchemyTransaction) -> None:
    tx.session("a").commit()


def _session_rollback(tx: SQLAlchemyTransaction) -> None:
    tx.session("a").rollback()


def _session_begin(tx: SQLAlchemyTransaction) -> None:
    with tx.session("a").begin():
        pass


def _session_close(tx: SQLAlchemyTransaction) -> None:
    tx.session("a").close()


def _connection_commit(tx: SQLAlchemyTransaction) -> None:
    tx.connection("a").commit()


def _connection_rollback(tx: SQLAlchemyTransaction) -> None:
    tx.connection("a").rollback()


def _connection_close(tx: SQLAlchemyTransaction) -> None:
    tx.connection("a").close()


def _twophase(tx: SQLAlchemyTransaction) -> None:
    conn = tx.connection("a")
    with pytest.raises(txmgr.ManualTransactionControl):
        conn.rollback()  # refused, and SQLAlchemy's transaction is over: it lets us try 2PC
    conn.begin_twophase()


ENDINGS: dict[str, Callable[[SQLAlchemyTransaction], None]] = {
    "session.commit": _session_commit,
    "session.rollback": _session_rollback,
    "session.begin": _session_begin,
    "session.close": _session_close,
    "connection.commit": _connection_commit,
    "connection.rollback": _connection_rollback,
    "connection.close": _connection_close,
    "begin_twophase": _twophase,
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_ending_a_branch_by_hand_is_refused(tables: Bank, db: SQLAlchemy, ending: str) -> None:
    with pytest.raises(txmgr.ManualTransactionControl):
        with db.transaction() as tx:
            pay(tx)
            tx.session("a").flush()
            with pytest.raises(txmgr.ManualTransactionControl, match="participant 'a'"):
                ENDINGS[ending](tx)
            # Nothing reached the server: the branch is still open, uncommitted.
            raw = tx.raw_connection("a")
            assert raw.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
            assert raw.execute("SELECT count(*) FROM orders").fetchone() == (1,)
            assert orders(tables) == []
            raise txmgr.ManualTransactionControl("propagate")  # as an application would
    assert_untouched(tables)


@pytest.mark.parametrize("ending", ["session.commit", "session.rollback", "session.begin",
                                    "session.close"])
def test_swallowed_refusal_keeps_the_work_atomic(
    tables: Bank, db: SQLAlchemy, ending: str
) -> None:
    # Refused before anything happened: the work stays in the global transaction.
    with db.transaction() as tx:
        pay(tx)
        try:
            ENDINGS[ending](tx)
        except txmgr.ManualTransactionControl:
            pass
        assert orders(tables) == []
    assert orders(tables) == [(7, 40)]
    assert tables.balance("b") == START - 40


@pytest.mark.parametrize(("ending", "why"), [
    ("connection.rollback", "SQLAlchemy rolled back"),
    ("connection.close", "SQLAlchemy rolled back"),
    ("connection.commit", "commit\\(\\) was refused"),
])
def test_swallowed_sqlalchemy_rollback_aborts_everything(
    tables: Bank, db: SQLAlchemy, ending: str, why: str
) -> None:
    # SQLAlchemy believes the branch rolled back (or needs a rollback): committing
    # the rest would not be atomic.
    with pytest.raises(txmgr.TransactionAborted, match=why):
        with db.transaction() as tx:
            pay(tx)
            tx.session("a").flush()
            try:
                ENDINGS[ending](tx)
            except txmgr.ManualTransactionControl:
                pass
    assert_untouched(tables)


def test_session_as_context_manager_does_not_hide_errors(tables: Bank, db: SQLAlchemy) -> None:
    with pytest.raises(KeyError), db.transaction() as tx:
        with tx.session("a") as session:
            session.add(Order(id=1, total=1))
            raise KeyError("boom")
    assert_untouched(tables)


def test_isolation_level_change_is_refused(tables: Bank, db: SQLAlchemy) -> None:
    with pytest.raises(txmgr.TransactionAborted):
        with db.transaction() as tx:
            pay(tx)
            conn = tx.connection("a")
            with pytest.raises(sa_exc.InvalidRequestError, match="isolation_level"):
                conn.execution_options(isolation_level="AUTOCOMMIT")  # SQLAlchemy refuses
            with pytest.raises(txmgr.ManualTransactionControl):
                conn.rollback()
            # Out of SQLAlchemy's transaction, the dialect refuses.
            with pytest.raises(txmgr.TransactionStateError, match="isolation level"):
                conn.execution_options(isolation_level="AUTOCOMMIT")
            status = tx.raw_connection("a").info.transaction_status
            assert status is psycopg.pq.TransactionStatus.INTRANS
    assert_untouched(tables)


# -- engines and connections ------------------------------------------------------


def test_engine_is_reused_and_initialized_once(
    tables: Bank, db: SQLAlchemy, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.engine("a")
    initialize = engine.dialect.initialize
    calls: list[object] = []

    def counting(connection: sa.Connection) -> None:
        calls.append(connection)
        initialize(connection)

    monkeypatch.setattr(engine.dialect, "initialize", counting)
    for i in range(3):
        with db.transaction() as tx:
            pay(tx, order_id=i)
            assert tx.connection("a").engine is engine
            assert tx.session("a").get_bind() is tx.connection("a")
    assert db.engine("a") is engine
    assert len(calls) == 1
    assert engine.dialect.server_version_info is not None
    assert len(orders(tables)) == 3


def test_branch_connection_goes_back_to_txmgr_intact(tables: Bank) -> None:
    tm = tables.manager(pool_min_size=1, pool_max_size=1)  # one connection per participant
    db = SQLAlchemy(tm)
    with db.transaction() as tx:
        pay(tx, order_id=1)
        raw = tx.raw_connection("a")
        conn, session = tx.connection("a"), tx.session("a")
    assert not raw.closed
    assert raw.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
    assert conn.closed  # SQLAlchemy let go of it...
    with pytest.raises(sa_exc.ResourceClosedError):
        conn.execute(sa.text("SELECT 1"))
    # ...and txmgr hands the very same connection to the next transactions.
    with pytest.raises(RuntimeError), db.transaction() as tx2:
        assert tx2.raw_connection("a") is raw
        pay(tx2, order_id=2)
        raise RuntimeError
    with tm.transaction() as plain:
        assert plain.connection("a") is raw
        plain.connection("a").execute("INSERT INTO orders VALUES (3, 3)")
        plain.connection("b").execute("UPDATE accounts SET balance = balance + 3 WHERE id = 1")
    with db.transaction() as tx3:
        assert tx3.raw_connection("a") is raw
        pay(tx3, order_id=4, total=4)
        assert session is not tx3.session("a")
    assert orders(tables) == [(1, 40), (3, 3), (4, 4)]
    assert tables.balance("b") == START - 40 + 3 - 4


@pytest.mark.parametrize("what", ["session", "session-unused", "connection"])
def test_invalidated_connection_aborts_and_is_not_closed(tables: Bank, what: str) -> None:
    tm = tables.manager(pool_min_size=1, pool_max_size=1)
    db = SQLAlchemy(tm)
    with pytest.raises(txmgr.TransactionAborted, match="invalidate"):
        with db.transaction() as tx:
            pay(tx)
            raw = tx.raw_connection("a")
            # SQLAlchemy gives up the connection (and, unflushed, the pending order)...
            if what == "connection":
                tx.connection("a").invalidate()
            else:
                if what == "session":
                    tx.session("a").flush()
                tx.session("a").invalidate()
    assert not raw.closed  # ...but only txmgr may close it
    assert_untouched(tables)
    with db.transaction() as tx:
        assert tx.raw_connection("a") is raw
        pay(tx)
    assert orders(tables) == [(7, 40)]


def test_no_per_transaction_setup_piles_up_on_the_connection(
    tables: Bank, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLAlchemy's psycopg dialect adds a notice handler each time it connects:
    # on a connection that outlives the transaction, they would pile up.
    db = SQLAlchemy(tables.manager(pool_min_size=1, pool_max_size=1))
    for i in range(3):
        with db.transaction() as tx:
            pay(tx, order_id=i)
    with caplog.at_level("INFO", logger="sqlalchemy"), db.transaction() as tx:
        tx.connection("a").execute(sa.text("DO $$ BEGIN RAISE NOTICE 'txmgr-hello'; END $$"))
    assert sum("txmgr-hello" in r.getMessage() for r in caplog.records) <= 1


def test_engine_does_not_connect_outside_a_transaction(db: SQLAlchemy) -> None:
    with pytest.raises(txmgr.TransactionStateError, match="only runs inside txmgr"):
        db.engine("a").connect()


def test_use_after_the_block_is_refused(db: SQLAlchemy) -> None:
    with db.transaction() as tx:
        pay(tx)
    with pytest.raises(txmgr.TransactionStateError, match="committed"):
        tx.session("a")
    with pytest.raises(txmgr.TransactionStateError):
        tx.commit()


def test_unknown_participant(db: SQLAlchemy) -> None:
    with pytest.raises(txmgr.UnknownParticipant):
        db.engine("nope")
    with db.transaction() as tx, pytest.raises(txmgr.UnknownParticipant):
        tx.session("nope")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool_size": 5}, "pool_size"),
        ({"isolation_level": "SERIALIZABLE"}, "isolation_level"),
        ({"session_options": {"bind": None}}, "bind"),
    ],
)
def test_options_txmgr_owns_are_rejected(
    tables: Bank, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(txmgr.ConfigError, match=match):
        SQLAlchemy(tables.manager(), **kwargs)


def test_options_are_passed_on(tables: Bank) -> None:
    db = SQLAlchemy(tables.manager(), session_options={"autoflush": False}, echo=True)
    assert db.engine("a").echo is True
    with db.transaction() as tx:
        session = tx.session("a")
        session.add(Order(id=1, total=1))
        assert session.scalars(sa.select(Order)).all() == []  # a query did not flush
        assert len(session.new) == 1
    assert orders(tables) == [(1, 1)]


def test_log_inside_a_participant(make_bank: Callable[..., Bank]) -> None:
    bank = make_bank(("a", "b"), log="a")
    query(bank.dsns["a"], "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
    db = SQLAlchemy(bank.manager())
    with db.transaction() as tx:
        pay(tx)
    assert orders(bank) == [(7, 40)]
    assert bank.balance("b") == START - 40
    assert bank.prepared() == []


# -- threads ----------------------------------------------------------------------


@pytest.fixture
def threads_db(tables: Bank) -> Iterator[SQLAlchemy]:
    yield SQLAlchemy(tables.manager(pool_max_size=8))


def test_threads_each_with_their_own_transaction(tables: Bank, threads_db: SQLAlchemy) -> None:
    db = threads_db
    errors: list[BaseException] = []
    per_thread, nthreads = 10, 6

    def worker(i: int) -> None:
        try:
            for k in range(per_thread):
                with db.transaction() as tx:
                    account_id = 1 + (i + k) % 4  # threads share accounts: they contend
                    tx.session("a").add(Order(id=i * 100 + k, total=1))
                    # One row per database, always "a" before "b": no deadlock.
                    account = tx.session("a").get(Account, account_id, with_for_update=True)
                    assert account is not None
                    account.balance -= 1
                    tx.connection("b").execute(
                        sa.update(accounts).where(accounts.c.id == account_id)
                        .values(balance=accounts.c.balance + 1)
                    )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(orders(tables)) == nthreads * per_thread
    assert tables.total() == tables.expected_total
    moved = [START - tables.balance("a", n) for n in range(1, 5)]
    assert moved == [tables.balance("b", n) - START for n in range(1, 5)]
    assert sum(moved) == nthreads * per_thread
    assert tables.prepared() == []

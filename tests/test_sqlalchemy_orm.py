"""txmgr.sqlalchemy.TwoPhaseSession: one ORM session over several participants,
whose commit is txmgr's atomic commit (real servers: participants "a" and "b")."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from sqlalchemy import exc as sa_exc
from sqlalchemy import orm

import txmgr
import txmgr.sqlalchemy
from orm_models import BINDS, AccountA, AccountB, Order, Recorder, uniq
from support import START, Bank, MakeBank, query
from txmgr.hooks import Hooks
from txmgr.sqlalchemy import TwoPhaseSession
from txmgr.testing import PgServer

SessionMaker = orm.sessionmaker[TwoPhaseSession]


@pytest.fixture
def tables(bank: Bank) -> Bank:
    query(bank.dsns["a"], "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
    query(bank.dsns["b"], "CREATE TABLE uniq (k int, CONSTRAINT u UNIQUE (k) DEFERRABLE "
                          "INITIALLY DEFERRED)")
    return bank


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def tm(tables: Bank, recorder: Recorder) -> txmgr.TransactionManager:
    return tables.manager(hooks=recorder)


@pytest.fixture
def Session(tm: txmgr.TransactionManager) -> SessionMaker:
    return txmgr.sqlalchemy.sessionmaker(tm, binds=BINDS)


def orders(bank: Bank) -> list[tuple[Any, ...]]:
    return query(bank.dsns["a"], "SELECT id, total FROM orders ORDER BY id")


def pay(session: orm.Session, order_id: int = 7, total: int = 40) -> None:
    """A debit on "b" (an ORM update) and an order on "a", both left unflushed."""
    account = session.get(AccountB, 1)
    assert account is not None
    account.balance -= total
    session.add(Order(id=order_id, total=total))


def raw(session: TwoPhaseSession, name: str) -> psycopg.Connection[Any]:
    """The psycopg connection under the session's Connection to ``name``."""
    conn = session.connection(bind_arguments={"participant": name}).connection.driver_connection
    assert isinstance(conn, psycopg.Connection)
    return conn


def assert_untouched(bank: Bank) -> None:
    assert orders(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []


# -- commit --------------------------------------------------------------------------


def test_commit_is_atomic_over_the_participants_it_touched(
    tables: Bank, Session: SessionMaker, recorder: Recorder
) -> None:
    with Session() as session:
        pay(session)
        assert session.new  # the order is still pending: commit() must flush it
        tx = session.txmgr_transaction
        assert tx is not None
        before = tx.state
        session.commit()
        assert (before, tx.state) == (txmgr.TransactionState.ACTIVE,
                                      txmgr.TransactionState.COMMITTED)
        assert session.txmgr_transaction is None  # the next one begins lazily
    assert orders(tables) == [(7, 40)]
    assert tables.balance("b") == START - 40
    assert recorder.writers == [["a", "b"]]
    assert sorted(recorder.prepared) == ["a", "b"]  # two writers: two-phase
    assert tables.prepared() == []


def test_one_writer_commits_in_one_phase(
    tables: Bank, Session: SessionMaker, recorder: Recorder
) -> None:
    with Session() as session:
        assert session.get(AccountB, 1) is not None  # "b" only reads
        session.add(Order(id=1, total=1))
        session.commit()
    assert orders(tables) == [(1, 1)]
    assert recorder.writers == [["a"]]
    assert recorder.prepared == []
    assert tables.decisions() == []  # one phase: the log was not written


def test_session_is_reused_with_a_new_global_transaction_each_time(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        account = session.get(AccountB, 1)
        assert account is not None
        first = session.txmgr_transaction
        assert first is not None
        account.balance -= 1
        session.commit()
        # expire_on_commit: the next access reloads, in a new global transaction.
        query(tables.dsns["b"], "UPDATE accounts SET balance = 500 WHERE id = 1")
        assert session.txmgr_transaction is None
        assert account.balance == 500
        second = session.txmgr_transaction
        assert second is not None and second.txid != first.txid
        assert second.state is txmgr.TransactionState.ACTIVE
        txid = raw(session, "b").execute("SELECT current_setting('txmgr.txid')").fetchone()
        assert txid == (second.txid,)
        account.balance -= 2
        conn = session.connection(bind_arguments={"participant": "b"})
        session.commit()
        with pytest.raises(sa_exc.ResourceClosedError):  # the session closed it
            conn.execute(sa.text("SELECT 1"))
    assert tables.balance("b") == 498


def test_begin_block_commits_or_rolls_back_through_txmgr(
    tables: Bank, Session: SessionMaker, recorder: Recorder
) -> None:
    with Session.begin() as session:
        pay(session, order_id=1)
    assert orders(tables) == [(1, 40)]
    assert recorder.writers == [["a", "b"]]
    with pytest.raises(KeyError), Session.begin() as session:
        pay(session, order_id=2)
        session.flush()
        raise KeyError("boom")
    with Session() as session:
        with session.begin():
            pay(session, order_id=3, total=2)
        with pytest.raises(KeyError), session.begin():
            pay(session, order_id=4)
            raise KeyError("boom")
    assert orders(tables) == [(1, 40), (3, 2)]
    assert tables.balance("b") == START - 42
    assert tables.prepared() == []


def test_savepoints_inside_the_session(tables: Bank, Session: SessionMaker) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")
    with Session() as session:
        pay(session, order_id=8, total=80)
        with pytest.raises(sa_exc.IntegrityError), session.begin_nested():
            session.add(Order(id=7, total=2))  # duplicate: only the savepoint rolls back
        session.commit()
    assert orders(tables) == [(7, 1), (8, 80)]
    assert tables.balance("b") == START - 80


# -- rollback ------------------------------------------------------------------------


def test_rollback_rolls_back_every_branch(tables: Bank, Session: SessionMaker) -> None:
    with Session() as session:
        pay(session, order_id=1)
        order = Order(id=7, total=40)
        session.add(order)
        session.flush()
        a, b = raw(session, "a"), raw(session, "b")
        assert a.execute("SELECT count(*) FROM orders").fetchone() == (2,)
        session.rollback()
        assert a.info.transaction_status is TransactionStatus.IDLE
        assert b.info.transaction_status is TransactionStatus.IDLE
        assert sa.inspect(order).transient  # as SQLAlchemy does with rolled back inserts
        session.add(Order(id=1, total=1))  # usable again
        session.commit()
    assert orders(tables) == [(1, 1)]
    assert tables.balance("b") == START


def test_closing_the_session_rolls_back(tables: Bank, Session: SessionMaker) -> None:
    with Session() as session:
        pay(session)
        session.flush()
        a = raw(session, "a")
    assert a.info.transaction_status is TransactionStatus.IDLE
    assert not a.closed  # back in txmgr's pool, not closed by SQLAlchemy
    assert_untouched(tables)


def test_flush_error_rolls_back_the_global_transaction(
    tables: Bank, Session: SessionMaker
) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")
    with Session() as session:
        account = session.get(AccountB, 1)
        assert account is not None
        account.balance -= 40
        session.flush()  # "b" wrote
        b = raw(session, "b")
        session.add(Order(id=7, total=40))  # a duplicate key on "a"
        with pytest.raises(sa_exc.IntegrityError):
            session.flush()
        # Every branch is rolled back at once, not only "a"'s...
        assert b.info.transaction_status is TransactionStatus.IDLE
        # ...and the session needs a rollback, as SQLAlchemy's always does.
        with pytest.raises(sa_exc.PendingRollbackError):
            session.get(AccountB, 2)
        with pytest.raises(sa_exc.PendingRollbackError):
            session.commit()
        session.rollback()
        session.add(Order(id=8, total=8))
        session.commit()
    assert orders(tables) == [(7, 1), (8, 8)]
    assert tables.balance("b") == START
    assert tables.prepared() == []


def test_vote_no_at_prepare_raises_transaction_aborted(
    tables: Bank, Session: SessionMaker, recorder: Recorder
) -> None:
    with Session() as session:
        pay(session)
        session.execute(sa.insert(uniq), [{"k": 1}, {"k": 1}])  # checked at PREPARE
        with pytest.raises(txmgr.TransactionAborted, match="could not prepare") as info:
            session.commit()
        assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
        assert recorder.writers == [["a", "b"]]
        session.rollback()
        assert not session.new
        pay(session, order_id=9, total=9)
        session.commit()
    assert orders(tables) == [(9, 9)]
    assert tables.balance("b") == START - 9
    assert tables.prepared() == []


# -- the Connection-level API ------------------------------------------------------------


def test_connections_and_core_statements_are_the_branches(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        conn = session.connection(bind_arguments={"mapper": Order})
        tx = session.txmgr_transaction
        assert tx is not None
        assert conn.connection.driver_connection is tx.connection("a")  # txmgr's own
        assert session.connection(bind_arguments={"participant": "a"}) is conn
        assert session.get_bind(Order) is session.participant_engine("a")
        session.execute(sa.text("INSERT INTO orders VALUES (1, 10)"),
                        bind_arguments={"participant": "a"})
        assert session.get(Order, 1) is not None  # ORM and Core share the branch
        session.execute(sa.update(AccountB).where(AccountB.id == 2)
                        .values(balance=AccountB.balance - 10))  # bound by its class
        session.execute(sa.insert(uniq).values(k=1))  # bound by its table
        session.execute(sa.text("UPDATE accounts SET balance = balance + 10 WHERE id = 2"),
                        bind_arguments={"mapper": AccountA})
        assert orders(tables) == []
        session.commit()
    assert orders(tables) == [(1, 10)]
    assert (tables.balance("a", 2), tables.balance("b", 2)) == (START + 10, START - 10)
    assert query(tables.dsns["b"], "SELECT k FROM uniq") == [(1,)]


def test_default_participant_and_unbound_statements(tables: Bank) -> None:
    Session = txmgr.sqlalchemy.sessionmaker(tables.manager(), bind="b")
    with Session() as session:
        session.execute(sa.text("UPDATE accounts SET balance = 1 WHERE id = 1"))
        session.add(Order(id=1, total=1))  # not bound to "a" here: on "b", no such table
        with pytest.raises(sa_exc.ProgrammingError, match="orders"):
            session.flush()
    unbound = txmgr.sqlalchemy.sessionmaker(tables.manager())
    with unbound() as session, pytest.raises(sa_exc.UnboundExecutionError):
        session.execute(sa.text("SELECT 1"))
    assert tables.balance("b") == START


# -- committing behind txmgr's back is refused ----------------------------------------


def test_dbapi_commit_is_refused_before_reaching_the_server(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        pay(session)
        session.flush()
        dbapi = session.connection(bind_arguments={"participant": "b"}).connection.dbapi_connection
        assert dbapi is not None
        with pytest.raises(txmgr.ManualTransactionControl, match="participant 'b'"):
            dbapi.commit()
        with pytest.raises(txmgr.ManualTransactionControl, match="COMMIT"):
            session.execute(sa.text("COMMIT"), bind_arguments={"participant": "a"})
        assert raw(session, "b").info.transaction_status is TransactionStatus.INTRANS
        assert orders(tables) == []
        session.commit()  # nothing happened: the session commits as usual
    assert orders(tables) == [(7, 40)]
    assert tables.balance("b") == START - 40


def test_connection_commit_is_refused_and_rolls_back(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        pay(session)
        session.flush()
        a = raw(session, "a")
        conn = session.connection(bind_arguments={"participant": "b"})
        with pytest.raises(txmgr.ManualTransactionControl, match=r"Connection\.commit"):
            conn.commit()
        # Nothing was committed; SQLAlchemy considers that Connection's transaction
        # over, so the global transaction was rolled back at once, every branch.
        assert a.info.transaction_status is TransactionStatus.IDLE
        assert_untouched(tables)
        with pytest.raises(txmgr.TransactionStateError, match="over"):
            session.execute(sa.text("SELECT 1"), bind_arguments={"participant": "a"})
        with pytest.raises(txmgr.TransactionAborted, match=r"Connection\.commit"):
            session.commit()
        session.rollback()
        pay(session, order_id=8, total=8)
        session.commit()
    assert orders(tables) == [(8, 8)]
    assert tables.balance("b") == START - 8


def test_connection_rollback_rolls_back_every_branch(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        pay(session)
        session.flush()
        b = raw(session, "b")
        session.connection(bind_arguments={"participant": "a"}).rollback()
        assert b.info.transaction_status is TransactionStatus.IDLE
        with pytest.raises(txmgr.TransactionAborted, match="rolled back"):
            session.commit()
        # SQLAlchemy's own warning about a Connection rolled back behind the session.
        with pytest.warns(sa_exc.SAWarning, match="deassociated"):
            session.rollback()
    assert_untouched(tables)


def test_lost_connection_rolls_back_every_branch(
    tables: Bank, Session: SessionMaker
) -> None:
    with Session() as session:
        pay(session)
        session.flush()
        a, b = raw(session, "a"), raw(session, "b")
        query(tables.dsns["a"], "SELECT pg_terminate_backend(%s)", (a.info.backend_pid,))
        with pytest.raises(sa_exc.OperationalError) as info:
            session.execute(sa.text("SELECT 1"), bind_arguments={"participant": "a"})
        assert info.value.connection_invalidated
        assert b.info.transaction_status is TransactionStatus.IDLE
        with pytest.raises(txmgr.TransactionAborted, match="invalidated") as aborted:
            session.commit()
        assert isinstance(aborted.value.__cause__, psycopg.OperationalError)  # the driver's
        session.rollback()
        pay(session, order_id=8, total=8)  # txmgr's pool replaced the lost connection
        assert raw(session, "a") is not a
        session.commit()
    assert orders(tables) == [(8, 8)]
    assert tables.balance("b") == START - 8


def test_session_prepare_is_refused(Session: SessionMaker) -> None:
    with Session() as session:
        pay(session)
        with pytest.raises(txmgr.TransactionStateError, match="prepare"):
            session.prepare()


def test_other_engines_are_refused_inside_the_session(
    tables: Bank, Session: SessionMaker
) -> None:
    own = sa.create_engine(tables.dsns["b"].replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session() as session:
            # Session.connection() skips get_bind() for an explicit bind.
            with pytest.raises(txmgr.ConfigError, match="not a txmgr participant"):
                session.connection(bind_arguments={"bind": own})
            pay(session)
            with pytest.raises(txmgr.ConfigError, match="not a txmgr participant"):
                session.execute(sa.text("SELECT 1"), bind_arguments={"bind": own})
            with pytest.raises(txmgr.ConfigError, match="not a txmgr participant"):
                session.commit()
            session.rollback()
            assert session.get(Order, 7) is None  # rolled back
            session.add(Order(id=8, total=8))
            session.commit()  # the next transaction is clean
        # The application's own engine is its own business, outside txmgr.
        with own.connect() as conn:
            conn.execute(sa.text("UPDATE accounts SET balance = 1 WHERE id = 4"))
            conn.commit()
        assert tables.balance("b", 4) == 1
        assert orders(tables) == [(8, 8)]
        assert tables.balance("b") == START
        assert query(tables.dsns["b"], "SELECT gid FROM pg_prepared_xacts") == []
    finally:
        own.dispose()


def test_engine_connects_only_for_its_session(Session: SessionMaker) -> None:
    with Session() as session:
        engine = session.get_bind(Order)
        assert isinstance(engine, sa.Engine)
        with pytest.raises(txmgr.TransactionStateError, match="only for its TwoPhaseSession"):
            engine.connect()


# -- failures of the commit reach session.commit() ------------------------------------


class StopLogBeforeDecision(Hooks):
    def __init__(self, server: PgServer) -> None:
        self.server = server

    def before_decision(self, txid: str, lxid: int) -> None:
        self.server.crash()  # and it stays down


def test_outcome_unknown_reaches_the_caller_and_recovery_finishes(
    make_bank: MakeBank, crash_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import txmgr.transaction

    monkeypatch.setattr(txmgr.transaction, "CONFIRM_PATIENCE", 0.5)
    bank = make_bank(log=crash_server.create_database())
    tm = bank.manager(connect_timeout=1, hooks=StopLogBeforeDecision(crash_server))
    Session = txmgr.sqlalchemy.sessionmaker(tm, binds=BINDS)
    with Session() as session:
        a, b = session.get(AccountA, 1), session.get(AccountB, 1)
        assert a is not None and b is not None
        a.balance -= 5
        b.balance += 5
        tx = session.txmgr_transaction
        assert tx is not None
        with pytest.raises(txmgr.OutcomeUnknown) as info:
            session.commit()
        assert info.value.txid == tx.txid
        session.rollback()
    assert len(bank.prepared()) == 2  # in doubt until the log is back
    crash_server.restart()
    report = txmgr.recover(bank.config())
    assert report.ok and report.rolled_back == 2  # the decision never committed
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_invalidate_rolls_back_and_keeps_the_connection(tables: Bank) -> None:
    tm = tables.manager(pool_min_size=1, pool_max_size=1)
    Session = txmgr.sqlalchemy.sessionmaker(tm, binds=BINDS)
    with Session() as session:
        pay(session)
        session.flush()
        a = raw(session, "a")
        session.invalidate()
        assert not a.closed and a.info.transaction_status is TransactionStatus.IDLE
        pay(session, order_id=8, total=8)  # the same connection serves the next one
        assert raw(session, "a") is a
        session.commit()
    assert orders(tables) == [(8, 8)]


# -- configuration ------------------------------------------------------------------------


def _engine_url(dsn: str, **changes: Any) -> sa.URL:
    return sa.make_url(dsn).set(drivername="postgresql+psycopg", **changes)


OFFLINE = {"a": "postgresql://app:secret-a@db1:5432/orders",
           "b": "postgresql://app:secret-b@db2:5432/billing"}


@pytest.fixture
def offline() -> Iterator[txmgr.TransactionManager]:
    """A manager on servers that do not exist: configuration is checked without connecting."""
    tm = txmgr.TransactionManager(OFFLINE, log="postgresql://app@db0/txlog")
    yield tm
    tm.close()


def test_application_engines_lend_their_options(tables: Bank) -> None:
    engines = {name: sa.create_engine(_engine_url(dsn), echo=True,
                                      execution_options={"logging_token": name})
               for name, dsn in tables.dsns.items()}
    Session = txmgr.sqlalchemy.sessionmaker(
        tables.manager(), engines=engines, binds=BINDS)
    with Session() as session:
        pay(session)
        bind = session.participant_engine("a")
        assert session.get_bind(Order) is bind
        assert bind.echo is True
        assert bind.get_execution_options()["logging_token"] == "a"
        assert bind.url.database == engines["a"].url.database
        assert bind.url.password is None
        session.commit()
    assert orders(tables) == [(7, 40)]
    for engine in engines.values():  # txmgr made its own connections
        assert engine.pool.checkedout() == 0 and engine.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_events_of_a_participant_engine_apply_to_its_sessions(tables: Bank) -> None:
    db = txmgr.sqlalchemy.SQLAlchemy(tables.manager())
    seen: list[str] = []

    def before_cursor_execute(conn: sa.Connection, cursor: Any, statement: str,
                              *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(db.engine("a"), "before_cursor_execute", before_cursor_execute)
    Session = db.sessionmaker(binds=BINDS)
    with Session() as session:
        pay(session)
        session.commit()
    assert any(s.startswith("INSERT INTO orders") for s in seen)
    assert not any("accounts" in s for s in seen)  # "b"'s statements: another Engine
    assert orders(tables) == [(7, 40)]


@pytest.mark.parametrize(("change", "match"), [
    ({"database": "elsewhere"}, "dbname 'elsewhere'"),
    ({"port": 1}, "port '1'"),
    ({"username": "someone"}, "user 'someone'"),
    ({"query": {"options": "-csearch_path=other"}}, r"\['options'\]"),
])
def test_an_engine_on_another_database_is_refused(
    offline: txmgr.TransactionManager, change: dict[str, Any], match: str
) -> None:
    txmgr.sqlalchemy.sessionmaker(offline, engines={"a": sa.create_engine(_engine_url(
        OFFLINE["a"]))})  # the same database: fine
    engine = sa.create_engine(_engine_url(OFFLINE["a"], **change))
    with pytest.raises(txmgr.ConfigError, match=match) as info:
        txmgr.sqlalchemy.sessionmaker(offline, engines={"a": engine})
    assert "engines['a']" in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"binds": {Order: "nope"}}, txmgr.UnknownParticipant, "nope"),
    ({"bind": "nope"}, txmgr.UnknownParticipant, "nope"),
    ({"binds": {Order: sa.create_engine("postgresql+psycopg://")}}, txmgr.ConfigError,
     "participant name"),
    ({"engines": {"nope": sa.create_engine("postgresql+psycopg://")}},
     txmgr.UnknownParticipant, "nope"),
    ({"engines": {"a": "postgresql://x"}}, txmgr.ConfigError, "must be a sqlalchemy Engine"),
    ({"engines": {"a": sa.create_engine("sqlite://")}}, txmgr.ConfigError, "sqlite"),
    ({"twophase": False}, txmgr.ConfigError, "twophase"),
])
def test_bad_configuration_is_refused(
    offline: txmgr.TransactionManager, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Session = txmgr.sqlalchemy.sessionmaker(offline, **kwargs)
        Session()


@pytest.mark.parametrize(("url", "dsn"), [
    ("postgresql+psycopg://u:one@h:5433/d", "host=h port=5433 dbname=d user=u password=two"),
    ("postgresql+psycopg://u@/d?host=/run/pg&port=5433", "postgresql://u@/d?host=/run/pg&port=5433"),
    ("postgresql+psycopg://u@H/d", "postgresql://u@h:5432/d"),  # libpq's default port
    ("postgresql+psycopg://u@h/d?sslmode=require", "host=h dbname=d user=u sslmode=require"),
])
def test_engine_urls_that_name_the_participant_database(url: str, dsn: str) -> None:
    from txmgr.sqlalchemy._binding import engine_settings

    options, shown = engine_settings("orders", sa.create_engine(url), dsn)
    assert shown.password is None and "one" not in str(shown) and "two" not in str(shown)
    assert (shown.username, shown.database) == ("u", "d")
    assert options["paramstyle"] == "pyformat"


@pytest.mark.parametrize(("url", "dsn", "match"), [
    ("postgresql+psycopg://u@h/d", "host=other dbname=d user=u", "host 'h'"),
    ("postgresql+psycopg://u@h/d", "host=h dbname=d user=u port=6543", "port '5432'"),
    ("postgresql+psycopg://u:secret@h/d?sslmode=disable", "host=h dbname=d user=u",
     r"\['sslmode'\]"),
])
def test_engine_urls_that_name_another_database(url: str, dsn: str, match: str) -> None:
    from txmgr.sqlalchemy._binding import engine_settings

    with pytest.raises(txmgr.ConfigError, match=match) as info:
        engine_settings("orders", sa.create_engine(url), dsn)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("engine_kwargs", "match"), [
    ({"isolation_level": "SERIALIZABLE"}, "isolation_level"),
    ({"execution_options": {"isolation_level": "SERIALIZABLE"}}, "isolation_level"),
    ({"json_serializer": str}, "json_serializer"),
])
def test_engine_settings_txmgr_cannot_apply_are_refused(
    offline: txmgr.TransactionManager, engine_kwargs: dict[str, Any], match: str
) -> None:
    engine = sa.create_engine(_engine_url(OFFLINE["a"]), **engine_kwargs)
    with pytest.raises(txmgr.ConfigError, match=match):
        txmgr.sqlalchemy.sessionmaker(offline, engines={"a": engine})


# -- threads --------------------------------------------------------------------------


def test_threads_share_the_sessionmaker(tables: Bank) -> None:
    tm = tables.manager(pool_max_size=4)
    Session = txmgr.sqlalchemy.sessionmaker(tm, binds=BINDS)
    errors: list[BaseException] = []
    per_thread, nthreads = 5, 4

    def worker(i: int) -> None:
        try:
            for k in range(per_thread):
                with Session.begin() as session:
                    account_id = 1 + (i + k) % 4  # threads share accounts: they contend
                    # Always "a" before "b": no deadlock across databases.
                    a = session.get(AccountA, account_id, with_for_update=True)
                    b = session.get(AccountB, account_id, with_for_update=True)
                    assert a is not None and b is not None
                    a.balance -= 1
                    b.balance += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tables.total() == tables.expected_total
    moved = [START - tables.balance("a", n) for n in range(1, 5)]
    assert moved == [tables.balance("b", n) - START for n in range(1, 5)]
    assert sum(moved) == nthreads * per_thread
    assert tables.prepared() == []

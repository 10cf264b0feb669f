"""txmgr.sqlalchemy.async_sessionmaker: SQLAlchemy's AsyncSession over an
AsyncTransactionManager, committed by txmgr (real servers: participants "a" and "b").

The session's rules are the sync TwoPhaseSession's (test_sqlalchemy_orm.py);
these tests check that they hold when every call is awaited through
SQLAlchemy's greenlets and txmgr's asyncio front end.

Run as a script (``python tests/test_sqlalchemy_async.py SPEC_JSON``) it is a
coordinator that a failpoint crashes in the middle of ``await session.commit()``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import txmgr
import txmgr.sqlalchemy
from orm_models import BINDS, AccountA, AccountB, BaseA, Order, Recorder, uniq
from support import START, Bank, query, run_coordinator
from txmgr.hooks import Hooks
from txmgr.sqlalchemy import AsyncTwoPhaseSession

Maker = async_sessionmaker[AsyncTwoPhaseSession]


@pytest.fixture
def tables(bank: Bank) -> Bank:
    query(bank.dsns["a"], "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
    query(bank.dsns["b"], "CREATE TABLE uniq (k int, CONSTRAINT u UNIQUE (k) DEFERRABLE "
                          "INITIALLY DEFERRED)")
    return bank


def run(
    bank: Bank, body: Callable[[Maker], Awaitable[None]], hooks: Hooks | None = None,
    **options: Any,
) -> None:
    """``body(Session)`` on a fresh event loop, with a manager closed at the end."""
    async def main() -> None:
        atm = txmgr.AsyncTransactionManager(bank.dsns, bank.log, hooks=hooks)
        try:
            await body(txmgr.sqlalchemy.async_sessionmaker(atm, binds=BINDS, **options))
        finally:
            await atm.close()

    asyncio.run(main())


def orders(bank: Bank) -> list[tuple[Any, ...]]:
    return query(bank.dsns["a"], "SELECT id, total FROM orders ORDER BY id")


async def pay(
    session: AsyncSession, order_id: int = 7, total: int = 40, account_id: int = 1
) -> None:
    """A debit on "b" (an ORM update) and an order on "a", both left unflushed."""
    account = await session.get(AccountB, account_id)
    assert account is not None
    account.balance -= total
    session.add(Order(id=order_id, total=total))


async def raw(session: AsyncSession, name: str) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under the session's Connection to ``name``."""
    conn = await session.connection(bind_arguments={"participant": name})
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver


def assert_untouched(bank: Bank) -> None:
    assert orders(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []


# -- commit --------------------------------------------------------------------------


def test_commit_two_branches_is_two_phase(tables: Bank) -> None:
    recorder = Recorder()
    states: list[txmgr.TransactionState] = []

    async def body(Session: Maker) -> None:
        async with Session() as session:
            await pay(session)
            assert session.new  # still pending: commit() must flush it
            tx = session.txmgr_transaction
            assert isinstance(tx, txmgr.AsyncTransaction)
            a = await raw(session, "a")
            txid = await (await a.execute("SELECT current_setting('txmgr.txid')")).fetchone()
            assert txid == (tx.txid,)  # the session runs on txmgr's own branch
            states.append(tx.state)
            await session.commit()
            states.append(tx.state)
            assert session.txmgr_transaction is None  # the next one begins lazily

    run(tables, body, hooks=recorder)
    assert states == [txmgr.TransactionState.ACTIVE, txmgr.TransactionState.COMMITTED]
    assert orders(tables) == [(7, 40)]
    assert tables.balance("b") == START - 40
    assert recorder.writers == [["a", "b"]]
    assert sorted(recorder.prepared) == ["a", "b"]
    assert tables.prepared() == []


def test_one_writer_commits_in_one_phase(tables: Bank) -> None:
    recorder = Recorder()

    async def body(Session: Maker) -> None:
        async with Session() as session:
            assert await session.get(AccountB, 1) is not None  # "b" only reads
            session.add(Order(id=1, total=1))
            await session.commit()

    run(tables, body, hooks=recorder)
    assert orders(tables) == [(1, 1)]
    assert recorder.writers == [["a"]]
    assert recorder.prepared == []
    assert tables.decisions() == []  # one phase: the log was not written


def test_begin_block_commits_and_session_is_reused(tables: Bank) -> None:
    txids: list[str] = []

    async def body(Session: Maker) -> None:
        async with Session.begin() as session:
            await pay(session, order_id=1, total=1)
            tx = session.txmgr_transaction
            assert tx is not None
            txids.append(tx.txid)
        async with Session() as session:
            await pay(session, order_id=2, total=2)
            await session.commit()
            await pay(session, order_id=3, total=3)  # a new global transaction
            tx = session.txmgr_transaction
            assert tx is not None
            txids.append(tx.txid)
            await session.commit()

    run(tables, body, expire_on_commit=False)
    assert len(set(txids)) == 2
    assert orders(tables) == [(1, 1), (2, 2), (3, 3)]
    assert tables.balance("b") == START - 6


def test_tasks_share_the_sessionmaker(tables: Bank) -> None:
    """Concurrent tasks, one session each, on one manager and one event loop: each
    session's Connections are its own branches (nothing crosses between tasks)."""
    recorder = Recorder()
    n = 4

    async def body(Session: Maker) -> None:
        async def worker(i: int) -> None:
            async with Session() as session:
                await pay(session, order_id=i, total=i, account_id=i)  # no lost update
                await session.flush()
                await asyncio.sleep(0)  # let the other tasks flush in between
                await session.commit()

        await asyncio.gather(*(worker(i) for i in range(1, n + 1)))

    run(tables, body, hooks=recorder)
    assert orders(tables) == [(i, i) for i in range(1, n + 1)]
    assert [tables.balance("b", i) for i in range(1, n + 1)] == [
        START - i for i in range(1, n + 1)]
    assert recorder.writers == [["a", "b"]] * n
    assert tables.prepared() == []


# -- rollback --------------------------------------------------------------------------


def test_rollback_rolls_back_every_branch(tables: Bank) -> None:
    async def body(Session: Maker) -> None:
        async with Session() as session:
            await pay(session)
            await session.flush()  # both branches wrote
            a, b = await raw(session, "a"), await raw(session, "b")
            tx = session.txmgr_transaction
            assert tx is not None
            await session.rollback()
            assert tx.state is txmgr.TransactionState.ROLLED_BACK
            assert_untouched(tables)
            for conn in (a, b):  # back in txmgr's pool, out of any transaction
                assert conn.info.transaction_status is TransactionStatus.IDLE
            await pay(session, order_id=8, total=8)
            await session.commit()

    run(tables, body)
    assert orders(tables) == [(8, 8)]
    assert tables.balance("b") == START - 8


def test_exception_in_the_block_rolls_back(tables: Bank) -> None:
    class Boom(Exception):
        pass

    async def body(Session: Maker) -> None:
        with pytest.raises(Boom):
            async with Session.begin() as session:
                await pay(session)
                await session.flush()
                raise Boom
        with pytest.raises(Boom):
            async with Session() as session:  # closing without commit rolls back
                await pay(session)
                await session.flush()
                raise Boom

    run(tables, body)
    assert_untouched(tables)


def test_flush_error_needs_a_rollback_as_in_sqlalchemy(tables: Bank) -> None:
    query(tables.dsns["a"], "INSERT INTO orders VALUES (7, 1)")

    async def body(Session: Maker) -> None:
        async with Session() as session:
            account = await session.get(AccountB, 1)
            assert account is not None
            account.balance -= 40
            await session.flush()  # "b" wrote
            b = await raw(session, "b")
            session.add(Order(id=7, total=40))  # a duplicate key on "a"
            with pytest.raises(sa_exc.IntegrityError):
                await session.flush()
            # Every branch is rolled back at once, not only "a"'s...
            assert b.info.transaction_status is TransactionStatus.IDLE
            # ...and the session needs a rollback, as SQLAlchemy's always does.
            with pytest.raises(sa_exc.PendingRollbackError):
                await session.get(AccountB, 2)
            with pytest.raises(sa_exc.PendingRollbackError):
                await session.commit()
            await session.rollback()
            session.add(Order(id=8, total=8))
            await session.commit()

    run(tables, body)
    assert orders(tables) == [(7, 1), (8, 8)]
    assert tables.balance("b") == START
    assert tables.prepared() == []


def test_vote_no_at_prepare_raises_transaction_aborted(tables: Bank) -> None:
    async def body(Session: Maker) -> None:
        async with Session() as session:
            await pay(session)
            # Deferred: the duplicate is only found by PREPARE TRANSACTION on "b".
            await session.execute(sa.insert(uniq), [{"k": 1}, {"k": 1}])
            tx = session.txmgr_transaction
            assert tx is not None
            with pytest.raises(txmgr.TransactionAborted) as info:
                await session.commit()
            assert info.value.txid == tx.txid
            assert tx.state is txmgr.TransactionState.ROLLED_BACK
            await session.rollback()

    run(tables, body)
    assert_untouched(tables)
    assert query(tables.dsns["b"], "SELECT count(*) FROM uniq") == [(0,)]


# -- refused ------------------------------------------------------------------------------


def test_connection_commit_is_refused_and_rolls_back(tables: Bank) -> None:
    async def body(Session: Maker) -> None:
        async with Session() as session:
            await pay(session)
            await session.flush()
            a = await raw(session, "a")
            conn = await session.connection(bind_arguments={"participant": "b"})
            with pytest.raises(txmgr.ManualTransactionControl, match=r"Connection\.commit"):
                await conn.commit()
            # Nothing was committed, and every branch was rolled back at once.
            assert a.info.transaction_status is TransactionStatus.IDLE
            assert_untouched(tables)
            with pytest.raises(txmgr.TransactionStateError, match="over"):
                await session.execute(sa.text("SELECT 1"), bind_arguments={"participant": "a"})
            with pytest.raises(txmgr.TransactionAborted, match=r"Connection\.commit"):
                await session.commit()
            await session.rollback()
            await pay(session, order_id=8, total=8)
            await session.commit()

    run(tables, body)
    assert orders(tables) == [(8, 8)]
    assert tables.balance("b") == START - 8


def test_dbapi_commit_is_refused_before_reaching_the_server(tables: Bank) -> None:
    async def body(Session: Maker) -> None:
        async with Session() as session:
            await pay(session)
            await session.flush()
            a = await raw(session, "a")
            with pytest.raises(txmgr.ManualTransactionControl):
                await a.commit()
            assert a.info.transaction_status is TransactionStatus.INTRANS
            await session.commit()

    run(tables, body)
    assert orders(tables) == [(7, 40)]


def test_bad_configuration_is_refused(tables: Bank) -> None:
    atm = txmgr.AsyncTransactionManager(tables.dsns, tables.log)
    with pytest.raises(txmgr.UnknownParticipant, match="'c'"):
        txmgr.sqlalchemy.async_sessionmaker(atm, binds={BaseA: "c"})
    sync_engine = sa.create_engine(
        sa.make_url(tables.dsns["a"]).set(drivername="postgresql+psycopg"))
    with pytest.raises(txmgr.ConfigError, match="AsyncEngine"):
        txmgr.sqlalchemy.async_sessionmaker(atm, engines={"a": sync_engine})  # type: ignore[dict-item]
    elsewhere = create_async_engine(
        sa.make_url(tables.dsns["b"]).set(drivername="postgresql+psycopg"))
    with pytest.raises(txmgr.ConfigError, match="points elsewhere"):
        txmgr.sqlalchemy.async_sessionmaker(atm, engines={"a": elsewhere})


def test_sync_side_imports_without_greenlet() -> None:
    """greenlet comes with txmgr[sqlalchemy]; without it the sync API still imports and
    the asyncio names say what to install."""
    code = (
        "import sys; sys.modules['greenlet'] = None\n"
        "import txmgr.sqlalchemy\n"
        "assert txmgr.sqlalchemy.sessionmaker\n"
        "try:\n"
        "    txmgr.sqlalchemy.async_sessionmaker\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "install txmgr[sqlalchemy]" in proc.stdout


def test_application_async_engines_lend_their_options(tables: Bank) -> None:
    def engine(name: str) -> Any:
        url = psycopg.conninfo.conninfo_to_dict(tables.dsns[name])
        return create_async_engine(
            sa.URL.create("postgresql+psycopg", username=str(url["user"]),
                          host=str(url["host"]), port=int(str(url["port"])),
                          database=str(url["dbname"])),
            execution_options={"txmgr_test": name},
        )

    seen: list[Any] = []

    async def main() -> None:
        atm = txmgr.AsyncTransactionManager(tables.dsns, tables.log)
        try:
            Session = txmgr.sqlalchemy.async_sessionmaker(
                atm, engines={"a": engine("a"), "b": engine("b")}, binds=BINDS)
            async with Session() as session:
                await pay(session)
                conn = await session.connection(bind_arguments={"participant": "a"})
                assert conn.sync_connection is not None
                seen.append(conn.sync_connection.get_execution_options().get("txmgr_test"))
                await session.commit()
        finally:
            await atm.close()

    asyncio.run(main())
    assert seen == ["a"]
    assert orders(tables) == [(7, 40)]


# -- a crash in the middle of the commit ---------------------------------------------------


def crash_at(bank: Bank, failpoint: str) -> str:
    """A child process transfers 40 from "a" to "b" through an async session and a
    ``crash`` failpoint ends it at ``failpoint``; its txid."""
    from txmgr.failpoints import CRASH_EXIT

    spec = {"participants": bank.dsns, "log": bank.log, "failpoint": failpoint}
    return run_coordinator([__file__], spec, exit_code=CRASH_EXIT)


@pytest.mark.crash
@pytest.mark.parametrize(("failpoint", "committed"),
                         [("before_decision", False), ("after_decision", True)])
def test_crash_between_prepare_and_commit_is_finished_by_recover(
    bank: Bank, failpoint: str, committed: bool
) -> None:
    txid = crash_at(bank, failpoint)
    assert len(bank.prepared()) == 2  # both branches prepared, neither finished
    outcomes: list[tuple[str, str]] = []
    while True:  # a killed coordinator's decision transaction ends when the server notices
        report = txmgr.recover(bank.config())
        assert report.errors == [], report
        outcomes += [(r.txid, r.outcome) for r in report.resolutions
                     if r.outcome in ("committed", "rolled back")]
        if report.in_progress == 0:
            break
        time.sleep(0.05)
    expected = "committed" if committed else "rolled back"
    assert sorted(outcomes) == [(txid, expected), (txid, expected)]
    assert bank.prepared() == []
    moved = 40 if committed else 0
    assert (bank.balance("a"), bank.balance("b")) == (START - moved, START + moved)


def _coordinator(spec: dict[str, Any]) -> None:
    from txmgr import failpoints

    failpoints.enable(spec["failpoint"], "crash")

    async def main() -> None:
        atm = txmgr.AsyncTransactionManager(spec["participants"], spec["log"], pool_min_size=0)
        Session = txmgr.sqlalchemy.async_sessionmaker(atm, binds=BINDS)
        async with Session() as session:
            source = await session.get(AccountA, 1)
            target = await session.get(AccountB, 1)
            assert source is not None and target is not None
            tx = session.txmgr_transaction
            assert tx is not None
            print(f"TXID {tx.txid}", flush=True)
            source.balance -= 40
            target.balance += 40
            await session.commit()

    asyncio.run(main())
    sys.exit(3)  # still alive: the failpoint was never reached


if __name__ == "__main__":
    _coordinator(json.loads(sys.argv[1]))

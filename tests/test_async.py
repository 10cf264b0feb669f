"""What only the asyncio front end has: it never blocks the event loop, it can be
cancelled, and its own API (``async with``, ``open()``, ``check()``).

The behaviours both front ends share run in test_frontends.py, for each of them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, query
from txmgr._multiplex import Job, run_all, run_all_async
from txmgr.hooks import Hooks

GATE = 4242  # advisory lock key that holds PREPARE on participant "b"


def gated(bank: Bank) -> None:
    """On "b", a deferred trigger makes PREPARE TRANSACTION wait for advisory
    lock GATE (deferred triggers fire at PREPARE): the test holds the lock."""
    query(bank.dsns["b"], "CREATE TABLE gated (k int)")
    query(bank.dsns["b"], "CREATE FUNCTION wait_gate() RETURNS trigger LANGUAGE plpgsql AS "
                          f"$$ BEGIN PERFORM pg_advisory_xact_lock({GATE}); RETURN NULL; END $$")
    query(bank.dsns["b"], "CREATE CONSTRAINT TRIGGER gate AFTER INSERT ON gated DEFERRABLE "
                          "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_gate()")


async def wait_for_gate(conn: psycopg.AsyncConnection[Any]) -> None:
    """Until a session waits for the gate (polling a condition, not fixing a race)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cur = await conn.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'advisory'")
        if await cur.fetchone():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody ever waited for the gate")


async def move(tx: txmgr.AsyncTransaction, amount: int, account: int = 1) -> None:
    a, b = await tx.connection("a"), await tx.connection("b")
    await a.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, account))
    await b.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, account))


class Threads(Hooks):
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def after_vote(self, txid: str, writers: list[str]) -> None:
        self.threads.add(threading.get_ident())

    def after_decision(self, txid: str, lxid: int) -> None:
        self.threads.add(threading.get_ident())


def test_a_waiting_commit_leaves_the_loop_free(bank: Bank) -> None:
    gated(bank)
    hooks = Threads()

    async def scenario() -> tuple[int, str]:
        async with (
            txmgr.AsyncTransactionManager(bank.dsns, bank.log, hooks=hooks) as tm,
            await psycopg.AsyncConnection.connect(bank.dsns["b"], autocommit=True) as gate,
        ):
            await gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))

            async def held() -> None:
                async with tm.transaction() as tx:
                    await move(tx, 10)
                    await (await tx.connection("b")).execute("INSERT INTO gated VALUES (1)")

            task = asyncio.create_task(held())
            # This coroutine runs only if the committing task yields the loop
            # while its PREPARE waits.
            await wait_for_gate(gate)
            async with tm.transaction() as other:  # and another commit runs meanwhile
                await move(other, 1, account=2)
            assert not task.done()
            await gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            await task
            return threading.get_ident(), other.state.value

    loop_thread, other_state = asyncio.run(scenario())
    assert other_state == "committed"
    assert (bank.balance("a"), bank.balance("b")) == (START - 10, START + 10)
    assert (bank.balance("a", 2), bank.balance("b", 2)) == (START - 1, START + 1)
    assert hooks.threads == {loop_thread}  # the protocol ran on the loop, no threads


def test_cancelled_commit_is_finished_by_recovery(bank: Bank) -> None:
    gated(bank)

    async def scenario() -> txmgr.AsyncTransaction:
        async with (
            txmgr.AsyncTransactionManager(bank.dsns, bank.log) as tm,
            await psycopg.AsyncConnection.connect(bank.dsns["b"], autocommit=True) as gate,
        ):
            await gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
            tx = tm.transaction()

            async def held() -> None:
                async with tx:
                    await move(tx, 10)
                    await (await tx.connection("b")).execute("INSERT INTO gated VALUES (1)")

            task = asyncio.create_task(held())
            await wait_for_gate(gate)  # the PREPARE of "b" waits
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            # The manager goes on: its pools got their connections back.
            async with tm.transaction() as other:
                await move(other, 1, account=2)
            return tx

    tx = asyncio.run(scenario())
    # Cancelled inside the protocol: like a crash there, recovery finishes it.
    assert tx.state is txmgr.TransactionState.UNKNOWN
    deadline = time.monotonic() + 20
    while True:
        report = txmgr.recover(bank.config())
        if (report.in_progress == 0 and not bank.prepared()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the cancelled PREPARE finishes once the gate opens
    assert report.ok and report.committed == 0
    assert (bank.balance("a"), bank.balance("b")) == (START, START)  # the decision was never made
    assert (bank.balance("a", 2), bank.balance("b", 2)) == (START - 1, START + 1)
    assert bank.prepared() == []


def test_manager_api(bank: Bank) -> None:
    async def scenario() -> None:
        tm = txmgr.AsyncTransactionManager(bank.dsns, bank.log)
        assert "AsyncTransactionManager(participants=['a', 'b']" in repr(tm)
        await tm.open()
        await tm.check()  # connects to every participant
        assert len(await tm.logid()) == 8
        tx = tm.transaction()  # without a block: commit by hand
        assert "AsyncTransaction" in repr(tx)
        await move(tx, 3)
        await tx.commit()
        assert tx.state is txmgr.TransactionState.COMMITTED
        await tm.close()
        await tm.close()  # twice is fine
        with pytest.raises(txmgr.TransactionStateError, match="closed AsyncTransactionManager"):
            tm.transaction()

    asyncio.run(scenario())
    assert (bank.balance("a"), bank.balance("b")) == (START - 3, START + 3)
    assert bank.decisions() == []


def test_branches_opened_by_concurrent_tasks(bank: Bank) -> None:
    async def scenario() -> tuple[int, int]:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as tm:
            async with tm.transaction() as tx:
                a1, a2, b = await asyncio.gather(
                    tx.connection("a"), tx.connection("a"), tx.connection("b")
                )
                assert a1 is a2  # one branch per participant, even when asked twice at once
                await a1.execute("UPDATE accounts SET balance = balance - 4 WHERE id = 1")
                await b.execute("UPDATE accounts SET balance = balance + 4 WHERE id = 1")
            pool = await tm.participant("a").pool()
            stats = pool.get_stats()
            return stats["pool_size"], stats["pool_available"]

    size, available = asyncio.run(scenario())
    assert available == size  # the second connection went back to the pool
    assert (bank.balance("a"), bank.balance("b")) == (START - 4, START + 4)


def test_unmigrated_log_fails_on_open(bank: Bank, make_database: Any) -> None:
    empty = make_database()

    async def scenario() -> None:
        with pytest.raises(txmgr.LogSchemaError, match="txmgr migrate"):
            async with txmgr.AsyncTransactionManager(bank.dsns, empty):
                pass
        tm = txmgr.AsyncTransactionManager(bank.dsns, empty)
        with pytest.raises(txmgr.LogSchemaError):  # no block: the first connection() checks
            await tm.transaction().connection("a")
        await tm.close()

    asyncio.run(scenario())


def test_unreachable_participant_is_a_typed_error(bank: Bank) -> None:
    bad = {**bank.dsns, "b": "postgresql://app:s3cret@127.0.0.1:1/nowhere"}

    async def scenario() -> None:
        async with txmgr.AsyncTransactionManager(bad, bank.log, connect_timeout=1) as tm:
            with pytest.raises(txmgr.ParticipantUnavailable) as info:
                async with tm.transaction() as tx:
                    await move(tx, 5)
            assert "s3cret" not in str(info.value) and "'b'" in str(info.value)

    asyncio.run(scenario())
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_two_managers_on_two_loops_at_once(make_bank: MakeBank) -> None:
    # Pools belong to the loop that opened them: one manager per loop.
    bank = make_bank()
    errors: list[BaseException] = []

    def thread(account: int) -> None:
        async def scenario() -> None:
            async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as tm:
                for _ in range(5):
                    async with tm.transaction() as tx:
                        await move(tx, 1, account=account)

        try:
            asyncio.run(scenario())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=thread, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [bank.balance("a", n) for n in (1, 2)] == [START - 5, START - 5]
    assert bank.total() == bank.expected_total


# -- the multiplexer: one query on many connections, sync and async ---------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_multiplexer_sends_queries_larger_than_the_socket_buffer(
    pg_servers: list[Any], make_database: Any, kind: str
) -> None:
    # libpq keeps what the socket does not take yet: the multiplexer must keep
    # flushing it (waiting for writability) or the server never answers.
    dsns = [make_database(s) for s in pg_servers]
    big = 16 * 1024 * 1024
    text = b"SELECT length('" + b"x" * big + b"'), 2"

    async def scenario() -> list[Job]:
        if kind == "sync":
            conns = [psycopg.connect(d, autocommit=True) for d in dsns]
            jobs = [Job(c, text) for c in conns]
            run_all(jobs)
        else:
            aconns = [await psycopg.AsyncConnection.connect(d, autocommit=True) for d in dsns]
            jobs = [Job(c, text) for c in aconns]
            await run_all_async(jobs)
        for job in jobs:
            await call_close(job.conn)
        return jobs

    jobs = asyncio.run(scenario())
    assert [(j.error, j.rows) for j in jobs] == [(None, [(str(big), "2")])] * len(dsns)


async def call_close(conn: Any) -> None:
    result = conn.close()
    if asyncio.iscoroutine(result):
        await result


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_multiplexer_reports_each_error_on_its_job(make_database: Any, kind: str) -> None:
    dsn = make_database()

    async def scenario() -> list[Job]:
        if kind == "sync":
            conns: list[Any] = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
        else:
            conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True)
                     for _ in range(3)]
        await call_close(conns[2])
        jobs = [Job(conns[0], b"SELECT 1/0"), Job(conns[1], b"BEGIN; SELECT 'ok'"),
                Job(conns[2], b"SELECT 1")]
        if kind == "sync":
            run_all(jobs)
        else:
            await run_all_async(jobs)
        for c in conns:
            await call_close(c)
        return jobs

    failed, fine, closed = asyncio.run(scenario())
    assert isinstance(failed.error, psycopg.errors.DivisionByZero)
    assert fine.error is None and fine.rows == [("ok",)] and fine.tag == b"SELECT 1"
    assert isinstance(closed.error, psycopg.OperationalError)

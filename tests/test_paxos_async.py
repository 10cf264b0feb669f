"""Paxos mode through the asyncio front end: ``AsyncTransactionManager(log=PaxosLog([...]))``.

The behaviours of test_paxos_mode.py that depend on the front end, on real
servers: a transfer commits (and its slots are deleted when the manager
closes), one log database down changes nothing, two down abort the
transaction before anything is prepared, and a coordinator crashed at a
failpoint is finished by recovery. And what only asyncio has: the event loop
stays free while a Paxos round waits for the log databases (the rounds run
on a worker thread), and a task cancelled during one leaves what recovery
finishes.

Run as a script, this module is an asyncio coordinator that a failpoint
crashes (``python tests/test_paxos_async.py SPEC_JSON``, see :func:`crash_at`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, MakeBank, query, run_coordinator, transfer
from test_paxos_mode import (  # the Paxos fixtures and helpers, shared with the sync tests
    acceptors,  # noqa: F401  (fixture)
    closing,  # noqa: F401  (fixture)
    paxos_log,
    paxos_prepared,
    proxied,
    proxies,  # noqa: F401  (fixture)
    recover,
    slot_txids,
)
from txmgr.hooks import Hooks
from txmgr.testing.proxy import FaultProxy


def manager(bank: Bank, dsns: list[str], **options: Any) -> txmgr.AsyncTransactionManager:
    """An async manager over a Paxos log of ``dsns`` (it closes the log when it closes)."""
    log = txmgr.PaxosLog(dsns, connect_timeout=5, round_timeout=options.pop("round_timeout", 5))
    return txmgr.AsyncTransactionManager(bank.dsns, log=log, connect_timeout=5, **options)


async def run(tm: txmgr.AsyncTransactionManager, statements: dict[str, list[str]]) -> str:
    async with tm.transaction() as tx:
        for name, stmts in statements.items():
            conn = await tx.connection(name)
            for stmt in stmts:
                await conn.execute(stmt)
    return tx.txid


# -- commits, and log databases down ----------------------------------------------------


def test_a_transfer_commits_through_paxos(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]  # noqa: F811
) -> None:
    bank = make_bank()
    observer = paxos_log(closing, acceptors)

    async def scenario() -> tuple[str, str, set[str]]:
        tm = manager(bank, acceptors)
        async with tm:
            with pytest.raises(txmgr.ConfigError, match="no single log id"):
                await tm.logid()
            await tm.check()
            txid = await run(tm, transfer(30, "a", "b"))
            # One writer: one-phase commit, the log databases are not asked.
            single = await run(tm, {"a": ["UPDATE accounts SET balance = balance + 1 "
                                          "WHERE id = 2"]})
            before_close = slot_txids(observer)
        return txid, single, before_close

    txid, single, before_close = asyncio.run(scenario())
    assert (bank.balance("a"), bank.balance("b")) == (START - 30, START + 30)
    assert bank.balance("a", 2) == START + 1
    assert paxos_prepared(bank) == []
    assert txid in before_close and single not in before_close
    # Closing the manager deleted the finished transaction's slots (paxos.forget).
    assert txid not in slot_txids(observer)


def test_one_log_database_down_commits_continue(
    make_bank: MakeBank, acceptors: list[str], proxies: list[FaultProxy],  # noqa: F811
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]

    async def scenario() -> None:
        async with manager(bank, dsns) as tm:
            await run(tm, transfer(10, "a", "b"))
            proxies[0].stop()  # down: connections refused, open ones gone
            for _ in range(3):
                await run(tm, transfer(10, "a", "b"))

    asyncio.run(scenario())
    assert (bank.balance("a"), bank.balance("b")) == (START - 40, START + 40)
    assert paxos_prepared(bank) == []


def test_two_log_databases_down_abort_with_nothing_prepared(
    make_bank: MakeBank, acceptors: list[str], proxies: list[FaultProxy],  # noqa: F811
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], proxied(proxies, acceptors[1]), proxied(proxies, acceptors[2])]

    async def scenario() -> BaseException:
        async with manager(bank, dsns) as tm:
            await run(tm, transfer(10, "a", "b"))
            for p in proxies:
                p.stop()
            with pytest.raises(txmgr.TransactionAborted, match="Paxos log") as caught:
                await run(tm, transfer(10, "a", "b"))
            return caught.value

    error = asyncio.run(scenario())
    assert isinstance(error.__cause__, txmgr.LogQuorumUnavailable)
    assert (bank.balance("a"), bank.balance("b")) == (START - 10, START + 10)
    assert paxos_prepared(bank) == []


def test_opening_without_a_majority_of_log_databases_fails(
    make_bank: MakeBank, acceptors: list[str], proxies: list[FaultProxy],  # noqa: F811
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], proxied(proxies, acceptors[1]), proxied(proxies, acceptors[2])]
    for p in proxies:
        p.stop()

    async def scenario() -> None:
        tm = manager(bank, dsns)
        try:
            with pytest.raises(txmgr.LogQuorumUnavailable, match="only 1 of 3"):
                await tm.open()
            with pytest.raises(txmgr.LogQuorumUnavailable):
                async with tm.transaction():
                    pass
        finally:
            await tm.close()

    asyncio.run(scenario())
    assert paxos_prepared(bank) == []


# -- a crashed coordinator, and recovery --------------------------------------------------


def crash_at(bank: Bank, dsns: list[str], failpoint: str,
             statements: dict[str, list[str]]) -> str:
    """Run this module as an asyncio coordinator that a ``crash`` failpoint ends; its txid."""
    from txmgr.failpoints import CRASH_EXIT

    spec = {"participants": bank.dsns, "log": dsns, "statements": statements,
            "failpoint": failpoint}
    return run_coordinator([__file__], spec, exit_code=CRASH_EXIT, timeout=120)


@pytest.mark.parametrize(("failpoint", "moved"), [("after_prepare", 0),
                                                   ("before_decision", 0),
                                                   ("after_decision", 30)])
def test_a_crashed_async_coordinator_is_finished_by_recovery(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],  # noqa: F811
    failpoint: str, moved: int,
) -> None:
    bank = make_bank()
    txid = crash_at(bank, acceptors, failpoint, transfer(30, "a", "b"))
    left = paxos_prepared(bank)
    assert left and all(txid in gid for gid in left), left
    report = recover(bank, closing, acceptors)
    assert report.ok, report.errors
    if moved:
        assert (report.committed, report.rolled_back) == (2, 0)
    else:
        assert report.committed == 0 and report.rolled_back == len(left)
    assert paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START - moved, START + moved)
    assert txid not in slot_txids(paxos_log(closing, acceptors))  # forgotten


# -- the event loop during a Paxos round ------------------------------------------------


class Gate:
    """Holds every Paxos round at the log databases: a transaction on each one
    holds ``txmgr_paxos`` in EXCLUSIVE mode, so registration (INSERT) and
    proposals (UPDATE) wait for it while reads go on."""

    def __init__(self, dsns: list[str]) -> None:
        self.dsns = dsns
        self.conns = [psycopg.connect(d) for d in dsns]

    def close_now(self) -> None:
        for c in self.conns:
            c.execute("LOCK TABLE txmgr_paxos IN EXCLUSIVE MODE")

    def open(self) -> None:
        for c in self.conns:
            c.rollback()

    def dispose(self) -> None:
        for c in self.conns:
            c.close()

    async def wait_until_held(self) -> None:
        """Until a majority of the log databases have a statement waiting for the
        gate (polling a condition, not fixing a race)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = 0
            for dsn in self.dsns:
                rows = await asyncio.to_thread(
                    query, dsn, "SELECT 1 FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event_type = 'Lock'")
                waiting += bool(rows)
            if waiting >= 2:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no Paxos round ever waited at the gate")


class CloseGateAtDecision(Hooks):
    """Closes the gate when every branch is prepared, just before commit is
    proposed (the hook runs on the event loop's thread)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.threads: set[int] = set()

    def before_decision(self, txid: str, lxid: int) -> None:
        self.threads.add(threading.get_ident())
        self.gate.close_now()


@pytest.fixture
def gate(acceptors: list[str]) -> Iterator[Gate]:  # noqa: F811
    g = Gate(acceptors)
    yield g
    g.open()
    g.dispose()


@pytest.mark.parametrize("round_", ["registration", "proposal"])
def test_the_loop_stays_free_while_a_paxos_round_waits(
    make_bank: MakeBank, acceptors: list[str], gate: Gate, round_: str,  # noqa: F811
) -> None:
    bank = make_bank()
    hooks = CloseGateAtDecision(gate) if round_ == "proposal" else None

    async def scenario() -> tuple[int, str]:
        # A round timeout far beyond what the test needs: the gate, not a clock, ends it.
        async with manager(bank, acceptors, hooks=hooks, round_timeout=60) as tm:
            if round_ == "registration":
                gate.close_now()
            task = asyncio.create_task(run(tm, transfer(10, "a", "b")))
            # This coroutine runs only if the committing task yields the loop
            # while its round waits at the log databases.
            await gate.wait_until_held()
            async with tm.transaction() as other:  # one writer: no Paxos round
                await (await other.connection("a")).execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = 2")
            assert not task.done()
            gate.open()
            await task
            return threading.get_ident(), other.state.value

    loop_thread, other_state = asyncio.run(scenario())
    assert other_state == "committed"
    assert (bank.balance("a"), bank.balance("b")) == (START - 10, START + 10)
    assert bank.balance("a", 2) == START + 1
    assert paxos_prepared(bank) == []
    if hooks is not None:
        assert hooks.threads == {loop_thread}  # the protocol itself ran on the loop


def test_a_task_cancelled_during_the_proposal_is_finished_by_recovery(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any], gate: Gate,  # noqa: F811
) -> None:
    bank = make_bank()
    hooks = CloseGateAtDecision(gate)

    async def scenario() -> txmgr.AsyncTransaction:
        async with manager(bank, acceptors, hooks=hooks, round_timeout=60) as tm:
            tx = tm.transaction()

            async def held() -> None:
                async with tx:
                    for name, stmts in transfer(10, "a", "b").items():
                        await (await tx.connection(name)).execute(stmts[0])

            task = asyncio.create_task(held())
            await gate.wait_until_held()  # commit is being proposed, held at the gate
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.open()  # the worker thread's round goes on without the task
            return tx
        # asyncio.run joins the worker thread before returning.

    tx = asyncio.run(scenario())
    # Like a crash after proposing: the branches stay prepared, and the
    # proposal the thread finished chose commit.
    assert tx.state is txmgr.TransactionState.UNKNOWN
    assert len(paxos_prepared(bank)) == 2
    report = recover(bank, closing, acceptors)
    assert report.ok, report.errors
    assert (report.committed, report.rolled_back) == (2, 0)
    assert (bank.balance("a"), bank.balance("b")) == (START - 10, START + 10)
    assert paxos_prepared(bank) == []


# -- the crashing coordinator (run as a script) -----------------------------------------


class _PrintTxid(Hooks):
    """Prints the transaction's final txid: commit() gives it its registered one
    (before the after_vote hook), and run_coordinator reads the last printed."""

    def after_vote(self, txid: str, writers: list[str]) -> None:
        print(f"TXID {txid}", flush=True)


def _coordinator(spec: dict[str, Any]) -> None:
    from txmgr import failpoints

    failpoints.enable(spec["failpoint"], "crash")

    async def main() -> None:
        log = txmgr.PaxosLog(spec["log"], connect_timeout=5)
        async with txmgr.AsyncTransactionManager(spec["participants"], log=log,
                                                 pool_min_size=0, hooks=_PrintTxid()) as tm:
            async with tm.transaction() as tx:
                print(f"TXID {tx.txid}", flush=True)  # provisional
                for name, statements in spec["statements"].items():
                    conn = await tx.connection(name)
                    for stmt in statements:
                        await conn.execute(stmt)

    asyncio.run(main())
    sys.exit(3)  # still alive: the failpoint was never reached


if __name__ == "__main__":
    _coordinator(json.loads(sys.argv[1]))

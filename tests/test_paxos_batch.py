"""Paxos mode combines the ballot-0 commits of concurrent transactions.

The Combiner's logic is tested with a fake batch function (pure threading:
who sends what, in which batch); the whole path against real servers: three
transactions whose commits arrive while a fourth's accept round is held up
are accepted by one statement per log database — their slots carry one
transaction id (``xmin``) — and all commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

import txmgr
from support import MakeBank, query, transfer
from test_paxos_mode import (  # the Paxos fixtures, shared with the other Paxos tests
    acceptors,  # noqa: F401  (fixture)
    closing,  # noqa: F401  (fixture)
)
from txmgr.paxos._batch import Combiner

PATIENCE = 30.0  # seconds a test waits for a state it needs before failing


def wait_until(what: str, cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


class Gate:
    """A fake batch function: records each batch, and blocks while closed."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.open = threading.Event()
        self.running = 0
        self.fail: BaseException | None = None
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[str]) -> list[str]:
        with self._lock:
            self.batches.append(list(items))
            self.running += 1
        try:
            self.open.wait(PATIENCE)
            if self.fail is not None:
                raise self.fail
            return [f"done {item}" for item in items]
        finally:
            with self._lock:
                self.running -= 1


def submit_all(combiner: Combiner[str, str], items: list[tuple[str, str]]
               ) -> tuple[list[threading.Thread], dict[str, Any]]:
    results: dict[str, Any] = {}

    def one(item: str, key: str) -> None:
        try:
            results[item] = combiner.submit(item, key)
        except BaseException as e:  # recorded for the test to check
            results[item] = e

    threads = [threading.Thread(target=one, args=it) for it in items]
    for t in threads:
        t.start()
    return threads, results


def test_a_lone_item_runs_at_once_and_later_ones_go_together() -> None:
    gate = Gate()
    combiner: Combiner[str, str] = Combiner(gate, limit=1, max_batch=10)
    first, results = submit_all(combiner, [("a", "k")])
    wait_until("the first batch runs", lambda: gate.running == 1)
    assert gate.batches == [["a"]]  # nobody else was waiting: sent alone, at once
    rest, more = submit_all(combiner, [("b", "k"), ("c", "k"), ("d", "k")])
    wait_until("three items queue behind it", lambda: combiner.queued() == 3)
    assert gate.running == 1  # the limit holds them back
    gate.open.set()
    for t in first + rest:
        t.join(PATIENCE)
    assert len(gate.batches) == 2
    assert sorted(gate.batches[1]) == ["b", "c", "d"]  # one batch for all three
    assert {**results, **more} == {x: f"done {x}" for x in "abcd"}
    assert combiner.queued() == 0


def test_batches_hold_one_key_and_at_most_max_batch_items() -> None:
    gate = Gate()
    combiner: Combiner[str, str] = Combiner(gate, limit=1, max_batch=2)
    first, _ = submit_all(combiner, [("a", "k")])
    wait_until("the first batch runs", lambda: gate.running == 1)
    items = [("b", "k"), ("c", "other"), ("d", "k"), ("e", "k")]
    rest, results = submit_all(combiner, items)
    wait_until("four items queue", lambda: combiner.queued() == 4)
    gate.open.set()
    for t in first + rest:
        t.join(PATIENCE)
    later = gate.batches[1:]
    assert sorted(x for b in later for x in b) == ["b", "c", "d", "e"]
    keys = dict(items)
    for batch in later:
        assert len(batch) <= 2
        assert len({keys[x] for x in batch}) == 1, batch
    assert results == {x: f"done {x}" for x, _ in items}


def test_limit_two_runs_two_batches_at_once() -> None:
    gate = Gate()
    combiner: Combiner[str, str] = Combiner(gate, limit=2, max_batch=10)
    threads, results = submit_all(combiner, [("a", "k")])
    wait_until("one batch runs", lambda: gate.running == 1)
    more, results2 = submit_all(combiner, [("b", "k")])
    wait_until("a second batch runs beside it", lambda: gate.running == 2)
    gate.open.set()
    for t in threads + more:
        t.join(PATIENCE)
    assert gate.batches == [["a"], ["b"]]
    assert {**results, **results2} == {"a": "done a", "b": "done b"}


def test_an_error_reaches_every_item_of_its_batch_only() -> None:
    gate = Gate()
    combiner: Combiner[str, str] = Combiner(gate, limit=1, max_batch=10)
    first, results = submit_all(combiner, [("a", "k")])
    wait_until("the first batch runs", lambda: gate.running == 1)
    rest, failed = submit_all(combiner, [("b", "k"), ("c", "k")])
    wait_until("two items queue", lambda: combiner.queued() == 2)
    gate.fail = RuntimeError("the log databases said no")
    gate.open.set()
    for t in first + rest:
        t.join(PATIENCE)
    assert all(isinstance(r, RuntimeError) for r in [*results.values(), *failed.values()])
    gate.fail = None  # the combiner is not stuck: the next item runs
    assert combiner.submit("d", "k") == "done d"


def test_combiner_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="limit >= 1"):
        Combiner(Gate(), limit=0, max_batch=1)
    with pytest.raises(txmgr.ConfigError, match="accept_rounds"):
        txmgr.PaxosLog(["host=a dbname=x", "host=b dbname=x", "host=c dbname=x"],
                       accept_rounds=0)


# -- against real servers -------------------------------------------------------------


class HoldFirst(txmgr.Hooks):
    """Before the first transaction proposes commit, lock its slot on every log
    database (a transaction of the test's own), so that its accept round waits."""

    def __init__(self, dsns: list[str]) -> None:
        self.acceptors = dsns
        self.held: list[psycopg.Connection[Any]] = []
        self.first: str | None = None
        self._lock = threading.Lock()

    def before_decision(self, txid: str, lxid: int) -> None:
        with self._lock:
            if self.first is not None:
                return
            self.first = txid
        for dsn in self.acceptors:
            conn = psycopg.connect(dsn)
            conn.execute("SELECT 1 FROM txmgr_paxos WHERE txid = %s FOR UPDATE", (txid,))
            self.held.append(conn)

    def release(self) -> None:
        for conn in self.held:
            conn.rollback()
            conn.close()


def test_commits_that_arrive_during_an_accept_round_share_the_next_one(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any]  # noqa: F811
) -> None:
    bank = make_bank()
    hold = HoldFirst(acceptors)
    # No hedging while the first round is held: it waits on its majority.
    log = txmgr.PaxosLog(acceptors, connect_timeout=10, hedge_after=PATIENCE)
    tm = txmgr.TransactionManager(bank.dsns, log=log, hooks=hold)
    closing.append(tm)
    txids: dict[int, str] = {}

    def one(account: int) -> None:  # accounts apart: no row lock between them
        with tm.transaction() as tx:
            for name, stmts in transfer(account, "a", "b", account=account).items():
                for stmt in stmts:
                    tx.connection(name).execute(stmt)
        txids[account] = tx.txid

    first = threading.Thread(target=one, args=(1,))
    first.start()

    try:
        wait_until("the first accept waits for its slot",
                   lambda: sum(int(query(dsn, "SELECT count(*) FROM pg_stat_activity "
                                              "WHERE datname = current_database() AND "
                                              "wait_event_type = 'Lock'")[0][0])
                               for dsn in acceptors) >= 2)
        others = [threading.Thread(target=one, args=(n,)) for n in (2, 3, 4)]
        for t in others:
            t.start()
        wait_until("three commits queue behind it", lambda: log._combiner.queued() == 3)
    finally:
        hold.release()
    for t in [first, *others]:
        t.join(PATIENCE)
    assert sorted(txids) == [1, 2, 3, 4]
    assert bank.balance("a", 1) == 999 and bank.balance("b", 4) == 1004
    assert bank.total() == bank.expected_total
    later = [txids[n] for n in (2, 3, 4)]
    holding = 0
    for dsn in acceptors:
        rows = dict(query(dsn, "SELECT txid, xmin::text FROM txmgr_paxos "
                               "WHERE txid = ANY(%s) AND accepted_value = 'commit'", (later,)))
        if rows:
            # Accepted on this log database by one statement: one transaction id.
            assert sorted(rows) == sorted(later), rows
            assert len(set(rows.values())) == 1, rows
            holding += 1
    assert holding >= 2  # a majority accepted them
    assert bank.prepared() == []

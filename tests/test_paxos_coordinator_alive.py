"""Paxos mode: recovery tells a live coordinator from a dead one without a clock.

Issue 15, finding 7: a transaction whose coordinator is alive inside the
protocol must never be decided by recovery — not even one whose commit
reached only a minority of the log databases (recovery used to run phase 1
on those at once, and abort them when the acceptor holding the commit was
slow to answer). Issue 16: a dead coordinator's undecided transactions are
rolled back on recovery's next pass, not after a grace period of
``log_idle_timeout`` — also with one of the three log databases down.

Real servers throughout (three log databases, two participants); the tests
use only the public API and the servers' own views, so they hold for any
liveness sign that is right.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

import txmgr
from ops_support import wait_for
from support import MakeBank, query, transfer
from test_paxos_mode import (  # the Paxos fixtures and helpers, shared with the other Paxos tests
    acceptors,  # noqa: F401  (fixture)
    closing,  # noqa: F401  (fixture)
    crash_at,
    paxos_log,
    paxos_prepared,
    proxied,
    proxies,  # noqa: F401  (fixture)
    run,
)
from txmgr.testing.proxy import FaultProxy

#: The coordinator's ballot-0 statements (one transaction's, or combined).
ACCEPT = r'EXECUTE "txmgr_paxos_accept'


def test_recovery_leaves_a_live_coordinator_whose_commit_reached_a_minority(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],  # noqa: F811
    proxies: list[FaultProxy],  # noqa: F811
) -> None:
    """Issue 15, finding 7. The coordinator's ballot 0 reached log database a;
    to b and c it is held up in the network (the coordinator waits, alive). A
    recovery pass with the default grace runs meanwhile, and a is slow to
    answer it (a row lock): the pass must leave the transaction alone. The old
    code ran phase 1 at once because a commit was accepted somewhere, got its
    quorum from b and c (nothing accepted there) and chose abort."""
    bank = make_bank()
    a, b, c = acceptors
    dsns = [a, proxied(proxies, b), proxied(proxies, c)]
    for p in proxies:
        p.add_rule(ACCEPT, "blackhole")
    # ballot0_to="all": the accept goes to a, b and c at once; a long round
    # timeout: the coordinator keeps waiting for b and c.
    tm = txmgr.TransactionManager(
        bank.dsns, log=txmgr.PaxosLog(dsns, connect_timeout=60, ballot0_to="all"),
        connect_timeout=60)
    closing.append(tm)
    observer = paxos_log(closing, acceptors)
    outcome: dict[str, Any] = {}

    def coordinator() -> None:
        try:
            outcome["txid"] = run(tm, transfer(30, "a", "b"))
        except txmgr.TxmgrError as e:
            outcome["error"] = e

    thread = threading.Thread(target=coordinator)
    thread.start()
    lock: psycopg.Connection[Any] | None = None
    try:
        def accepted_on_a() -> str | None:
            st = observer.slots()[0]
            return next((t for t, s in st.slots.items() if s.holds_commit), None)

        txid = wait_for(accepted_on_a, 30, "the coordinator's commit accepted on a")
        lock = psycopg.connect(a)  # a answers recovery's phase 1 late
        lock.execute("SELECT 1 FROM txmgr_paxos WHERE txid = %s FOR UPDATE", (txid,))
        recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                                 log=paxos_log(closing, acceptors)))
        try:
            report = recoverer.run_pass()
        finally:
            recoverer.close()
        assert (report.committed, report.rolled_back) == (0, 0), report.resolutions
        assert report.in_progress == 2
        # No phase 1 either: b and c promised nothing (the coordinator's ballot 0
        # can still be accepted there).
        promised = {st.dsn: st.slots[txid].promised
                    for st in observer.slots([txid])[1:] if txid in st.slots}
        assert promised and set(promised.values()) == {0}, promised
    finally:
        if lock is not None:
            lock.close()
        for p in proxies:
            p.clear_rules()
            p.drop_all()  # the coordinator's accepts to b and c are lost
        thread.join()
    # The coordinator was not overruled: it committed, or (its accepts to b and
    # c lost with their connections) it could not confirm the commit and
    # recovery, once the coordinator is out of the protocol, finishes it as
    # committed (a accepted commit at ballot 0 and answers now).
    assert "txid" in outcome or isinstance(outcome.get("error"), txmgr.OutcomeUnknown), outcome
    if "txid" not in outcome:
        recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                                 log=paxos_log(closing, acceptors)),
                                    paxos_grace=0)
        try:
            recoverer.run_pass()
        finally:
            recoverer.close()
    assert (bank.balance("a"), bank.balance("b")) == (970, 1030)
    assert paxos_prepared(bank) == []


def beacons_free(dsns: list[str]) -> bool:
    """No advisory lock is held in these (test-private) log databases: no
    coordinator process holds a liveness lock there any more."""
    return all(not query(d, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND database = "
                            "(SELECT oid FROM pg_database WHERE datname = current_database())")
               for d in dsns)


@pytest.mark.parametrize("down", [False, True])
def test_a_dead_coordinators_transaction_is_rolled_back_on_the_next_pass(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],  # noqa: F811
    proxies: list[FaultProxy],  # noqa: F811
    down: bool,
) -> None:
    """Issue 16. The coordinator dies with every branch prepared and nothing
    proposed (with one of the three log databases down for everyone, too):
    the first recovery pass, with the default grace (the log's 60 s idle
    timeout), rolls it back — its coordinator is known to be gone. The old
    code left the branches prepared, holding their locks, for the grace."""
    bank = make_bank()
    dsns = [proxied(proxies, acceptors[0]), acceptors[1], acceptors[2]]
    if down:
        proxies[0].stop()
    # Two transactions, on different rows (a prepared branch keeps its row locks).
    txids = [crash_at(bank, dsns, "before_decision", transfer(30, "a", "b", account))
             for account in (1, 2)]
    # The dead processes' connections are closed; wait until the servers have
    # ended their sessions (a condition, not a time).
    wait_for(lambda: beacons_free(acceptors), 30, "the dead coordinators' sessions to end")
    assert len(paxos_prepared(bank)) == 4
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns,
                                             log=paxos_log(closing, dsns)))
    try:
        report = recoverer.run_pass()
    finally:
        recoverer.close()
    assert (report.committed, report.rolled_back) == (0, 4), report.resolutions
    assert {r.txid for r in report.resolutions} == set(txids)
    assert paxos_prepared(bank) == []
    assert bank.total() == bank.expected_total
    assert [bank.balance(p, n) for p in ("a", "b") for n in (1, 2)] == [1000] * 4

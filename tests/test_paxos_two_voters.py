"""A transaction registered while one of three log databases was down: its limit.

Found by the Paxos-mode torture (``txmgr torture --log paxos``): a transaction
whose gids name only **two** voters has a quorum of two out of two. Losing
either voter later blocks it — for as long as that log database is down, and
for good once it was wiped — although a majority of the log databases
answers. That is Paxos with three acceptors: it survives one failure, and
the transaction's first one happened at registration. No safe protocol can
do better (its third log database never promised anything for it), so txmgr
keeps such transactions rare — registration waits up to ``ahead_linger`` for
every log database it asks, so only a database that is really down is left
out — and says what they need: recovery reports them undecided with the
reason, finishes them once the voter returns, and after a wipe an operator's
``txmgr resolve --force`` ends them (README: "Paxos mode", "Limits").

At the time of the finding (registration moved on 50 ms after two answers), a
third to three quarters of the torture's transactions had two voters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import KILLED_COORDINATOR, START, Bank, MakeBank, query, run_coordinator, transfer
from txmgr.failpoints import CRASH_EXIT
from txmgr.paxos import PAXOS_GID_PREFIX, PaxosGid
from txmgr.resolve import resolve
from txmgr.testing import Server
from txmgr.testing.proxy import FaultProxy
from txmgr.testing.pytest_plugin import MakeDatabase

EVERY_STATEMENT = r"\S"


@pytest.fixture
def logs(
    make_database: MakeDatabase, pg_servers: list[Server]
) -> Iterator[tuple[list[str], list[FaultProxy], list[Server]]]:
    """Three migrated log databases, each behind a proxy of its own: (proxied DSNs,
    proxies, the server of each)."""
    servers = [pg_servers[i % len(pg_servers)] for i in range(3)]
    direct = [make_database(s) for s in servers]
    proxies: list[FaultProxy] = []
    try:
        for dsn in direct:
            txmgr.migrate(dsn)
            params = conninfo_to_dict(dsn)
            proxies.append(FaultProxy(str(params["host"]), int(str(params["port"]))).start())
        yield [p.dsn(d) for p, d in zip(proxies, direct, strict=True)], proxies, servers
    finally:
        for p in proxies:
            p.stop()


def _two_voter_transaction(bank: Bank, dsns: list[str], cut_off: FaultProxy) -> PaxosGid:
    """A coordinator that registers while the third log database refuses every
    statement, prepares both branches and crashes before proposing commit."""
    refuse = cut_off.add_rule(EVERY_STATEMENT, "drop_before", times=None)
    spec = {"participants": bank.dsns, "log": {"paxos": dsns, "connect_timeout": 2},
            "statements": transfer(30, "a", "b"), "failpoint": "before_decision"}
    txid = run_coordinator(KILLED_COORDINATOR, spec, exit_code=CRASH_EXIT, timeout=120)
    cut_off.remove_rule(refuse)
    gids = [PaxosGid.parse(g) for g in _prepared(bank)]
    assert len(gids) == 2 and all(g is not None and g.txid == txid for g in gids), gids
    gid = gids[0]
    assert gid is not None
    assert (len(gid.voters), gid.voters.quorum) == (2, 2)  # two voters, both needed
    return gid


def _prepared(bank: Bank) -> list[str]:
    return sorted(r[0] for dsn in bank.dsns.values()
                  for r in query(dsn, "SELECT gid FROM pg_prepared_xacts "
                                      "WHERE starts_with(gid, %s)", (PAXOS_GID_PREFIX,)))


def _recover(bank: Bank, dsns: list[str], passes: int = 3) -> list[Any]:
    """Recovery passes with no grace (the coordinator is dead); their reports."""
    log = txmgr.PaxosLog(dsns, connect_timeout=3)
    recoverer = txmgr.Recoverer(txmgr.Config(participants=bank.dsns, log=log), paxos_grace=0)
    try:
        return [recoverer.run_pass() for _ in range(passes)]
    finally:
        recoverer.close()
        log.close()


def test_a_two_voter_transaction_waits_for_its_lost_voter_then_finishes(
    make_bank: MakeBank, logs: tuple[list[str], list[FaultProxy], list[Server]]
) -> None:
    dsns, proxies, _ = logs
    bank = make_bank()
    _two_voter_transaction(bank, dsns, cut_off=proxies[2])
    down = proxies[1].add_rule(EVERY_STATEMENT, "drop_before", times=None)  # a voter
    try:
        reports = _recover(bank, dsns, passes=1)
        # Logs 0 and 2 answer, a majority of the three, but not of its voters:
        # recovery may not guess, and says why.
        assert all(r.log_reachable for r in reports)
        assert len(_prepared(bank)) == 2
        details = {r.detail for r in reports[0].resolutions}
        assert details == {"undecided: only 1 of its 2 log databases answered, 2 are needed"}
    finally:
        proxies[1].remove_rule(down)
    reports = _recover(bank, dsns, passes=1)  # the voter is back: it is finished
    assert _prepared(bank) == [], [r.resolutions for r in reports]
    assert (bank.balance("a"), bank.balance("b")) == (START, START)  # never proposed: abort


def test_a_wiped_voter_strands_a_two_voter_transaction_until_an_operator_resolves_it(
    make_bank: MakeBank, logs: tuple[list[str], list[FaultProxy], list[Server]]
) -> None:
    dsns, proxies, servers = logs
    bank = make_bank()
    _two_voter_transaction(bank, dsns, cut_off=proxies[2])
    # Log 1 loses its disk: the operator re-creates it empty, as the README says.
    name = str(conninfo_to_dict(dsns[1])["dbname"])
    servers[1].drop_database(name)
    servers[1].execute_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    txmgr.migrate(servers[1].dsn(name))
    reports = _recover(bank, dsns, passes=1)
    assert all(r.log_reachable for r in reports)  # all three answer
    assert len(_prepared(bank)) == 2  # but only one of its voters: stranded
    # The operator's way out: no majority of this log can ever decide it, so
    # resolve accepts a forced decision (and refuses it without --force).
    log = txmgr.PaxosLog(dsns, connect_timeout=3)
    config = txmgr.Config(participants=bank.dsns, log=log)
    try:
        first = _prepared(bank)[0]
        with pytest.raises(txmgr.TxmgrError, match="--force"):
            resolve(config, first, commit=False)
        for gid in _prepared(bank):
            result = resolve(config, gid, commit=False, force=True, reason="voter wiped")
            assert result.forced and result.outcome == "done"
    finally:
        log.close()
    assert _prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START, START)

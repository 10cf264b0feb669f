"""Recovery of hundreds of in-doubt branches at once (pipelined), exact per branch.

Mixed decisions — committed, aborted, still in progress — and a concurrent
session that finishes some branches while the pass runs. Every branch must end
exactly as its decision says, recovery must report each one exactly as it
happened (committed / rolled back / already finished / in progress), and the
kept connections must work for the next pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

import txmgr
from support import own_server, query
from txmgr._gid import Gid, new_txid
from txmgr.testing import PgServer
from txmgr.testing.pytest_plugin import MakeDatabase

PARTICIPANTS = ("a", "b")
TRANSACTIONS = 160  # two branches each, minus the ones already gone: about 300 in doubt


@pytest.fixture(scope="module")
def big_server() -> Iterator[PgServer]:
    """A server that can hold every branch of both participants prepared at once."""
    with own_server(max_prepared_transactions=2 * TRANSACTIONS + 20) as server:
        yield server


@dataclass
class Txn:
    txid: str
    decision: str  # "commit", "abort" or "open" (its decision transaction still running)
    participants: tuple[str, ...]  # where it still has a prepared branch


def _prepare(conn: psycopg.Connection[Any], gid: str, txid: str) -> None:
    """A prepared branch that records ``txid`` in its participant when committed."""
    conn.execute(sql.SQL(
        "BEGIN; INSERT INTO done (txid) VALUES ({}); PREPARE TRANSACTION {}"
    ).format(sql.Literal(txid), sql.Literal(gid)))


def _finish(conn: psycopg.Connection[Any], gid: str, commit: bool) -> bool:
    """Finish a branch the way a live coordinator would; False if it was already gone."""
    verb = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
    try:
        conn.execute(sql.SQL(verb).format(sql.Literal(gid)))
    except psycopg.errors.UndefinedObject:
        return False
    return True


def test_hundreds_of_in_doubt_branches_end_exactly_as_decided(
    big_server: PgServer, make_database: MakeDatabase
) -> None:
    rng = random.Random(6)
    dsns = {name: make_database(big_server) for name in PARTICIPANTS}
    log_dsn = make_database(big_server)
    for dsn in dsns.values():
        query(dsn, "CREATE TABLE done (txid text NOT NULL, UNIQUE (txid))")
    txmgr.migrate(log_dsn)
    config = txmgr.Config(participants=dsns, log=log_dsn)
    logid = query(log_dsn, "SELECT logid FROM txmgr_log_meta")[0][0]

    # Decision transactions still running hold their (uncommitted) rows open.
    open_decisions = [psycopg.connect(log_dsn) for _ in range(4)]
    conns = {name: psycopg.connect(dsn, autocommit=True) for name, dsn in dsns.items()}
    txns: list[Txn] = []
    gids: dict[tuple[str, str], str] = {}  # (txid, participant) -> gid
    try:
        with psycopg.connect(log_dsn, autocommit=True) as log:
            for i in range(TRANSACTIONS):
                txid = new_txid()
                decision = rng.choices(["commit", "abort", "open"], [5, 4, 1])[0]
                insert = ("INSERT INTO txmgr_decision (txid, lxid, participants) "
                          "VALUES (%s, pg_current_xact_id(), %s) RETURNING lxid::text")
                if decision == "open":
                    conn = open_decisions[i % len(open_decisions)]
                    lxid = int(conn.execute(insert, (txid, list(PARTICIPANTS))).fetchone()[0])  # type: ignore[index]
                else:
                    log.execute("BEGIN")
                    lxid = int(log.execute(insert, (txid, list(PARTICIPANTS))).fetchone()[0])  # type: ignore[index]
                    log.execute("COMMIT" if decision == "commit" else "ROLLBACK")
                # A coordinator that crashed between two COMMIT PREPAREDs left one branch.
                gone = {"a"} if decision == "commit" and i % 7 == 0 else set()
                for name in PARTICIPANTS:
                    gid = gids[txid, name] = str(Gid(logid, txid, lxid, name))
                    _prepare(conns[name], gid, txid)
                    if name in gone:
                        assert _finish(conns[name], gid, commit=True)
                txns.append(Txn(txid, decision, tuple(p for p in PARTICIPANTS if p not in gone)))

        in_doubt = [(t, p) for t in txns for p in t.participants]
        assert len(in_doubt) > 250
        # While the pass runs, another session finishes some decided branches (as a
        # slow coordinator would); whoever comes second is told it is already gone.
        racing = rng.sample([(t, p) for t, p in in_doubt if t.decision != "open"], 40)
        finished_by_other: set[tuple[str, str]] = set()

        def race(res: txmgr.Resolution) -> None:
            if racing:
                batch = racing[:]
                racing.clear()
                for t, p in batch:
                    if _finish(conns[p], gids[t.txid, p], commit=t.decision == "commit"):
                        finished_by_other.add((t.txid, p))

        recoverer = txmgr.Recoverer(config, on_resolution=race)
        try:
            report = recoverer.run_pass()
            assert report.ok, report.errors
            assert finished_by_other, "the concurrent session finished nothing"
            outcomes = {(r.txid, r.participant): r.outcome for r in report.resolutions}
            assert len(report.resolutions) == len(outcomes) == len(in_doubt)
            for t, p in in_doubt:
                if t.decision == "open":
                    expected = "in progress"
                elif (t.txid, p) in finished_by_other:
                    expected = "already finished"
                else:
                    expected = "committed" if t.decision == "commit" else "rolled back"
                assert outcomes[t.txid, p] == expected, (t, p)

            # The data says the same: a branch's row exists iff its decision committed.
            committed = {t.txid for t in txns if t.decision == "commit"}
            for name, dsn in dsns.items():
                rows = {r[0] for r in query(dsn, "SELECT txid FROM done")}
                assert rows == committed, name
            still = {(t.txid, p) for t, p in in_doubt if t.decision == "open"}
            assert _prepared(dsns) == {gids[k] for k in still}
            # Committed decisions are finished everywhere: their rows are gone.
            assert report.decisions_deleted == len(committed)
            assert query(log_dsn, "SELECT count(*) FROM txmgr_decision") == [(0,)]

            # The open decisions end now (half commit, half abort); the same
            # Recoverer, on its kept connections, finishes them on its next pass.
            for i, conn in enumerate(open_decisions):
                conn.commit() if i % 2 == 0 else conn.rollback()
            decided = {t.txid: i % len(open_decisions) % 2 == 0
                       for i, t in enumerate(txns) if t.decision == "open"}
            report = recoverer.run_pass()
        finally:
            recoverer.close()
        assert report.ok, report.errors
        assert sorted((r.txid, r.outcome) for r in report.resolutions) == sorted(
            (txid, "committed" if commit else "rolled back")
            for txid, commit in decided.items() for _ in PARTICIPANTS
        )
        assert _prepared(dsns) == set()
        committed |= {txid for txid, commit in decided.items() if commit}
        for dsn in dsns.values():
            assert {r[0] for r in query(dsn, "SELECT txid FROM done")} == committed
    finally:
        for conn in [*open_decisions, *conns.values()]:
            conn.close()


def test_a_participant_lost_after_listing_costs_one_connection_attempt(
    big_server: PgServer, make_database: MakeDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many branches on a participant that goes away between listing and finishing:
    each of its branches is reported as an error after one reconnection attempt (not
    one per branch), the other participant's branches are finished, the decisions
    stay, and the next pass finishes the rest."""
    dsns = {name: make_database(big_server) for name in PARTICIPANTS}
    log_dsn = make_database(big_server)
    for dsn in dsns.values():
        query(dsn, "CREATE TABLE done (txid text NOT NULL)")
    txmgr.migrate(log_dsn)
    logid = query(log_dsn, "SELECT logid FROM txmgr_log_meta")[0][0]
    txids = []
    conns = {name: psycopg.connect(dsn, autocommit=True) for name, dsn in dsns.items()}
    with psycopg.connect(log_dsn, autocommit=True) as log:
        for _ in range(40):
            txid = new_txid()
            log.execute("BEGIN")
            lxid = int(log.execute(  # type: ignore[index]
                "INSERT INTO txmgr_decision (txid, lxid, participants) "
                "VALUES (%s, pg_current_xact_id(), %s) RETURNING lxid::text",
                (txid, list(PARTICIPANTS))).fetchone()[0])
            log.execute("COMMIT")
            for name in PARTICIPANTS:
                _prepare(conns[name], str(Gid(logid, txid, lxid, name)), txid)
            txids.append(txid)
    for conn in conns.values():
        conn.close()

    from txmgr.participant import list_prepared as real_list
    attempts: list[str] = []
    from txmgr.participant import connect as real_connect

    def list_then_cut_b(conn: psycopg.Connection[Any], prefix: str, **kw: Any) -> Any:
        listed = real_list(conn, prefix, **kw)
        if conn.info.dbname == _dbname(dsns["b"]):
            # b is listed; now its sessions are cut and no new one is let in.
            _allow_connections(dsns["a"], dsns["b"], False)
            query(dsns["a"], "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s", (_dbname(dsns["b"]),))
        return listed

    def counting_connect(dsn: str, name: str, **kwargs: Any) -> psycopg.Connection[Any]:
        attempts.append(name)
        return real_connect(dsn, name, **kwargs)

    monkeypatch.setattr("txmgr.recovery.list_prepared", list_then_cut_b)
    monkeypatch.setattr("txmgr._connections.connect", counting_connect)
    config = txmgr.Config(participants=dsns, log=log_dsn)
    recoverer = txmgr.Recoverer(config)
    try:
        report = recoverer.run_pass()
        outcomes = {(r.participant, r.outcome) for r in report.resolutions}
        assert outcomes == {("a", "committed"), ("b", "error")}
        assert report.committed == 40 and len(report.errors) == 40
        assert attempts.count("b") <= 2, attempts  # the first connection and one retry
        assert report.decisions_deleted == 0  # b's branches are still prepared
        assert _prepared({"a": dsns["a"]}) == set()
        assert query(dsns["a"], "SELECT count(*) FROM pg_prepared_xacts WHERE database = %s",
                     (_dbname(dsns["b"]),)) == [(40,)]  # untouched

        _allow_connections(dsns["a"], dsns["b"], True)
        monkeypatch.setattr("txmgr.recovery.list_prepared", real_list)
        report = recoverer.run_pass()
    finally:
        _allow_connections(dsns["a"], dsns["b"], True)
        recoverer.close()
    assert report.ok, report.errors
    assert {(r.participant, r.outcome) for r in report.resolutions} == {("b", "committed")}
    assert report.committed == 40 and report.decisions_deleted == 40
    assert _prepared(dsns) == set()
    for dsn in dsns.values():
        assert {r[0] for r in query(dsn, "SELECT txid FROM done")} == set(txids)


def _allow_connections(admin_dsn: str, dsn: str, allow: bool) -> None:
    """ALTER DATABASE … ALLOW_CONNECTIONS, run from another database of the server."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(_dbname(dsn)), sql.SQL("true" if allow else "false")))


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def _prepared(dsns: dict[str, str]) -> set[str]:
    return {r[0] for dsn in dsns.values()
            for r in query(dsn, "SELECT gid FROM pg_prepared_xacts "
                                "WHERE database = current_database()")}

"""Paxos mode on real servers: the SQL acceptor, and PaxosLog over three log databases.

The acceptor databases are fresh databases on the session's servers; faults
come from :class:`~txmgr.testing.proxy.FaultProxy` (a stopped proxy is a log
database that is down; a rule swallows or blackholes chosen statements), from
dropping a database (down, or wiped when it is re-created), or from a private
server that is stopped and started again.
"""

from __future__ import annotations

import importlib.util
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import txmgr.paxos
from txmgr._multiplex import Job, run_all
from txmgr.errors import ConfigError, LogSchemaError
from txmgr.paxos import LogQuorumUnavailable, PaxosLog, Value, Voters
from txmgr.paxos._acceptor import (
    Answer,
    accept_many_query,
    accept_query,
    encode,
    forget_query,
    parse,
    prepare_query,
    read_query,
    register_many_query,
    register_query,
    run_quorum,
)
from txmgr.paxos._core import ABORT, AcceptorRules, Slot, ballot, plan_cleanup
from txmgr.paxos._schema import UPGRADE_0004, install, read_incarnation
from txmgr.testing import PgServer, Server
from txmgr.testing.proxy import FaultProxy
from txmgr.testing.pytest_plugin import MakeDatabase

COMMIT = Value.commit(["billing", "orders"])
ACCEPT0 = r"EXECUTE \"?txmgr_paxos_accept\"?\('[0-9a-f]{16}', 0,"  # the coordinator's ballot 0

#: The coordinator key the statements here register under: no process holds
#: its liveness lock (these tests are about the acceptor rules, not liveness).
NO_BEACON = 1


def run(conn: psycopg.Connection[Any], query: sql.Composed) -> Answer:
    """One acceptor statement, the way PaxosLog sends it."""
    job = Job(conn, encode(conn, query.as_bytes(conn)))
    run_all([job])
    if job.error is not None:
        raise job.error
    return parse(job.rows)


def new_txid() -> str:
    return secrets.token_hex(8)


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def proxy_for(dsn: str) -> FaultProxy:
    params = conninfo_to_dict(dsn)
    return FaultProxy(str(params["host"]), int(str(params["port"]))).start()


@pytest.fixture
def acceptor_dsns(make_database: MakeDatabase, pg_servers: list[Server]) -> list[str]:
    """Three migrated acceptor databases, spread over the session's servers."""
    dsns = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    for dsn in dsns:
        install(dsn)
    return dsns


@pytest.fixture
def logs() -> Iterator[list[PaxosLog]]:
    """Collects PaxosLogs to close (before the databases are dropped)."""
    made: list[PaxosLog] = []
    yield made
    for log in made:
        log.close()


def open_log(logs: list[PaxosLog], dsns: list[str], **kwargs: Any) -> PaxosLog:
    # A long linger: every acceptor that answers at all registers (the machine
    # may be slow); only the dead ones are left out.
    # Ballot 0 to every voter, as these tests expect of the slots they read;
    # ballot 0 to a majority has tests of its own (and is the managers' default).
    log = PaxosLog(dsns, connect_timeout=5, **{"linger": 10.0, "ballot0_to": "all", **kwargs})
    logs.append(log)
    return log


def settle(log: PaxosLog) -> None:
    """Let the statements a round did not wait for (beyond its quorum) finish."""
    wait_until(lambda: log.collector.pending() == 0)


# -- the SQL acceptor is the pure acceptor ----------------------------------------------


def test_sql_acceptor_agrees_with_the_pure_rules(make_database: MakeDatabase) -> None:
    dsn = make_database()
    install(dsn)
    rules = AcceptorRules()
    model: dict[str, Slot] = {}
    rng = random.Random(20240607)
    txids = [new_txid() for _ in range(4)]
    ballots = [0, 1, ballot(1, 3), ballot(1, 9), ballot(2, 0), ballot(7, 1)]
    values = [ABORT, COMMIT, Value.commit(["x"])]
    with psycopg.connect(dsn, autocommit=True) as conn:
        incarnation = read_incarnation(conn, dsn)
        for step in range(400):
            op = rng.choice(["register", "register_many", "prepare", "accept", "accept",
                             "accept_many", "forget", "forget_all"])
            t = rng.choice(txids)
            if op == "accept_many":  # combined commits: the rule for each txid, one ballot,
                # and the deletions riding along (other txids only)
                batch = rng.sample(txids, rng.randint(1, len(txids)))
                b = rng.choice(ballots)
                accepts = [(x, rng.choice(values)) for x in batch]
                gone = [x for x in txids if x not in batch and rng.random() < 0.3]
                answer = run(conn, accept_many_query(accepts, b, forget=gone))
                assert answer.incarnation == incarnation
                assert sorted(answer.replies) == sorted(batch)
                for x in gone:
                    model.pop(x, None)
                for x, v in accepts:
                    new_slot, want = rules.accept(model.get(x), b, v)
                    assert answer.replies[x] == want, (step, op, x)
                    if new_slot is not None:
                        model[x] = new_slot
                everything = run(conn, read_query(txids)).replies
                assert {x: r.slot for x, r in everything.items() if r.status == "ok"} == model
                continue
            if op == "register_many":  # the same rule for each txid, in one statement
                batch = rng.sample(txids, rng.randint(1, len(txids)))
                answer = run(conn, register_many_query(batch, NO_BEACON))
                assert answer.incarnation == incarnation
                for x in batch:
                    new_slot, want = rules.register(model.get(x))
                    assert answer.replies[x] == want, (step, op, x)
                    assert new_slot is not None
                    model[x] = new_slot
                continue
            if op == "register":
                expected = rules.register(model.get(t))
                answer = run(conn, register_query(t, NO_BEACON))
            elif op == "prepare":
                b = rng.choice(ballots[1:])
                expected = rules.prepare(model.get(t), b)
                answer = run(conn, prepare_query(t, b))
            elif op == "accept":
                b, v = rng.choice(ballots), rng.choice(values)
                expected = rules.accept(model.get(t), b, v)
                answer = run(conn, accept_query(t, b, v))
            else:
                keep = op == "forget"
                expected = rules.forget(model.get(t), keep_commit=keep)
                answer = run(conn, forget_query([t], keep_commit=keep))
            assert answer.incarnation == incarnation
            new, reply = expected
            assert answer.replies[t] == reply, (step, op, t)
            if new is None:
                model.pop(t, None)
            else:
                model[t] = new
            # The whole state agrees too, not only the reply.
            everything = run(conn, read_query(txids)).replies
            assert {x: r.slot for x, r in everything.items() if r.status == "ok"} == model
            assert {x for x, r in everything.items() if r.status == "gone"} == \
                set(txids) - set(model)
        statuses = {r.status for r in run(conn, read_query(txids)).replies.values()}
        assert statuses  # the sequence ended somewhere definite


def test_registration_commits_asynchronously_and_decisions_durably(
    make_database: MakeDatabase,
) -> None:
    dsn = make_database()
    install(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A SET LOCAL at the head of a simple-protocol query applies to the
        # implicit transaction of the statements after it, and only to it.
        for setting in ("off", "on"):
            job = Job(conn, f"SET LOCAL synchronous_commit = {setting}; "
                            "SELECT current_setting('synchronous_commit')".encode())
            run_all([job])
            assert job.rows == [(setting,)]
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    t = new_txid()
    assert "SET LOCAL synchronous_commit = off; EXECUTE " in register_query(
        t, NO_BEACON).as_string()
    durable = (prepare_query(t, 5), accept_query(t, 0, COMMIT), forget_query([t],
                                                                             keep_commit=True))
    for query in durable:
        assert "SET LOCAL synchronous_commit = on; EXECUTE " in query.as_string()
    # Even where the database's default is off (or a pooler dropped startup
    # options), a durable statement commits durably: its own SET LOCAL wins.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
            sql.Identifier(dbname(dsn))))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    log = PaxosLog([dsn, dsn + "_b", dsn + "_c"], connect_timeout=5)
    try:
        conn = log.links[0].checkout(5)
        assert conn is not None
        try:
            for query in durable:
                head = query.as_string(conn).split("EXECUTE ", 1)[0]
                job = Job(conn, (head + "SELECT current_setting('synchronous_commit')").encode())
                run_all([job])
                assert job.rows == [("on",)]
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)  # no leak
        finally:
            log.links[0].release(conn, broken=False)
    finally:
        log.close()


def test_the_acceptor_statements_find_slots_by_key(make_database: MakeDatabase) -> None:
    # With the statistics of a small table, generic plans would scan it whole
    # on every statement (and it grows with dead rows between vacuums); the
    # settings every statement is sent with keep them to lookups by txid.
    dsn = make_database()
    install(dsn)
    txids = [new_txid() for _ in range(1000)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        run(conn, register_many_query(txids, NO_BEACON))
        conn.execute("ANALYZE txmgr_paxos")
    statements = [
        accept_query(txids[0], 0, COMMIT, forget=txids[1:3]),
        accept_many_query([(txids[3], COMMIT), (txids[4], ABORT)], 0, forget=txids[5:7]),
        prepare_query(txids[8], 5),
        read_query(txids[9:12]),
        forget_query(txids[12:15], keep_commit=True),
        register_many_query([new_txid(), txids[16]], NO_BEACON),
    ]
    log = PaxosLog([dsn, dsn + "_b", dsn + "_c"], connect_timeout=5)
    try:
        conn = log.links[0].checkout(5)
        assert conn is not None
        try:
            run(conn, read_query([txids[0]]))  # prepares the statements
            for statement in statements:
                # Explained behind the settings the statement is sent with.
                head, body = statement.as_string(conn).split("EXECUTE ", 1)
                job = Job(conn, f"{head}EXPLAIN EXECUTE {body}".encode())
                run_all([job])
                assert job.rows is not None and job.error is None, job.error
                plan = "\n".join(str(r[0]) for r in job.rows)
                assert "Seq Scan on txmgr_paxos " not in plan, plan
                assert "Index Scan using txmgr_paxos_pkey" in plan, plan
        finally:
            log.links[0].release(conn, broken=False)
    finally:
        log.close()


def test_schema_check_and_migration_file(make_database: MakeDatabase) -> None:
    import sqlalchemy as sa
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(LogSchemaError, match="txmgr migrate"):
            read_incarnation(conn, dsn)
    migration = _load_migration()
    assert (migration.revision, migration.down_revision) == ("0003", "0002")
    engine = sa.create_engine("postgresql+psycopg://",
                              creator=lambda: psycopg.connect(dsn), poolclass=sa.NullPool)

    def step(name: str) -> None:
        with engine.begin() as connection:
            with Operations.context(MigrationContext.configure(connection)):
                getattr(migration, name)()

    try:
        step("upgrade")
        upgrade_0004(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            first = read_incarnation(conn, dsn)
            run(conn, register_query(new_txid(), NO_BEACON))
        with pytest.raises(LogSchemaError, match="1 transaction slot"):
            step("downgrade")  # a slot may be an in-doubt decision: refused
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM txmgr_paxos")
        step("downgrade")
        step("upgrade")
        upgrade_0004(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert read_incarnation(conn, dsn) != first  # re-created: a new acceptor
    finally:
        engine.dispose()


def upgrade_0004(dsn: str) -> None:
    """Revision 0004 (the slot's coordinator key), which the statements need."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in UPGRADE_0004:
            conn.execute(statement)


def _load_migration() -> ModuleType:
    path = Path(txmgr.__file__).parent / "migrations" / "versions" / "0003_paxos_acceptor.py"
    spec = importlib.util.spec_from_file_location("txmgr_migration_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- PaxosLog -----------------------------------------------------------------------------


def test_commit_learn_status_forget(acceptor_dsns: list[str], logs: list[PaxosLog]) -> None:
    log = open_log(logs, acceptor_dsns)
    incarnations = log.check()
    assert len(set(incarnations.values())) == 3
    t = new_txid()
    voters = log.begin(t)
    assert voters == Voters(2, tuple(sorted(incarnations.values())))
    out = log.propose_commit(t, voters, ["orders", "billing"])
    assert (out.decision, out.ballot, out.value) == ("commit", 0, COMMIT)
    assert log.learn({t: voters})[t].decision == "commit"
    settle(log)
    status = log.slots([t])
    assert [s.slots[t] for s in status] == [Slot(0, 0, COMMIT)] * 3
    # Cleanup rides on the next decision.
    t2 = new_txid()
    v2 = log.begin(t2)
    assert log.propose_commit(t2, v2, ["orders", "billing"], forget=[t]).commits
    settle(log)
    assert all(t not in s.slots and t2 in s.slots for s in log.slots())
    report = log.forget([t2])
    assert report.deleted == {t2: 3} and not report.unreachable
    assert all(not s.slots for s in log.slots())
    # A transaction nobody decided is "undecided" to a reader, not aborted.
    t3 = new_txid()
    v3 = log.begin(t3)
    assert log.learn({t3: v3})[t3].decision == "undecided"
    assert log.recover(t3, v3, preempt=False).decision == "undecided"
    out = log.recover(t3, v3)  # recovery decides: nothing accepted, so abort
    assert out.decision == "abort"
    late = log.propose_commit(t3, v3, ["orders"])
    assert late.decision == "abort"  # the preempted coordinator learns the truth


def test_registration_rides_with_the_votes(
    make_database: MakeDatabase, acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    """The coordinator sends the registration in the round trip of its votes."""
    log = open_log(logs, acceptor_dsns)
    t = new_txid()
    with psycopg.connect(make_database(), autocommit=True) as branch:
        branch.execute("BEGIN")
        vote = Job(branch, b"SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
        reg = log.registration(t)
        assert len(reg.jobs) == 3
        stragglers = run_quorum([vote, *reg.jobs],
                                enough=lambda done: vote in done and reg.enough(done),
                                linger=0.05, timeout=10)
        voters = reg.finish(stragglers)
        assert vote.rows == [("f",)]
        assert len(voters) == 3 - len(stragglers)  # a slow one may be given up on
        branch.execute("ROLLBACK")
    assert log.propose_commit(t, voters, ["orders"]).commits


def test_forget_keeps_commits_and_young_slots(acceptor_dsns: list[str],
                                               logs: list[PaxosLog]) -> None:
    log = open_log(logs, acceptor_dsns)
    committed, idle = new_txid(), new_txid()
    for dsn in acceptor_dsns:  # ballot 0 reached all three (not just a quorum)
        with psycopg.connect(dsn, autocommit=True) as conn:
            run(conn, register_query(committed, NO_BEACON))
            run(conn, accept_query(committed, 0, COMMIT))
            run(conn, register_query(idle, NO_BEACON))
    young = log.forget([committed, idle], keep_commit=True, min_age=3600)
    assert young.deleted == {} and young.kept == {committed, idle}
    kept = log.forget([committed, idle], keep_commit=True)
    assert kept.deleted == {idle: 3} and kept.kept == {committed}
    assert log.forget([committed]).deleted == {committed: 3}


def test_a_returning_log_databases_stale_slots_are_cleaned_up(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    a, b, c = acceptor_dsns
    proxy = proxy_for(c)
    log = open_log(logs, [a, b, proxy.dsn(c)])
    missed, held = new_txid(), new_txid()
    v1, v2 = log.begin(missed), log.begin(held)
    proxy.add_rule(ACCEPT0, "drop_before")  # c misses the first ballot 0 …
    assert log.propose_commit(missed, v1, ["orders", "billing"]).commits
    # … not the second (sent by another coordinator: this one lets c rest a while)
    other = open_log(logs, [a, b, proxy.dsn(c)])
    assert other.propose_commit(held, v2, ["orders", "billing"]).commits
    settle(other)
    proxy.stop()  # c goes down before the slots are deleted
    report = log.forget([missed, held])
    assert report.deleted == {missed: 2, held: 2} and len(report.unreachable) == 1
    # c comes back with what it had: what recovery's cleanup does about it.
    back = open_log(logs, [a, b, c])
    found: dict[str, list[tuple[Slot, float]]] = {}
    for state in back.slots():
        for txid, slot in state.slots.items():
            found.setdefault(txid, []).append((slot, state.ages[txid]))
    assert found.keys() == {missed, held}
    assert found[held][0][0].holds_commit and not found[missed][0][0].holds_commit
    plan = plan_cleanup(found, prepared=[], answered=["orders", "billing"], grace=0)
    assert plan.finished == {held} and plan.idle == {missed}
    back.forget(sorted(plan.finished))
    back.forget(sorted(plan.idle), keep_commit=True)
    assert all(not state.slots for state in back.slots())


def test_same_database_twice_is_refused(acceptor_dsns: list[str], logs: list[PaxosLog]) -> None:
    with pytest.raises(ConfigError, match="odd number"):
        PaxosLog(acceptor_dsns[:2])
    with pytest.raises(ConfigError, match="listed twice"):
        PaxosLog([acceptor_dsns[0], acceptor_dsns[0], acceptor_dsns[1]])
    # The same database under another spelling of its DSN.
    params = conninfo_to_dict(acceptor_dsns[0])
    other = make_conninfo("", **{**params, "application_name": "again"})
    log = open_log(logs, [acceptor_dsns[0], other, acceptor_dsns[1]])
    with pytest.raises(ConfigError, match="same database"):
        log.check()


def test_schema_missing_on_one_is_tolerated(
    make_database: MakeDatabase, acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    bare = make_database()
    log = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], bare])
    assert len(log.check()) == 2  # one log database not migrated yet: like one down
    t = new_txid()
    voters = log.begin(t)
    assert len(voters) == 2
    assert log.propose_commit(t, voters, ["orders"]).commits
    worse = open_log(logs, [acceptor_dsns[0], bare, make_database()])
    with pytest.raises(LogSchemaError, match="txmgr migrate"):
        worse.check()


def test_one_log_database_down(acceptor_dsns: list[str], logs: list[PaxosLog]) -> None:
    proxy = proxy_for(acceptor_dsns[2])
    log = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], proxy.dsn(acceptor_dsns[2])])
    t = new_txid()
    assert len(log.begin(t)) == 3
    proxy.stop()  # down: connections are refused, and open ones are gone
    for _ in range(5):
        t = new_txid()
        voters = log.begin(t)
        assert len(voters) == 2
        assert log.propose_commit(t, voters, ["orders", "billing"]).commits
    down = log.slots()[2]
    assert down.error is not None and not down.slots


def test_two_log_databases_down(
    pg_servers: list[Server], acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    pg_servers[1 % len(pg_servers)].drop_database(dbname(acceptor_dsns[1]))
    pg_servers[0].drop_database(dbname(acceptor_dsns[2]))
    pg_server = pg_servers[0]
    log = open_log(logs, acceptor_dsns)
    with pytest.raises(LogQuorumUnavailable) as caught:
        log.begin(new_txid())
    message = str(caught.value)
    assert "only 1 of 3 Paxos log databases" in message and "2 are needed" in message
    assert "nothing was prepared" in message
    password = pg_server.password
    assert not password or password not in message
    assert (caught.value.answered, caught.value.needed) == (1, 2)


def test_two_down_after_registration_then_one_returns(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    a, b, c = acceptor_dsns
    proxies = [proxy_for(a), proxy_for(b)]
    log = open_log(logs, [proxies[0].dsn(a), proxies[1].dsn(b), c])
    t = new_txid()
    voters = log.begin(t)
    for p in proxies:  # a and b go down just before ballot 0 reaches them
        p.add_rule(r"EXECUTE", "drop_before", times=None)
    try:
        out = log.propose_commit(t, voters, ["orders", "billing"])
        assert out.decision == "undecided" and "2 are needed" in out.detail
        assert open_log(logs, [proxies[0].dsn(a), proxies[1].dsn(b), c]).learn(
            {t: voters})[t].decision == "undecided"
        for p in proxies:
            p.stop()
        # b comes back (reached directly), a stays down. A recovery process
        # anywhere must finish the commit that c accepted: b and c are a
        # quorum, and c's promise reports its commit.
        recovery = open_log(logs, [proxies[0].dsn(a), b, c])
        out = recovery.recover(t, voters)
        assert out.decision == "commit" and out.value == COMMIT
    finally:
        for p in proxies:
            p.stop()


def test_a_log_database_stopped_and_started_again(
    acceptor_dsns: list[str], logs: list[PaxosLog], crash_server: PgServer
) -> None:
    private = crash_server.create_database()
    install(private)
    log = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], private])
    t = new_txid()
    voters = log.begin(t)
    crash_server.crash()  # immediate stop: the registration may be lost, it is async
    assert log.propose_commit(t, voters, ["orders", "billing"]).commits
    crash_server.restart()
    # Once it is back (a new log, as a recovery process would be), it takes part:
    # it still knows the transaction, or has no slot for it, never a wrong one.
    again = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], private])
    state = again.slots([t])[2]
    assert state.error is None and state.slots.get(t, Slot()) in (Slot(), Slot(0, 0, COMMIT))
    t2 = new_txid()
    assert len(again.begin(t2)) == 3


def test_a_log_database_back_from_an_outage_votes_again_without_the_pools_backoff(
    acceptor_dsns: list[str], logs: list[PaxosLog], crash_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # psycopg_pool retries a lost server after a backoff that doubles (to
    # minutes in a long outage); here it is made an hour from the start, so
    # only txmgr's own probe can bring the log database back within the test.
    monkeypatch.setattr(psycopg_pool.base.AttemptWithBackoff, "INITIAL_DELAY", 3600.0)
    private = crash_server.create_database()
    install(private)
    log = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], private], linger=0.5)
    assert len(log.begin(new_txid())) == 3
    link = log.links[2]
    pools = link.pools
    crash_server.stop(mode="immediate")
    # Down: registrations go on with the other two; it rests and is probed.
    # Once the probe failed twice, the pool's own attempts (the one a round's
    # request for a connection starts, too) have failed: they wait an hour.
    wait_until(lambda: len(log.begin(new_txid())) == 2 and link.probes >= 2)
    assert not link.healthy
    crash_server.restart()
    # Back: a probe connects, the link gets a fresh pool, and registrations
    # name three voters again.
    wait_until(lambda: len(log.begin(new_txid())) == 3)
    assert link.healthy and link.pools > pools
    t = new_txid()
    voters = log.begin(t)
    assert log.propose_commit(t, voters, ["orders", "billing"]).commits


def test_a_wiped_log_database_does_not_vote_on_older_transactions(
    pg_server: Server, acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    a, b, c = acceptor_dsns
    proxy = proxy_for(b)
    log = open_log(logs, [a, proxy.dsn(b), c])
    t = new_txid()
    voters = log.begin(t)
    proxy.add_rule(ACCEPT0, "drop_before")
    assert log.propose_commit(t, voters, ["orders", "billing"]).commits  # by a and c
    proxy.stop()
    # c loses its disk: it comes back empty, with a new incarnation.
    assert conninfo_to_dict(c)["port"] == conninfo_to_dict(pg_server.admin_dsn)["port"]
    pg_server.drop_database(dbname(c))
    pg_server.create_database(dbname(c))
    install(c)
    # With a unreachable, b (knows nothing) and the new c would be a majority
    # that says "abort": the new c is not one of the voters, so nothing is decided.
    missing = pg_server.dsn(f"t_gone_{secrets.token_hex(4)}")
    blind = open_log(logs, [missing, b, c])
    assert blind.recover(t, voters).decision == "undecided"
    # With a back, a and b decide: a's commit wins.
    out = open_log(logs, [a, b, c]).recover(t, voters)
    assert out.decision == "commit" and out.value == COMMIT
    # New transactions count the new c.
    t2 = new_txid()
    v2 = open_log(logs, [a, b, c]).begin(t2)
    assert len(v2) == 3 and len(set(v2.incarnations) & set(voters.incarnations)) == 2


def test_concurrent_proposers_never_disagree(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    coordinator = open_log(logs, acceptor_dsns)
    # Four recovery processes; two share a proposer id (ballots may collide).
    proposers = [open_log(logs, acceptor_dsns, proposer_id=i) for i in (7, 7, 8, 9)]
    rng = random.Random(5)
    conns = [psycopg.connect(d, autocommit=True) for d in acceptor_dsns]
    try:
        for _ in range(20):
            t = new_txid()
            voters = coordinator.begin(t)
            # Ballot 0 reached some of the log databases before the coordinator died.
            reached = rng.sample(range(3), rng.randint(0, 3))
            for i in reached:
                run(conns[i], accept_query(t, 0, COMMIT))
            outcomes: list[str] = []
            barrier = threading.Barrier(len(proposers))

            def recover(log: PaxosLog, t: str = t, v: Voters = voters,
                        b: threading.Barrier = barrier, out: list[str] = outcomes) -> None:
                b.wait()
                out.append(log.recover(t, v).decision)

            threads = [threading.Thread(target=recover, args=(p,)) for p in proposers]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            final = coordinator.recover(t, voters)
            assert final.decision in ("commit", "abort")
            decided = {o for o in outcomes if o != "undecided"}
            assert decided <= {final.decision}, (reached, outcomes)
            if len(reached) >= 2:
                assert final.decision == "commit"  # chosen before anyone recovered
            assert coordinator.learn({t: voters})[t].decision == final.decision
            coordinator.forget([t])
    finally:
        for conn in conns:
            conn.close()


def test_a_blackholed_log_database_does_not_stall_commits(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    proxy = proxy_for(acceptor_dsns[2])
    try:
        log = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], proxy.dsn(acceptor_dsns[2])])
        t = new_txid()
        voters = log.begin(t)
        assert len(voters) == 3
        # Its network swallows ballot 0 and never answers (nor closes).
        proxy.add_rule(ACCEPT0, "blackhole", times=None)
        for _ in range(3):
            assert log.propose_commit(t, voters, ["orders", "billing"]).commits
            t = new_txid()
            voters = log.begin(t)
        # The unanswered statements are read in the background; once one has
        # waited long enough, that log database rests and is not asked at all.
        link = log.links[2]
        wait_until(lambda: not link.healthy)
        t = new_txid()
        voters = log.begin(t)
        assert len(voters) == 2 and log.propose_commit(t, voters, ["orders"]).commits
        assert log.collector.pending() >= 1
    finally:
        proxy.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for something a background thread does on its own."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- registration ahead (PaxosLog.take) ------------------------------------------------


def slot_xmins(dsn: str) -> dict[str, int]:
    """txid -> the transaction that inserted its slot (one statement, one xmin)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {str(t): int(x) for t, x in
                conn.execute("SELECT txid, xmin::text::bigint FROM txmgr_paxos").fetchall()}


def test_take_registers_ahead_in_growing_batches(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    log = open_log(logs, acceptor_dsns, ahead=16)
    taken = [log.take() for _ in range(40)]
    txids = [t for t, _ in taken]
    assert len(set(txids)) == 40  # each handed out once
    incarnations = set(log.check().values())
    assert all(set(v.incarnations) == incarnations and v.quorum == 2 for _, v in taken)
    for dsn in acceptor_dsns:
        xmins = slot_xmins(dsn)
        assert set(txids) <= set(xmins)  # every txid registered on every acceptor...
        # ... in a few statements: batches of 1, 2, 4, 8, 16, 16 (capped by ahead).
        assert len({xmins[t] for t in txids}) == 6
    # Registered and never used: close() deletes them (and the handed-out ones
    # are their transactions' business — here nobody's, so the test deletes them).
    log.close()
    left = set(slot_xmins(acceptor_dsns[0]))
    assert left == set(txids)
    again = open_log(logs, acceptor_dsns)
    assert again.forget(txids).deleted == {t: 3 for t in txids}


def test_registrations_expired_unused_are_deleted_by_the_next_decision(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    log = open_log(logs, acceptor_dsns, ahead=8)
    first, voters = log.take()
    second, _ = log.take()  # batch 1 was used up at once: batch 2 registers two
    spare = set(slot_xmins(acceptor_dsns[0])) - {first, second}
    assert len(spare) == 1
    log.ahead_max_age = 0.001
    start = time.monotonic()
    wait_until(lambda: time.monotonic() - start > 0.01)  # older than ahead_max_age now
    third, v3 = log.take()
    assert third not in spare  # an expired registration is never handed out
    assert log.propose_commit(third, v3, ["orders", "billing"]).commits
    settle(log)
    for dsn in acceptor_dsns:
        assert not spare & set(slot_xmins(dsn))  # deleted by the decision's statement
    assert log.propose_commit(first, voters, ["orders"]).commits  # handed out: still valid


def test_take_with_one_log_database_down_and_two(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    proxy, watch = proxy_for(acceptor_dsns[2]), proxy_for(acceptor_dsns[0])
    try:
        dsns = [watch.dsn(acceptor_dsns[0]), acceptor_dsns[1], proxy.dsn(acceptor_dsns[2])]
        log = open_log(logs, dsns, linger=0.05, ballot0_to="majority")
        proxy.stop()
        t, voters = log.take()
        assert len(voters) == 2 and voters.quorum == 2
        assert log.propose_commit(t, voters, ["orders", "billing"]).commits
        first = t  # finished: deleted by the next decision's statement
        seen = watch.add_rule(first, "delay", times=None)  # counts statements naming it
        done = [t]
        for _ in range(5):
            t, voters = log.take()
            assert log.propose_commit(t, voters, ["orders", "billing"], forget=done).commits
            done = [t]
        # The deletions the dead database misses wait for it, and only for it:
        # they do not ride along to the others on every statement.
        assert seen.hits == 1
        assert [len(owed) for owed in log._owed] == [0, 0, 5]
    finally:
        proxy.stop()
        watch.stop()
    with psycopg.connect(acceptor_dsns[1], autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE txmgr_paxos_acceptor CASCADE"))
    other = open_log(logs, [acceptor_dsns[0], acceptor_dsns[1], dsns[2]], linger=0.05)
    with pytest.raises(LogQuorumUnavailable, match="2 are needed; nothing was prepared"):
        other.take()


# -- ballot 0 to a majority --------------------------------------------------------------


def accepted_on(dsns: list[str], txid: str) -> list[bool]:
    out = []
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT accepted_value FROM txmgr_paxos WHERE txid = %s",
                               (txid,)).fetchone()
            out.append(row is not None and row[0] == "commit")
    return out


def test_ballot0_goes_to_a_different_majority_each_time_and_cleanup_reaches_every_one(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    log = open_log(logs, acceptor_dsns, ballot0_to="majority")
    done: list[str] = []
    used: list[str] = []
    seen: set[tuple[bool, ...]] = set()
    for _ in range(6):
        t, voters = log.take()
        used.append(t)
        out = log.propose_commit(t, voters, ["orders", "billing"], forget=done)
        assert out.commits and out.ballot == 0
        where = accepted_on(acceptor_dsns, t)
        assert sum(where) == 2  # exactly a majority was asked
        seen.add(tuple(where))
        assert log.learn({t: voters})[t].decision == "commit"  # a reader sees it chosen
        done = [t]
    assert len(seen) == 3  # every pair took its turn
    # A finished slot goes with the next decision on the databases it is sent
    # to, and with a later one (when its turn comes) on the database left out:
    # after six decisions, only the last two may linger anywhere.
    left = {t for st in log.slots() for t in st.slots}
    assert left & set(used) <= set(used[-2:])


def test_ballot0_to_a_majority_falls_back_to_the_others_when_one_fails(
    acceptor_dsns: list[str], logs: list[PaxosLog]
) -> None:
    proxy = proxy_for(acceptor_dsns[0])
    try:
        dsns = [proxy.dsn(acceptor_dsns[0]), acceptor_dsns[1], acceptor_dsns[2]]
        outcomes = []
        for lost in ("drop_before", "blackhole"):
            # The first log database loses its next ballot 0 (an error, or a
            # silence): whichever majority was asked, commit is still chosen.
            # (A new log each time: after a fault the database rests, unasked.)
            log = open_log(logs, dsns, ballot0_to="majority", hedge_after=0.2)
            rule = proxy.add_rule(ACCEPT0, lost, times=1)
            for _ in range(3):  # every rotation, so that the faulty one is asked
                t, voters = log.take()
                out = log.propose_commit(t, voters, ["orders", "billing"])
                # Chosen at ballot 0: the third voter was asked, no phase 1 needed.
                outcomes.append((out.decision, out.ballot))
                assert sum(accepted_on(acceptor_dsns, t)) >= 2
            assert rule.hits == 1
            proxy.drop_all()
        assert outcomes == [("commit", 0)] * 6
    finally:
        proxy.stop()

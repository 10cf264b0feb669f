"""txmgr through a real PgBouncer (issue 15, findings 3 and 4).

Every DSN of a bank (participants and log) is routed through a PgBouncer in
front of the first server: stock (``options`` refused), or dropping ``options``
(``ignore_startup_parameters = options``), in session, transaction or
statement mode.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import START, Bank, MakeBank, query, transfer
from txmgr._connections import ConnectionCache
from txmgr._leader import LeaderLock, lock_key
from txmgr.hooks import Hooks
from txmgr.testing import PgBouncer, Server
from txmgr.testing.pytest_plugin import MakeDatabase, MakePgBouncer

TIMEOUT = 2.0  # connect_timeout of the managers: a refused pool shows quickly


def routed(bank: Bank, bouncer: PgBouncer) -> Bank:
    """The same databases, every DSN through ``bouncer``."""
    dsns = {n: bouncer.route(d) for n, d in bank.dsns.items()}
    log = bank.log if bank.log in bank.dsns else bouncer.route(bank.log)
    return Bank(dsns, log)


def one_server_bank(make_bank: MakeBank, pg_servers: list[Server]) -> Bank:
    return make_bank(servers=[pg_servers[0]])


def move(tm: txmgr.TransactionManager, amount: int, src: str, dst: str, account: int = 1) -> None:
    """``amount`` from ``src`` to ``dst``, the participants touched in name order: no
    two transfers wait for each other across databases (txmgr detects no such
    deadlock), nor for each other's pooled server sessions."""
    with tm.transaction() as tx:
        for name in sorted((src, dst)):
            tx.connection(name).execute(
                "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                (amount if name == dst else -amount, account))


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


# -- finding 3: safety settings are not startup parameters ----------------------


def test_stock_pgbouncer_commits_txmgr_sends_no_startup_options(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bouncer = pgbouncers("transaction")
    bank = routed(direct, bouncer)
    tm = bank.manager(connect_timeout=TIMEOUT)
    # Stock PgBouncer refuses libpq options; txmgr sends none of its own.
    move(tm, 5, "a", "b")
    assert (direct.balance("a"), direct.balance("b")) == (START - 5, START + 5)
    tm.close()


def test_options_in_a_users_dsn_show_pgbouncers_refusal_verbatim(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bouncer = pgbouncers("transaction")
    log = bouncer.route(direct.log) + " options='-c statement_timeout=0'"
    tm = txmgr.TransactionManager(routed(direct, bouncer).dsns, log, connect_timeout=TIMEOUT)
    try:
        with pytest.raises(txmgr.ParticipantUnavailable) as err:
            tm.check()
    finally:
        tm.close()
    text = str(err.value)
    assert "unsupported startup parameter: options" in text, text
    password = pg_servers[0].password
    assert password and password not in text


def test_a_pool_refused_by_pgbouncer_shows_pgbouncers_message(
    make_bank: MakeBank, pg_servers: list[Server]
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    with PgBouncer(pg_servers[0], settings={"max_client_conn": "6"}) as bouncer:  # type: ignore[arg-type]
        bank = routed(direct, bouncer)
        tm = bank.manager(connect_timeout=TIMEOUT)
        tm.check()  # the log's schema and both participants' pools: fine so far
        # Then every client slot of PgBouncer is taken: the log pool's first
        # connection is refused with PgBouncer's FATAL.
        hogs: list[psycopg.Connection[Any]] = []
        try:
            while len(hogs) < 20:
                try:
                    hogs.append(psycopg.connect(bank.log_dsn, connect_timeout=2))
                except psycopg.OperationalError:
                    break
            assert 0 < len(hogs) < 20
            with pytest.raises(txmgr.TxmgrError) as err, tm.transaction() as tx:
                tx.connection("a").execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                tx.connection("b").execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        finally:
            for hog in hogs:
                hog.close()
            tm.close()
    text = str(err.value)
    assert "no more connections allowed (max_client_conn)" in text, text
    password = pg_servers[0].password
    assert password and password not in text
    assert (direct.balance("a"), direct.balance("b")) == (START, START)
    assert direct.prepared() == []


class LastLogQuery(Hooks):
    """Before the decision (``L`` open, its first query run): what ``L``'s server
    session ran, as the log server saw it (pg_stat_activity, found by ``L``'s xid)."""

    def __init__(self, direct_log: str) -> None:
        self.direct_log = direct_log
        self.seen: list[str] = []

    def before_decision(self, txid: str, lxid: int) -> None:
        rows = query(self.direct_log, "SELECT query FROM pg_stat_activity "
                     "WHERE backend_xid::text = (%s::bigint %% 4294967296)::text", (lxid,))
        self.seen += [r[0] for r in rows]


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_the_decision_commits_synchronously_whatever_the_database_default(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer, mode: str
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    query(direct.log, sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
        sql.Identifier(dbname(direct.log))).as_string())
    bouncer = pgbouncers(mode, ignore_startup_parameters=("options",))
    bank = routed(direct, bouncer)
    # The precondition: a session of the log through this PgBouncer runs with off.
    assert query(bank.log_dsn, "SHOW synchronous_commit") == [("off",)]
    hook = LastLogQuery(direct.log)
    tm = bank.manager(connect_timeout=TIMEOUT, hooks=hook)
    move(tm, 5, "a", "b")
    move(tm, 5, "a", "b")  # a pooled log connection, second time round
    assert len(hook.seen) == 2, hook.seen
    for text in hook.seen:
        assert "SET LOCAL synchronous_commit = on" in text, text
        assert "SET LOCAL idle_in_transaction_session_timeout" in text, text
        assert "INSERT INTO txmgr_decision" in text, text
    assert (direct.balance("a"), direct.balance("b")) == (START - 10, START + 10)
    tm.close()


class Hang(Hooks):
    """The coordinator hangs before its decision until the log server aborted ``L``
    (asked directly, not through the pooler); gives up after ``patience``."""

    def __init__(self, direct_log: str, patience: float) -> None:
        self.direct_log = direct_log
        self.patience = patience

    def before_decision(self, txid: str, lxid: int) -> None:
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:  # waits for the condition, not a fixed time
            status = query(self.direct_log, "SELECT pg_xact_status(%s::text::xid8)", (lxid,))
            if status[0][0] == "aborted":
                return
            time.sleep(0.05)
        raise AssertionError("the log server never aborted the idle decision transaction")


@pytest.mark.parametrize("ignore", [(), ("options",)], ids=["stock", "ignore-options"])
def test_a_hung_coordinators_decision_is_aborted_by_the_server_through_pgbouncer(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer,
    ignore: tuple[str, ...],
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bank = routed(direct, pgbouncers("transaction", ignore_startup_parameters=ignore))
    tm = bank.manager(connect_timeout=TIMEOUT, log_idle_timeout=0.5,
                      hooks=Hang(direct.log, patience=8.0))
    with pytest.raises(txmgr.TransactionAborted, match="did not commit"), tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
    assert (direct.balance("a"), direct.balance("b")) == (START, START)
    assert direct.prepared() == []  # the late coordinator rolled its own branches back
    tm.close()


def _waiting_query(direct_dsn: str) -> str | None:
    """The text of a statement waiting for a lock in ``direct_dsn``'s database."""
    rows = query(direct_dsn, "SELECT query FROM pg_stat_activity WHERE datname = "
                 "current_database() AND wait_event_type = 'Lock'")
    return str(rows[0][0]) if rows else None


def test_recovery_statements_on_the_log_carry_their_lock_timeout_through_pgbouncer(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    # options dropped: a session setting would silently not be there.
    bank = routed(direct, pgbouncers("transaction", ignore_startup_parameters=("options",)))
    seen: list[str] = []
    reports: list[txmgr.RecoveryReport] = []
    with psycopg.connect(direct.log) as blocker:
        blocker.execute("LOCK TABLE txmgr_decision IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: reports.append(txmgr.recover(bank.config())))
        worker.start()
        def waiting() -> bool:
            text = _waiting_query(direct.log)
            if text is not None:
                seen.append(text)
            return text is not None

        try:
            _wait_until("recovery to wait for the lock", waiting)
        finally:
            blocker.rollback()
            worker.join()
    # The statement that waited was sent behind its own SET LOCAL lock_timeout.
    assert "SET LOCAL lock_timeout = '10s'" in seen[0], seen
    assert "txmgr_decision" in seen[0], seen
    assert reports and reports[0].ok, reports


def test_paxos_acceptor_writes_commit_synchronously_through_transaction_pooling(
    make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server],
    pgbouncers: MakePgBouncer,
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    acceptors = [make_database(pg_servers[0]) for _ in range(3)]
    for dsn in acceptors:
        txmgr.migrate(dsn)
        query(dsn, sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
            sql.Identifier(dbname(dsn))).as_string())
    bouncer = pgbouncers("transaction", ignore_startup_parameters=("options",))
    bank = routed(direct, bouncer)
    routed_acceptors = [bouncer.route(d) for d in acceptors]
    tm = txmgr.TransactionManager(
        bank.dsns, log=txmgr.PaxosLog(routed_acceptors, connect_timeout=5), connect_timeout=5)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            try:
                src, dst = rng.sample(["a", "b"], 2)
                move(tm, rng.randint(1, 9), src, dst, account=rng.randint(1, 4))
            except BaseException as e:  # collected, the test fails below
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [], errors[:3]
        assert direct.total() == direct.expected_total
        assert direct.prepared() == []
        # What the acceptors' server sessions ran last: statements as text, each
        # behind its own SET LOCAL synchronous_commit = on (the database default
        # is off), never a prepared statement of another session.
        texts = [str(r[0]) for d in acceptors for r in query(
            d, "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE '%%txmgr_paxos%%' "
                # (not the identity check a new pooled connection runs: a read)
                "AND query NOT LIKE '%%pg_control_system%%'")]
        assert texts, "no acceptor statement seen"
        for text in texts:
            assert "EXECUTE " not in text and "PREPARE " not in text, text
            assert "SET LOCAL synchronous_commit = o" in text, text
        assert any("SET LOCAL synchronous_commit = on" in t for t in texts), texts
    finally:
        tm.close()


# -- finding 4: transaction pooling ---------------------------------------------


def test_transaction_pooling_concurrent_transfers_prepare_nothing_and_keep_the_total(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = make_bank(names=("a", "b", "c"), servers=[pg_servers[0]])
    # Server sessions change hands between the clients' transactions. There must
    # be as many per database as txmgr may use at once (3 managers x pool_max_size
    # 3): a COMMIT PREPARED needs a server session, and with every session taken
    # by transactions waiting for the prepared branch's row locks it would wait
    # for ever.
    # (options dropped, not refused: this is about prepared statements alone.)
    bank = routed(direct, pgbouncers("transaction", pool_size=10,
                                     ignore_startup_parameters=("options",)))
    names = sorted(bank.dsns)
    managers = [bank.manager(connect_timeout=10, pool_max_size=3) for _ in range(3)]
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def client(tm: txmgr.TransactionManager, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            src, dst = rng.sample(names, 2)
            try:
                # The same parameterised statements over and over: psycopg would
                # prepare them after 5 executions on a direct connection.
                move(tm, rng.randint(1, 9), src, dst, account=rng.randint(1, 4))
            except BaseException as e:  # collected, the test fails below
                with lock:
                    errors.append(e)
            else:
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=client, args=(tm, i)) for i, tm in enumerate(managers * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]
    assert done[0] == 150
    assert direct.total() == direct.expected_total
    assert direct.prepared() == []
    # Nothing was prepared on any server session (psycopg's _pg3_N names).
    for name in names:
        conn = managers[0].participant(name).checkout()
        try:
            assert conn.prepare_threshold is None
        finally:
            managers[0].participant(name).release(conn)
    # The recovery connections too.
    cache = ConnectionCache(connect_timeout=5)
    try:
        assert cache.get("a", bank.dsns["a"]).prepare_threshold is None
        assert cache.get("x", direct.dsns["a"]).prepare_threshold == 5  # direct: kept
    finally:
        cache.close()


def test_async_manager_through_transaction_pooling_prepares_nothing(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bank = routed(direct, pgbouncers("transaction", pool_size=10,
                                     ignore_startup_parameters=("options",)))

    async def client(tm: txmgr.AsyncTransactionManager, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):  # the same statements again and again: past psycopg's 5
            src, dst = rng.sample(["a", "b"], 2)
            amount = rng.randint(1, 9)
            async with tm.transaction() as tx:
                for name in sorted((src, dst)):
                    await (await tx.connection(name)).execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                        (amount if name == dst else -amount, rng.randint(1, 4)))

    async def scenario() -> None:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log, connect_timeout=10,
                                                 pool_max_size=3) as tm:
            await asyncio.gather(*(client(tm, i) for i in range(3)))

    asyncio.run(scenario())
    assert direct.total() == direct.expected_total
    assert direct.prepared() == []


def _advisory_holders(direct_log: str, logid: str) -> int:
    key = lock_key(logid)
    rows = query(
        direct_log,
        "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    )
    return int(rows[0][0])


def _wait_until(what: str, condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_daemons_through_transaction_pooling_never_both_active(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    # Two server sessions for the log database: a session advisory lock taken by
    # one daemon is "held" by whichever client runs on that session next.
    bouncer = pgbouncers("transaction", pool_size=2)
    log = bouncer.route(direct.log)
    first = LeaderLock(log, connect_timeout=5, dead_peer_after=30)
    second = LeaderLock(log, connect_timeout=5, dead_peer_after=30)
    try:
        states = [first.ensure(), second.ensure()]
        for _ in range(3):
            states += [first.ensure(), second.ensure()]
            assert sorted(states[-2:]) == ["active", "standby"], states
        assert first.held and not second.held
        logid = first.logid
        assert logid is not None
        assert _advisory_holders(direct.log, logid) == 1
        # No setting of the leader's leaks into the pooled sessions others get.
        # (The leader's is dead_peer_after / 3 = 10 s; the system default differs.)
        default = query(direct.log, "SHOW tcp_keepalives_idle")
        assert default != [("10",)]
        for _ in range(4):
            assert query(log, "SHOW tcp_keepalives_idle") == default
        # The active daemon dies without a word: its server session is given up
        # by the pooler, and with it the lock; the other one takes over.
        conn = first._conn
        assert conn is not None
        conn.pgconn.finish()
        _wait_until("the dead daemon's lock to go",
                    lambda: _advisory_holders(direct.log, logid) == 0)
        assert second.ensure() == "active"
        assert first.ensure() == "standby"
        second.release()
        first.release()
        _wait_until("no lock held after both left",
                    lambda: _advisory_holders(direct.log, logid) == 0)
    finally:
        first.release()
        second.release()


def test_the_leaders_open_transaction_holds_no_snapshot(
    make_bank: MakeBank, pg_servers: list[Server]
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    # A database whose transactions default to one snapshot for their whole life:
    # the leader's transaction, open for as long as it leads, must not hold one
    # (it would keep vacuum from removing any row version in the cluster).
    query(direct.log, sql.SQL(
        "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'").format(
        sql.Identifier(dbname(direct.log))).as_string())
    leader = LeaderLock(direct.log, connect_timeout=5, application_name="txmgr-leader-test")
    try:
        assert leader.ensure() == "active"
        assert leader.ensure() == "active"
        rows = query(direct.log, "SELECT state, backend_xmin::text FROM pg_stat_activity "
                     "WHERE application_name = 'txmgr-leader-test'")
        assert rows == [("idle in transaction", None)], rows
    finally:
        leader.release()


def test_statement_pooling_is_refused_naming_pool_mode(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bank = routed(direct, pgbouncers("statement"))
    tm = bank.manager(connect_timeout=TIMEOUT)
    try:
        with pytest.raises(txmgr.UnsupportedPoolMode, match="pool_mode = transaction"):
            tm.check()
    finally:
        tm.close()
    report = txmgr.recover(bank.config())
    assert not report.ok
    assert "pool_mode" in " ".join(str(e) for e in report.errors), report.errors


def test_session_pooling_commits_and_recovers(
    make_bank: MakeBank, pg_servers: list[Server], pgbouncers: MakePgBouncer
) -> None:
    direct = one_server_bank(make_bank, pg_servers)
    bank = routed(direct, pgbouncers("session"))
    tm = bank.manager(connect_timeout=TIMEOUT)
    move(tm, 5, "a", "b")
    tm.close()
    # A coordinator killed right after its decision, then recovery, all through PgBouncer.
    bank.kill_coordinator("after_decision", transfer(7, "a", "b"))
    assert len(direct.prepared()) == 2
    report = txmgr.recover(bank.config())
    assert report.ok and report.committed == 2, report
    assert direct.prepared() == []
    assert (direct.balance("a"), direct.balance("b")) == (START - 12, START + 12)
    assert direct.decisions() == []


def test_prepare_threshold_setting_reaches_participants_and_paxos_links() -> None:
    base = {"participants": {"a": "host=x dbname=a", "b": "host=x dbname=b"},
            "log": {"dsn": "host=x dbname=log"}}
    assert txmgr.Config.from_mapping(base).prepare_threshold == 5  # psycopg's default
    off = txmgr.Config.from_mapping({**base, "pool": {"prepare_threshold": "off"}})
    assert off.prepare_threshold is None
    tm = txmgr.TransactionManager.from_config(off)
    try:
        assert tm.participant("a")._prepare_threshold is None
    finally:
        tm.close()
    paxos = txmgr.Config.from_mapping({
        "participants": base["participants"], "pool": {"prepare_threshold": 2},
        "log": {"mode": "paxos", "dsns": ["host=x dbname=l1", "host=x dbname=l2",
                                          "host=x dbname=l3"]}})
    log = paxos.paxos_log
    assert log is not None and [link.prepare_threshold for link in log.links] == [2, 2, 2]
    log.close()
    for bad in ("sometimes", -1, True):
        with pytest.raises(txmgr.ConfigError, match="prepare_threshold"):
            txmgr.Config.from_mapping({**base, "pool": {"prepare_threshold": bad}})

"""The core behaviours, once for each front end: the blocking ``TransactionManager``
and ``AsyncTransactionManager`` run one protocol and must behave alike.

Each test writes its scenario once (``async def``, see ``frontends.py``) and
runs it with ``front`` = "sync" and "async"; the end state is checked on the
servers afterwards.
"""

from __future__ import annotations

import asyncio
import pathlib
import struct
import time

import psycopg
import pytest

import txmgr
from frontends import FRONTS, Front, Tx, call, crash_at, off_loop
from support import START, Bank, MakeBank, RecoveryLoop, query, transfer
from txmgr import failpoints
from txmgr.hooks import Hooks
from txmgr.testing import PgServer
from txmgr.testing.pytest_plugin import MakeDatabase

State = txmgr.TransactionState


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> Front:
    return Front(request.param)


@pytest.fixture(autouse=True)
def _no_failpoints() -> object:
    failpoints.clear()
    yield
    failpoints.clear()


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def after_vote(self, txid: str, writers: list[str]) -> None:
        self.events.append(("vote", *sorted(writers)))

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        self.events.append(("prepare", participant))

    def after_decision(self, txid: str, lxid: int) -> None:
        self.events.append(("decision",))


async def move(tx: Tx, amount: int, src: str = "a", dst: str = "b", account: int = 1) -> None:
    await tx.execute(src, "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                     (amount, account))
    await tx.execute(dst, "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                     (amount, account))


def recover_until_settled(bank: Bank) -> txmgr.RecoveryReport:
    import time

    deadline = time.monotonic() + 20
    while True:
        report = txmgr.recover(bank.config())
        if report.in_progress == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)  # a killed coordinator's L ends when the server notices


# -- commit and rollback ------------------------------------------------------------


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_commit_across_participants(front: Front, make_bank: MakeBank,
                                    names: tuple[str, ...]) -> None:
    bank = make_bank(names)
    rec = Recorder()

    async def scenario() -> Tx:
        tm = front.manager(bank.dsns, bank.log, hooks=rec)
        async with tm.transaction() as tx:
            for n in names:
                await tx.execute(n, "UPDATE accounts SET balance = balance + 7 WHERE id = 1")
        return tx

    tx = front.run(scenario)
    assert tx.state is State.COMMITTED
    assert [bank.balance(n) for n in names] == [START + 7] * len(names)
    assert sorted(e[1] for e in rec.events if e[0] == "prepare") == sorted(names)
    assert ("decision",) in rec.events
    assert bank.prepared() == []
    assert bank.decisions() == []  # the manager's close() deleted the finished row


def test_exception_rolls_back_every_branch(front: Front, bank: Bank) -> None:
    async def scenario() -> Tx:
        tm = front.manager(bank.dsns, bank.log)
        with pytest.raises(ZeroDivisionError):
            async with tm.transaction() as tx:
                await move(tx, 50)
                1 / 0
        with pytest.raises(txmgr.TransactionStateError, match="rolled back"):
            await tx.connection("a")
        return tx

    tx = front.run(scenario)
    assert tx.state is State.ROLLED_BACK
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == [] and bank.decisions() == []


def test_explicit_commit_and_rollback(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        tx = tm.transaction()
        await move(tx, 5)
        await tx.rollback()
        assert tx.state is State.ROLLED_BACK
        tx = tm.transaction()
        await move(tx, 7)
        await tx.commit()
        assert tx.state is State.COMMITTED
        with pytest.raises(txmgr.TransactionStateError, match="'commit\\(\\)' needs an active"):
            await tx.commit()

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START - 7, START + 7)


def test_single_writer_commits_in_one_phase(front: Front, bank: Bank) -> None:
    rec = Recorder()

    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log, hooks=rec)
        async with tm.transaction() as tx:
            await tx.execute("a", "UPDATE accounts SET balance = 1 WHERE id = 1")
            assert await tx.execute("b", "SELECT balance FROM accounts WHERE id = 1") == [
                (START,)
            ]
        async with tm.transaction() as tx:  # nothing at all
            pass
        assert tx.state is State.COMMITTED

    front.run(scenario)
    assert bank.balance("a") == 1
    assert rec.events == [("vote", "a"), ("vote",)]  # no prepare, no decision
    assert bank.decisions() == []


def test_read_only_branch_is_not_prepared(front: Front, make_bank: MakeBank) -> None:
    bank = make_bank(("a", "b", "c"))
    rec = Recorder()

    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log, hooks=rec)
        async with tm.transaction() as tx:
            await move(tx, 5)
            await tx.execute("c", "SELECT sum(balance) FROM accounts")

    front.run(scenario)
    assert rec.events[0] == ("vote", "a", "b")
    assert sorted(e for e in rec.events if e[0] == "prepare") == [("prepare", "a"),
                                                                  ("prepare", "b")]
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


def test_deferred_constraint_at_prepare_aborts(front: Front, bank: Bank) -> None:
    # A deferred constraint is checked at PREPARE TRANSACTION: the branch votes no.
    query(bank.dsns["b"], "CREATE TABLE uniq (k int, CONSTRAINT u UNIQUE (k) DEFERRABLE "
                          "INITIALLY DEFERRED)")
    rec = Recorder()

    async def scenario() -> tuple[Tx, BaseException]:
        tm = front.manager(bank.dsns, bank.log, hooks=rec)
        with pytest.raises(txmgr.TransactionAborted, match="could not prepare") as info:
            async with tm.transaction() as tx:
                await move(tx, 10)
                await tx.execute("b", "INSERT INTO uniq VALUES (1), (1)")
        return tx, info.value

    tx, error = front.run(scenario)
    assert isinstance(error.__cause__, psycopg.errors.UniqueViolation)
    assert error.txid == tx.txid  # type: ignore[attr-defined]
    assert tx.state is State.ROLLED_BACK
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == [] and bank.decisions() == []
    assert ("decision",) not in rec.events


def test_failed_statement_inside_block_aborts(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        with pytest.raises(txmgr.TransactionAborted, match="a statement failed"):
            async with tm.transaction() as tx:
                await move(tx, 10)
                with pytest.raises(psycopg.errors.DivisionByZero):
                    await tx.execute("a", "SELECT 1/0")  # swallowed by the application

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_savepoints_inside_a_branch(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        async with tm.transaction() as tx:
            a = await tx.connection("a")
            await a.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with a.transaction():  # psycopg's savepoint
                    await a.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
                    await a.execute("SELECT 1/0")
            await tx.execute("a", "SAVEPOINT s")  # and a hand-made one
            await tx.execute("a", "UPDATE accounts SET balance = 0 WHERE id = 1")
            await tx.execute("a", "ROLLBACK TO SAVEPOINT s")
            await tx.execute("b", "UPDATE accounts SET balance = balance + 1 WHERE id = 1")

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START - 1, START + 1)


# -- the decision log ---------------------------------------------------------------


@pytest.mark.parametrize("writers", [("a", "b"), ("b", "c"), ("a",)])
def test_log_inside_participant(front: Front, make_bank: MakeBank,
                                writers: tuple[str, ...]) -> None:
    bank = make_bank(("a", "b", "c"), log="a")
    rec = Recorder()

    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log, hooks=rec)
        async with tm.transaction() as tx:
            for n in writers:
                await tx.execute(n, "UPDATE accounts SET balance = balance + 3 WHERE id = 1")

    front.run(scenario)
    for n in ("a", "b", "c"):
        assert bank.balance(n) == START + (3 if n in writers else 0)
    prepared = {e[1] for e in rec.events if e[0] == "prepare"}
    # "a" holds the decision: it commits in one phase and is never prepared.
    assert prepared == (set(writers) - {"a"} if len(writers) > 1 else set())
    assert bank.prepared() == [] and bank.decisions() == []


def test_decision_rows_are_deleted_by_the_next_decision(front: Front, bank: Bank) -> None:
    async def scenario() -> list[str]:
        tm = front.manager(bank.dsns, bank.log)
        for _ in range(4):
            async with tm.transaction() as tx:
                await move(tx, 1)
        return bank.decisions()

    left_open = front.run(scenario)
    assert len(left_open) == 1  # each decision deleted the one before it
    assert bank.decisions() == []  # and close() the last one
    assert (bank.balance("a"), bank.balance("b")) == (START - 4, START + 4)


def test_log_gone_aborts_two_writers_but_not_one(front: Front, bank: Bank) -> None:
    logdb = psycopg.conninfo.conninfo_to_dict(bank.log_dsn)["dbname"]

    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log, connect_timeout=1)  # the log won't answer
        async with tm.transaction() as tx:  # the manager has checked and used the log
            await move(tx, 1)
        drop = psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
            psycopg.sql.Identifier(str(logdb)))
        # Off the loop: it may be opening a pool connection, which the drop waits for.
        await off_loop(query, bank.dsns["a"], drop.as_string())
        async with tm.transaction() as tx:  # one writer: the log is not needed
            await tx.execute("a", "UPDATE accounts SET balance = balance - 5 WHERE id = 2")
            await tx.execute("b", "SELECT 1")
        with pytest.raises(txmgr.TransactionAborted, match="could not open the decision"):
            async with tm.transaction() as tx:
                await move(tx, 7)

    front.run(scenario)
    assert bank.balance("a", 2) == START - 5
    assert (bank.balance("a"), bank.balance("b")) == (START - 1, START + 1)
    assert bank.prepared() == []


def test_a_scenario_drops_a_database_off_the_event_loop(make_database: MakeDatabase) -> None:
    """The async run above stalled for 60 s now and then: it dropped the log on the
    event loop's thread while a pool was opening a connection to that server on the
    loop. The server waits for such a client up to ``authentication_timeout``
    (60 s), and ``DROP DATABASE`` waits for every backend that is still
    authenticating (PostgreSQL 15: a ProcSignalBarrier), whatever its database.
    Here the loop's handshake is made on purpose; through off_loop() the loop ends
    it at once and the drop does not wait for it."""
    dsn, victim = make_database(), make_database()
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    drop = psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(
        str(psycopg.conninfo.conninfo_to_dict(victim)["dbname"]))).as_string()

    async def scenario() -> float:
        # A client on the loop, half-way through its startup: as a pool's connect is.
        host, port = str(params.get("host", "")), int(str(params.get("port", 5432)))
        if not host or host.startswith("/"):
            pytest.skip("the server is reached over a Unix socket, not TCP")
        reader, writer = await asyncio.open_connection(host, port)
        body = b"".join(f"{k}\0{params[k]}\0".encode() for k in ("user", "dbname"))
        body = body.replace(b"dbname\0", b"database\0", 1) + b"\0"
        writer.write(struct.pack("!ii", len(body) + 8, 196608) + body)  # protocol 3.0
        kind, _, code = struct.unpack("!cii", await reader.readexactly(9))
        if kind != b"R" or code == 0:
            writer.close()
            pytest.skip("the server asks for no password: no handshake for it to wait on")
        # Its backend now waits for this client, which answers (hangs up) only
        # when the loop runs.
        hang_up = asyncio.get_running_loop().call_soon(writer.close)
        start = time.monotonic()
        try:
            await off_loop(query, dsn, drop)
        finally:
            hang_up.cancel()
            writer.close()
        return time.monotonic() - start

    assert asyncio.run(scenario()) < 10  # it was authentication_timeout: 60 s


class StopLogBeforeDecision(Hooks):
    def __init__(self, server: PgServer) -> None:
        self.server = server

    def before_decision(self, txid: str, lxid: int) -> None:
        self.server.crash()  # and it stays down


@pytest.mark.crash
def test_log_down_at_decision_gives_outcome_unknown(
    front: Front, make_bank: MakeBank, crash_server: PgServer, pg_server: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import txmgr.transaction

    monkeypatch.setattr(txmgr.transaction, "CONFIRM_PATIENCE", 0.5)  # both front ends
    parts = make_bank(("a", "b"), servers=[pg_server])
    log_dsn = crash_server.create_database()
    txmgr.migrate(log_dsn)
    bank = Bank(parts.dsns, log_dsn)

    async def scenario() -> tuple[Tx, BaseException]:
        tm = front.manager(bank.dsns, bank.log, connect_timeout=1,
                           hooks=StopLogBeforeDecision(crash_server))
        with pytest.raises(txmgr.OutcomeUnknown) as info:
            async with tm.transaction() as tx:
                await move(tx, 5)
        return tx, info.value

    tx, error = front.run(scenario)
    assert error.txid == tx.txid  # type: ignore[attr-defined]
    assert tx.state is State.UNKNOWN
    assert len(bank.prepared()) == 2  # in doubt until the log is back
    crash_server.restart()
    report = recover_until_settled(bank)
    assert report.ok and report.rolled_back == 2  # L never committed
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_stale_log_connection_is_replaced(front: Front, bank: Bank) -> None:
    logdb = psycopg.conninfo.conninfo_to_dict(bank.log_dsn)["dbname"]

    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        async with tm.transaction() as tx:
            await move(tx, 1)
        # Every pooled log connection dies (as when the log server restarts).
        await off_loop(query, bank.dsns["a"], "SELECT pg_terminate_backend(pid) FROM "
                       "pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                       (logdb,))
        async with tm.transaction() as tx:
            await move(tx, 2)

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START - 3, START + 3)


# -- crashes ----------------------------------------------------------------------

BEFORE_DECISION = ["before_vote", "before_prepare", "after_prepare", "before_decision"]
AFTER_DECISION = [
    "after_decision", "before_commit_prepared", "after_commit_prepared", "before_cleanup",
]


@pytest.mark.crash
@pytest.mark.parametrize(
    ("point", "log"),
    [(p, "dedicated") for p in BEFORE_DECISION + AFTER_DECISION]
    + [("before_decision", "a"), ("after_decision", "a")],
)
def test_crash_at_every_failpoint(front: Front, make_bank: MakeBank, point: str,
                                  log: str) -> None:
    bank = make_bank(("a", "b", "c"), log=log)
    crash_at(front.kind, bank.dsns, bank.log, point, transfer(100, "b", "c"))
    report = recover_until_settled(bank)
    assert report.errors == []
    assert bank.prepared() == []
    moved = 100 if point in AFTER_DECISION else 0
    assert (bank.balance("b"), bank.balance("c")) == (START - moved, START + moved)
    assert bank.decisions() == []


@pytest.mark.crash
def test_crash_before_one_phase_commit_rolls_back(front: Front, bank: Bank) -> None:
    crash_at(front.kind, bank.dsns, bank.log, "before_one_phase",
             {"a": ["UPDATE accounts SET balance = 0 WHERE id = 1"]})
    assert bank.balance("a") == START


def test_failpoint_raising_before_the_decision_aborts(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        for point in BEFORE_DECISION:
            failpoints.clear()
            failpoints.enable(point, "raise")
            with pytest.raises(txmgr.TransactionAborted, match=point) as info:
                async with tm.transaction() as tx:
                    await move(tx, 5)
            assert isinstance(info.value.__cause__, failpoints.FailpointError)
            assert tx.state is State.ROLLED_BACK
            assert bank.prepared() == []

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START, START)


def test_failpoints_raising_after_the_decision_change_nothing(front: Front, bank: Bank) -> None:
    failpoints.enable("after_decision", "raise")
    failpoints.enable("after_commit_prepared", "raise")

    async def scenario() -> Tx:
        tm = front.manager(bank.dsns, bank.log)
        async with tm.transaction() as tx:
            await move(tx, 5)
        return tx

    assert front.run(scenario).state is State.COMMITTED
    assert failpoints.hits("after_commit_prepared") == 2
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


def test_commit_prepared_left_to_recovery(front: Front, bank: Bank) -> None:
    failpoints.enable("before_commit_prepared", "raise")

    async def scenario() -> Tx:
        tm = front.manager(bank.dsns, bank.log)
        async with tm.transaction() as tx:
            await move(tx, 5)
        return tx

    assert front.run(scenario).state is State.COMMITTED_PENDING
    assert len(bank.prepared()) == 2
    assert txmgr.recover(bank.config()).committed == 2
    assert (bank.balance("a"), bank.balance("b")) == (START - 5, START + 5)


# -- many at once -------------------------------------------------------------------


def test_concurrent_transactions_with_recovery_running(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log, pool_max_size=4)

        async def worker(i: int) -> None:
            # Always "a" before "b": txmgr does not detect deadlocks across databases.
            for k in range(12):
                async with tm.transaction() as tx:
                    await move(tx, 1 if i % 2 else -1, account=1 + (i + k) % 4)

        await front.concurrently(4, worker)

    with RecoveryLoop(bank.config()) as loop:
        front.run(scenario)
    assert loop.reports and sum(r.rolled_back for r in loop.reports) == 0
    assert bank.total() == bank.expected_total
    assert bank.prepared() == []


# -- manual transaction control -----------------------------------------------------


@pytest.mark.parametrize("how", ["execute COMMIT", "execute ROLLBACK", "commit()",
                                 "rollback()", "autocommit", "cursor COMMIT"])
def test_ending_a_branch_by_hand_is_refused(front: Front, bank: Bank, how: str) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        with pytest.raises(txmgr.ManualTransactionControl, match="'b'"):
            async with tm.transaction() as tx:
                await move(tx, 10)
                b = (await tx.connection("b")).raw
                if how.startswith("execute"):
                    await call(b.execute, how.split()[1])
                elif how == "autocommit":
                    await call(b.set_autocommit, True)
                elif how == "cursor COMMIT":
                    await call(b.cursor().execute, "select 1; commit")
                else:
                    await call(getattr(b, how[:-2]))

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert bank.prepared() == []


def test_unguarded_cursor_commit_is_reported_honestly(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        with pytest.raises(txmgr.ManualTransactionControl, match="may be committed"):
            async with tm.transaction() as tx:
                await move(tx, 10)
                b = (await tx.connection("b")).raw
                cursor = (psycopg.AsyncClientCursor if front.kind == "async"
                          else psycopg.ClientCursor)(b)
                await call(cursor.execute, "COMMIT")

    front.run(scenario)
    # "a" was rolled back; "b" committed by hand, exactly as the error says.
    assert (bank.balance("a"), bank.balance("b")) == (START, START + 10)


# -- configuration ------------------------------------------------------------------


def test_from_config_file(front: Front, bank: Bank, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "txmgr.toml"
    lines = ["[log]", f'dsn = "{bank.log_dsn}"', "[participants]"]
    lines += [f'{n} = "{d}"' for n, d in bank.dsns.items()]
    path.write_text("\n".join(lines) + "\n")
    tm = front.from_config(path)

    async def scenario() -> None:
        async with tm.transaction() as tx:
            await move(tx, 9)

    front.run(scenario)
    assert (bank.balance("a"), bank.balance("b")) == (START - 9, START + 9)


def test_unknown_participant_and_closed_manager(front: Front, bank: Bank) -> None:
    async def scenario() -> None:
        tm = front.manager(bank.dsns, bank.log)
        async with tm.transaction() as tx:
            with pytest.raises(txmgr.UnknownParticipant, match="configured participants"):
                await tx.connection("nope")
        await tm.close()
        with pytest.raises(txmgr.TransactionStateError, match="closed"):
            tm.transaction()

    front.run(scenario)

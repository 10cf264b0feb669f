"""Bad input gets a typed error that says how to fix it, leaves nothing prepared
or half-committed, and never shows a password.

The catalogue (issue 4): one test per case. Each asserts the exception type, a
phrase of the fix in its message (:func:`check_error`), that no server
password appears in the formatted exception or its causes (the harness's DSNs
carry the superuser's password, and host connections check it), and, where a
transaction ran, that nothing is prepared and nothing committed afterwards.

"""

from __future__ import annotations

import contextlib
import re
import socket
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import txmgr
from support import START, Bank, MakeBank, own_server, query
from txmgr._gid import Gid
from txmgr._hints import FAILED_BRANCH_HINT, connect_failure_hint, prepare_failure_hint, with_hint
from txmgr.testing import PgServer, Server, find_pg_bin


class MissingHint(AssertionError):
    """The message says what went wrong, but not how to fix it."""


@pytest.fixture
def secrets(pg_servers: list[Server]) -> list[str]:
    """Passwords that must never be shown: those in every DSN the tests use."""
    return [p for s in pg_servers if (p := s.password)]


def check_error(error: BaseException, hint: str, secrets: Iterable[str]) -> str:
    """No secret anywhere in the formatted exception (causes included), and a fix
    matching ``hint`` in its message; returns the message."""
    message = str(error)
    shown = "".join(traceback.format_exception(error)) + repr(error)
    for secret in secrets:
        assert secret not in shown, f"password shown in {shown}"
    if not re.search(hint, message):
        raise MissingHint(f"no fix matching {hint!r} in: {message}")
    return message


def assert_untouched(bank: Bank, foreign: Iterable[str] = ()) -> None:
    """No money moved, no txmgr branch prepared (but the ``foreign`` gids), no decision."""
    assert [bank.balance(n) for n in bank.dsns] == [START] * len(bank.dsns)
    assert bank.prepared() == sorted(foreign)
    assert bank.decisions() == []


def with_password(dsn: str, password: str) -> str:
    params = conninfo_to_dict(dsn)
    params["password"] = password
    return make_conninfo("", **params)


def with_options(dsn: str, options: str) -> str:
    params = conninfo_to_dict(dsn)
    params["options"] = options
    return make_conninfo("", **params)


def closed_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def move(tx: txmgr.Transaction, *names: str) -> None:
    for name in names:
        tx.connection(name).execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")


# -- the participant's server cannot take part -----------------------------------------


def test_prepared_transactions_disabled(
    make_bank: MakeBank, pg_server: Server, secrets: list[str]
) -> None:
    with own_server(max_prepared_transactions=0) as no_2pc:
        bank = make_bank(("a", "b"), servers=[pg_server, no_2pc])
        tm = bank.manager()
        with pytest.raises(txmgr.PreparedTransactionsDisabled) as info, tm.transaction() as tx:
            move(tx, "a", "b")
        assert info.value.participant == "b"
        assert_untouched(bank)
        message = check_error(info.value, r"restart that server", [*secrets, no_2pc.password])
        assert "'b'" in message and "max_prepared_transactions = 0" in message


def test_prepared_transaction_slots_exhausted(
    make_bank: MakeBank, pg_server: Server, secrets: list[str]
) -> None:
    with own_server(max_prepared_transactions=1) as small:
        bank = make_bank(("a", "b"), servers=[pg_server, small])
        filler = psycopg.connect(small.dsn())  # someone else's prepared transaction
        filler.execute("SELECT 1")
        filler.execute("PREPARE TRANSACTION 'someone_elses'")
        try:
            tm = bank.manager()
            with pytest.raises(txmgr.TransactionAborted) as info, tm.transaction() as tx:
                move(tx, "a", "b")
            assert_untouched(bank)
            assert [r[0] for r in query(small.dsn(), "SELECT gid FROM pg_prepared_xacts")] == [
                "someone_elses"
            ]
            assert "max_prepared_transactions" in str(info.value)  # the server's own hint
            check_error(info.value, r"finish old prepared transactions.*`txmgr status`",
                        [*secrets, small.password])
        finally:
            filler.autocommit = True
            filler.execute("ROLLBACK PREPARED 'someone_elses'")
            filler.close()


def test_gid_already_in_use(make_bank: MakeBank, secrets: list[str]) -> None:
    # With the log inside participant "a", the decision transaction is a's own
    # branch: its xid, read inside the block, completes b's gid in advance.
    bank = make_bank(("a", "b"), log="a")
    tm = bank.manager()
    foreign = psycopg.connect(bank.dsns["b"])
    gid = ""
    try:
        with pytest.raises(txmgr.TransactionAborted) as info, tm.transaction() as tx:
            move(tx, "a", "b")
            row = tx.connection("a").execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            gid = str(Gid(tm.logid(), tx.txid, int(row[0]), "b"))
            foreign.execute("SELECT 1")
            foreign.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(
                psycopg.sql.Literal(gid)))
        assert_untouched(bank, foreign=[gid])  # the other one's gid is left alone
        assert "already in use" in str(info.value)
        check_error(info.value, r"retry the transaction", secrets)
    finally:
        foreign.autocommit = True
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            foreign.execute(psycopg.sql.SQL("ROLLBACK PREPARED {}").format(
                psycopg.sql.Literal(gid)))
        foreign.close()


UNPREPARABLE = {
    "temporary-table": ("CREATE TEMP TABLE scratch (x int)", "ordinary or UNLOGGED table"),
    "listen": ("LISTEN txmgr_test", "LISTEN on a connection of your own"),
    "notify": ("NOTIFY txmgr_test", "send NOTIFY .* from a participant whose branch writes "
                                    "nothing"),
    "with-hold-cursor": ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", r"CLOSE it"),
}


@pytest.mark.parametrize("case", sorted(UNPREPARABLE))
def test_branch_postgresql_cannot_prepare(bank: Bank, secrets: list[str], case: str) -> None:
    statement, hint = UNPREPARABLE[case]
    with pytest.raises(txmgr.TransactionAborted) as info, bank.manager().transaction() as tx:
        move(tx, "a", "b")
        tx.connection("b").execute(statement)
    assert_untouched(bank)
    assert isinstance(info.value.__cause__, psycopg.errors.FeatureNotSupported)
    assert "'b' could not prepare" in str(info.value)
    check_error(info.value, rf"PostgreSQL cannot prepare a transaction that .*{hint}", secrets)


def listen(dsn: str, channel: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
    return conn


def notifications(listener: psycopg.Connection[Any], dsn: str, channel: str) -> list[str]:
    """Payloads received so far, in order: a sentinel sent now arrives after them
    (PostgreSQL delivers in commit order), so this needs no waiting on absence."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_notify(%s, 'sentinel')", (channel,))
    got: list[str] = []
    for n in listener.notifies(timeout=30):
        if n.payload == "sentinel":
            return got
        got.append(n.payload)
    raise AssertionError(f"the sentinel notification never arrived (got {got})")


@pytest.mark.parametrize("case", ["only-writer", "read-only-branch", "aborted"])
def test_notify_where_postgresql_allows_it(make_bank: MakeBank, case: str) -> None:
    """NOTIFY cannot be prepared (above), but it works in a branch that is not
    prepared: the only writer (one-phase commit) or a branch that wrote nothing
    (committed after the decision), and then goes out only if the transaction
    commits."""
    bank = make_bank(("a", "b", "c"))
    listener = listen(bank.dsns["c"], "txmgr_test")
    try:
        tm = bank.manager()
        raised: BaseException | None = None
        try:
            with tm.transaction() as tx:
                if case == "only-writer":
                    move(tx, "c")
                    tx.connection("a").execute("SELECT 1")
                else:
                    move(tx, "a", "b")
                    if case == "aborted":  # b cannot prepare: the whole transaction aborts
                        tx.connection("b").execute("CREATE TEMP TABLE scratch (x int)")
                tx.connection("c").execute("NOTIFY txmgr_test, 'hello'")
        except txmgr.TransactionAborted as e:
            raised = e
        got = notifications(listener, bank.dsns["c"], "txmgr_test")
    finally:
        listener.close()
    if case == "aborted":
        assert raised is not None and got == []
        assert [bank.balance(n) for n in "abc"] == [START] * 3
    else:
        assert raised is None and got == ["hello"]
        moved = {"only-writer": "c", "read-only-branch": "ab"}[case]
        assert [bank.balance(n) for n in "abc"] == [START - (n in moved) for n in "abc"]
    assert bank.prepared() == []


def has_pg_basebackup() -> bool:
    try:
        return (find_pg_bin() / "pg_basebackup").exists()
    except Exception:
        return False


@pytest.mark.skipif(not has_pg_basebackup(), reason="needs pg_basebackup to make a standby")
def test_hot_standby_participant(
    make_bank: MakeBank, pg_server: Server, secrets: list[str]
) -> None:
    with own_server() as primary:
        bank = make_bank(("a", "b"), servers=[pg_server, primary])
        dbname = str(conninfo_to_dict(bank.dsns["b"])["dbname"])
        with PgServer.standby_of(primary) as standby:
            assert query(standby.dsn(dbname), "SELECT pg_is_in_recovery()") == [(True,)]
            dsns = dict(bank.dsns, b=standby.dsn(dbname))
            with txmgr.TransactionManager(dsns, bank.log) as tm:
                with pytest.raises(txmgr.ParticipantReadOnly) as info, tm.transaction() as tx:
                    move(tx, "a")
                    tx.connection("b")
            assert info.value.participant == "b"
            assert_untouched(bank)
            message = check_error(info.value, r"point its DSN at the primary",
                                  [*secrets, primary.password])
            assert "'b' is a hot standby" in message


def test_read_only_by_default_participant(bank: Bank, secrets: list[str]) -> None:
    """The cheap stand-in for a standby: sessions that start read-only."""
    dsns = dict(bank.dsns, b=with_options(bank.dsns["b"], "-c default_transaction_read_only=on"))
    with txmgr.TransactionManager(dsns, bank.log) as tm:
        with pytest.raises(txmgr.ParticipantReadOnly) as info, tm.transaction() as tx:
            move(tx, "a")
            tx.connection("b")
    assert_untouched(bank)
    check_error(info.value, r"default_transaction_read_only.*turn it off", secrets)


def test_wrong_password(bank: Bank, secrets: list[str]) -> None:
    wrong = "wr0ng-S3cret"
    dsns = dict(bank.dsns, b=with_password(bank.dsns["b"], wrong))
    with contextlib.suppress(psycopg.OperationalError), psycopg.connect(dsns["b"]):
        pytest.skip("the server accepts any password (trust authentication)")
    tm = txmgr.TransactionManager(dsns, bank.log)
    try:
        with pytest.raises(txmgr.ParticipantUnavailable) as info, tm.transaction() as tx:
            move(tx, "a")
            tx.connection("b")
        assert wrong not in repr(tm)
    finally:
        tm.close()
    assert_untouched(bank)
    # The server really checked it (the harness's servers use scram-sha-256 for TCP).
    message = check_error(info.value, r"refused the password.*~/\.pgpass", [*secrets, wrong])
    assert "password authentication failed" in message and "password=****" in message
    assert info.value.participant == "b"


def test_unreachable_host(bank: Bank, secrets: list[str]) -> None:
    dead = f"postgresql://app:hunter2@127.0.0.1:{closed_port()}/orders"
    tm = txmgr.TransactionManager({"a": bank.dsns["a"], "dead": dead}, bank.log,
                                  connect_timeout=2)
    try:
        with pytest.raises(txmgr.ParticipantUnavailable) as info, tm.transaction() as tx:
            move(tx, "a")
            tx.connection("dead")
    finally:
        tm.close()
    assert_untouched(bank)
    message = check_error(info.value, r"check that the server is running.*host and port",
                          [*secrets, "hunter2"])
    assert "postgresql://app:****@127.0.0.1:" in message


def test_unreachable_log(bank: Bank, secrets: list[str]) -> None:
    tm = txmgr.TransactionManager(
        bank.dsns, f"postgresql://app:hunter2@127.0.0.1:{closed_port()}/txlog", connect_timeout=2
    )
    with pytest.raises(txmgr.ParticipantUnavailable, match="cannot connect to 'log'") as info:
        tm.transaction()
    tm.close()
    check_error(info.value, r"check that the server is running", [*secrets, "hunter2"])


@pytest.fixture
def waiting_trigger(bank: Bank) -> Iterator[psycopg.Connection[Any]]:
    """A deferred trigger on b's accounts that waits for an advisory lock the
    returned session holds: PREPARE TRANSACTION, which runs it, cannot finish."""
    query(bank.dsns["b"], """
        CREATE FUNCTION wait_for_test() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$""")
    query(bank.dsns["b"], """
        CREATE CONSTRAINT TRIGGER wait_for_test AFTER UPDATE ON accounts
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_test()""")
    holder = psycopg.connect(bank.dsns["b"], autocommit=True)
    holder.execute("SELECT pg_advisory_lock(4242)")
    yield holder
    holder.close()


def test_timeout_during_prepare(
    bank: Bank, waiting_trigger: psycopg.Connection[Any], secrets: list[str]
) -> None:
    """PREPARE runs the deferred triggers; one waits for a lock and lock_timeout
    ends it. (statement_timeout would not: PostgreSQL disarms it before the
    commit work of PREPARE TRANSACTION and COMMIT, so it is not set here, or
    this test could not tell the two apart.)"""
    dsns = dict(bank.dsns, b=with_options(bank.dsns["b"], "-c lock_timeout=1s"))
    with txmgr.TransactionManager(dsns, bank.log) as tm:
        with pytest.raises(txmgr.TransactionAborted) as info, tm.transaction() as tx:
            move(tx, "a", "b")
    assert_untouched(bank)
    assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
    assert "lock timeout" in str(info.value)
    check_error(info.value, r"deferred triggers.*raise lock_timeout", secrets)


def test_failed_statement_caught_inside_a_branch(bank: Bank, secrets: list[str]) -> None:
    with pytest.raises(txmgr.TransactionAborted) as info, bank.manager().transaction() as tx:
        move(tx, "a", "b")
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            tx.connection("b").execute("SELECT 1 / 0")
    assert_untouched(bank)
    assert "a statement failed" in str(info.value)
    check_error(info.value, r"savepoint", secrets)


class FailBranchAfterVote(txmgr.Hooks):
    """Makes a statement fail on a branch after the votes: PREPARE (or the one-phase
    COMMIT) then meets an aborted transaction, which PostgreSQL answers with the
    tag ROLLBACK and no error."""

    conn: psycopg.Connection[Any] | None = None

    def after_vote(self, txid: str, writers: list[str]) -> None:
        assert self.conn is not None
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            self.conn.execute("SELECT 1 / 0")


@pytest.mark.parametrize("writers", ["two-phase", "one-phase"])
def test_branch_already_failed_when_committing(
    bank: Bank, secrets: list[str], writers: str
) -> None:
    hooks = FailBranchAfterVote()
    with pytest.raises(txmgr.TransactionAborted) as info, \
            bank.manager(hooks=hooks).transaction() as tx:
        if writers == "two-phase":
            move(tx, "a", "b")
        else:
            move(tx, "b")
        hooks.conn = tx.connection("b")
    assert_untouched(bank)
    verb = "PREPARE TRANSACTION" if writers == "two-phase" else "COMMIT"
    assert f"already failed, so {verb} rolled it back" in str(info.value)
    check_error(info.value, r"savepoint", secrets)


# -- the application misuses a branch ---------------------------------------------------


ManualEnd = Callable[[psycopg.Connection[Any]], object]
MANUAL_ENDS: dict[str, ManualEnd] = {
    "sql-commit": lambda c: c.execute("COMMIT"),
    "sql-rollback": lambda c: c.execute("rollback"),
    "sql-end-after-comment": lambda c: c.execute("/* done */ END"),
    "sql-in-multi-statement": lambda c: c.execute("SELECT 1; COMMIT"),
    "sql-prepare-transaction": lambda c: c.execute("PREPARE TRANSACTION 'mine'"),
    "cursor-commit": lambda c: c.cursor().execute("commit"),
    "method-commit": lambda c: c.commit(),
    "method-rollback": lambda c: c.rollback(),
    "autocommit": lambda c: setattr(c, "autocommit", True),
}


@pytest.mark.parametrize("how", sorted(MANUAL_ENDS))
def test_manual_transaction_control_is_refused(bank: Bank, secrets: list[str], how: str) -> None:
    with pytest.raises(txmgr.ManualTransactionControl) as info, bank.manager().transaction() as tx:
        move(tx, "a", "b")
        MANUAL_ENDS[how](tx.connection("b"))
    assert_untouched(bank)
    assert "not allowed" in str(info.value)
    check_error(info.value, r"raise an exception inside the block", secrets)


# Roles every server has; a superuser (the harness's DSNs) may switch to them,
# so each statement would succeed if it reached the server.
# (Every spelling the scanner knows is unit-tested in test_security.py.)
ROLE_CHANGES = {
    "set-role": "SET ROLE pg_monitor",
    "set-local-role": "set local role pg_monitor",
    "set-session-authorization": "SET SESSION AUTHORIZATION pg_monitor",
    "reset-role": "RESET ROLE",
    "set-config": "SELECT 1; SELECT set_config('role', 'pg_monitor', true)",
}


@pytest.mark.parametrize("case", sorted(ROLE_CHANGES))
def test_role_change_inside_a_branch_is_refused(
    bank: Bank, secrets: list[str], case: str
) -> None:
    """A branch prepared under another role could be finished by neither this
    session nor recovery ("permission denied to finish prepared transaction")."""
    tm = bank.manager(pool_max_size=1)  # the next transaction gets the same session
    with pytest.raises(txmgr.RoleChangeInBranch) as info, tm.transaction() as tx:
        move(tx, "a", "b")
        tx.connection("b").execute(ROLE_CHANGES[case])
    assert_untouched(bank)
    check_error(info.value, r"connect as that role instead \(the user in 'b''s DSN\)", secrets)
    with tm.transaction() as tx:  # nothing reached the server: the session is unchanged
        row = tx.connection("b").execute("SELECT current_user = session_user").fetchone()
    assert row == (True,)


HIDDEN_ROLE_CHANGES = {
    # the guard reads statement text: a bound name, a DO block or a function hide it
    "bound-name": ("SELECT set_config(%s, %s, true)", ("role", "pg_monitor")),
    "do-block": ("DO $$ BEGIN PERFORM set_config('ro' || 'le', 'pg_monitor', true); END $$",
                 None),
}


@pytest.mark.parametrize("case", sorted(HIDDEN_ROLE_CHANGES))
def test_role_change_hidden_from_the_guard_stops_the_prepare(
    bank: Bank, secrets: list[str], case: str
) -> None:
    """The vote compares current_user with the branch's role at BEGIN."""
    statement, params = HIDDEN_ROLE_CHANGES[case]
    with pytest.raises(txmgr.TransactionAborted) as info, bank.manager().transaction() as tx:
        move(tx, "a", "b")
        tx.connection("b").execute(statement, params)
        assert tx.connection("b").execute("SELECT current_user").fetchone() == ("pg_monitor",)
    assert isinstance(info.value.__cause__, txmgr.RoleChangeInBranch)
    check_error(info.value, r"role changed from .* to 'pg_monitor'", secrets)
    check_error(info.value.__cause__, r"connect as that role in the participant's DSN", secrets)
    assert_untouched(bank)


# -- configuration and API misuse -------------------------------------------------------


def test_unknown_participant(bank: Bank) -> None:
    tm = bank.manager()
    with pytest.raises(txmgr.UnknownParticipant, match=r"'nope'.*\['a', 'b'\].*add it"):
        with tm.transaction() as tx:
            move(tx, "a")
            tx.connection("nope")
    assert_untouched(bank)


@pytest.mark.parametrize("name", ["Orders", "1st", "a-b", "x" * 33, "", "orders "])
def test_invalid_participant_name(name: str) -> None:
    # (Refused before connecting: test_security.py proves it with a listener.)
    with pytest.raises(txmgr.InvalidParticipantName, match=r"\[a-z\]\[a-z0-9_\].*rename it"):
        txmgr.TransactionManager({name: "postgresql://app@db1/a", "b": "postgresql://app@db2/b"},
                                 "postgresql://app@db0/txlog")


def test_missing_log_schema(bank: Bank, make_database: Any, secrets: list[str]) -> None:
    empty_log = make_database()
    tm = txmgr.TransactionManager(bank.dsns, empty_log)
    with pytest.raises(txmgr.LogSchemaError) as info:
        tm.transaction()
    tm.close()
    assert_untouched(bank)
    assert "has no txmgr tables" in str(info.value)
    check_error(info.value, r"run `txmgr migrate --config FILE`", secrets)


def test_outdated_log_schema(bank: Bank, make_database: Any) -> None:
    old_log = make_database()
    txmgr.migrate(old_log, revision="0001")
    tm = txmgr.TransactionManager(bank.dsns, old_log)
    with pytest.raises(txmgr.LogSchemaError, match=r"'0001'.*txmgr migrate"):
        tm.transaction()
    tm.close()
    txmgr.migrate(old_log)
    tm = txmgr.TransactionManager(bank.dsns, old_log)
    with tm.transaction() as tx:
        tx.connection("a").execute("UPDATE accounts SET balance = 1 WHERE id = 1")
    tm.close()


def test_log_neither_participant_nor_dsn(bank: Bank) -> None:
    with pytest.raises(txmgr.ConfigError, match="neither a configured participant nor a DSN"):
        txmgr.TransactionManager(bank.dsns, "txlog")


def test_savepoint_statements_are_allowed(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        conn = tx.connection("a")
        conn.execute("SAVEPOINT s")
        conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("SELECT 'commit; rollback; set role x'")
        tx.connection("b").execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
    assert (bank.balance("a"), bank.balance("b")) == (START, START + 1)


def test_use_after_commit(bank: Bank) -> None:
    tm = bank.manager()
    with tm.transaction() as tx:
        tx.connection("a").execute("SELECT 1")
    with pytest.raises(txmgr.TransactionStateError, match=r"'connection\(\)'.*start a new one"):
        tx.connection("a")
    with pytest.raises(txmgr.TransactionStateError, match="'commit\\(\\)'"):
        tx.commit()


def test_transaction_on_a_closed_manager(bank: Bank) -> None:
    tm = bank.manager()
    tm.close()
    with pytest.raises(txmgr.TransactionStateError, match=r"closed TransactionManager.*new one"):
        tm.transaction()


# -- the hints themselves (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (psycopg.errors.FeatureNotSupported(
            "cannot PREPARE a transaction that has operated on temporary objects"),
         "used temporary tables"),
        (psycopg.errors.FeatureNotSupported(
            "cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY"),
         "ran LISTEN, UNLISTEN or NOTIFY"),
        (psycopg.errors.FeatureNotSupported(
            "cannot PREPARE a transaction that has created a cursor WITH HOLD"),
         "created a cursor WITH HOLD"),
        (psycopg.errors.FeatureNotSupported("cannot PREPARE something new"),
         "cannot prepare what this branch did"),
        (psycopg.errors.OutOfMemory("maximum number of prepared transactions reached"),
         "max_prepared_transactions"),
        (psycopg.errors.DuplicateObject('transaction identifier "x" is already in use'),
         "retry the transaction"),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
         "raise statement_timeout"),
        (psycopg.errors.QueryCanceled("canceling statement due to user request"),
         "retry the whole global transaction"),
        (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
         "raise lock_timeout"),
        (psycopg.errors.SerializationFailure("could not serialize access"),
         "concurrent transaction: retry"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "concurrent transaction: retry"),
        (psycopg.errors.ForeignKeyViolation("violates foreign key constraint"),
         "deferred constraint"),
        (psycopg.OperationalError("server closed the connection unexpectedly"),
         "rolled back by recovery"),
    ],
)
def test_prepare_failure_hint(error: BaseException, hint: str) -> None:
    found = prepare_failure_hint(error)
    assert found is not None and hint in found
    assert with_hint("participant 'b' could not prepare", error).endswith(found)


def test_no_hint_for_unknown_errors() -> None:
    assert prepare_failure_hint(psycopg.errors.OutOfMemory("out of memory")) is None
    assert prepare_failure_hint(ValueError("x")) is None
    assert with_hint("as is", ValueError("x")) == "as is"
    assert with_hint("as is", None) == "as is"
    assert "savepoint" in FAILED_BRANCH_HINT


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ('FATAL:  password authentication failed for user "app"', "refused the password"),
        ("fe_sendauth: no password supplied", "refused the password"),
        ('no pg_hba.conf entry for host "10.0.0.1"', "pg_hba.conf"),
        ('FATAL:  database "x" does not exist', "database and user names"),
        ("Connection refused", "nothing listens there"),
        ('could not translate host name "db" to address', "does not resolve"),
        ("timeout expired", "connect_timeout"),
        ("FATAL:  sorry, too many clients already", "max_connections"),
        ("FATAL:  the database system is starting up", "try again"),
        ("something new", "check host, port, database name, user and password"),
    ],
)
def test_connect_failure_hint(text: str, hint: str) -> None:
    assert hint in connect_failure_hint(psycopg.OperationalError(text))

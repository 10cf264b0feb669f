"""The network rows of the failure matrix: connections lost at exact protocol steps.

Every participant and the dedicated log database sit behind their own
:class:`~txmgr.testing.proxy.FaultProxy`; the coordinator connects through the
proxies, while the checks and recovery connect directly. Each scenario runs
with both front ends (``TransactionManager`` and ``AsyncTransactionManager``,
see ``frontends.py``) and ends with a recovery pass and a check of the end
state: every branch committed or none, money conserved, nothing left
prepared, no decision row left over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import txmgr
from frontends import FRONTS, Front, Manager, Tx
from support import START, Bank, MakeBank, query
from txmgr import TransactionState
from txmgr._multiplex import StepTimeout
from txmgr.testing.proxy import Action, FaultProxy

pytestmark = pytest.mark.crash

T = TypeVar("T")
AMOUNT = 100
# L's COMMIT: alone (a dedicated log, and psycopg's conn.commit()), or at the end
# of the decision row's query (a log participant that wrote). COMMIT PREPARED
# does not match.
DECISION_COMMIT = r"(^|;\s*)COMMIT\s*$"
Outcome = tuple[Tx, "txmgr.TxmgrError | None"]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for something another thread or server process does on its own."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def proxy_for(dsn: str) -> FaultProxy:
    params = conninfo_to_dict(dsn)
    return FaultProxy(str(params["host"]), int(str(params["port"]))).start()


async def transfer(tm: Manager) -> Outcome:
    """Move AMOUNT from a to b; the transaction and the error it ended with, if any."""
    tx = tm.transaction()
    try:
        async with tx:
            await tx.execute("a", "UPDATE accounts SET balance = balance - %s WHERE id = 1",
                             (AMOUNT,))
            await tx.execute("b", "UPDATE accounts SET balance = balance + %s WHERE id = 1",
                             (AMOUNT,))
    except txmgr.TxmgrError as e:
        return tx, e
    return tx, None


@dataclass
class Net:
    """A bank whose coordinators talk to every database through a fault proxy."""

    bank: Bank  # direct connections: for checks and recovery
    proxies: dict[str, FaultProxy]  # one per participant, and "log" for a dedicated log
    front: Front

    def manager(
        self, dsn_params: dict[str, dict[str, Any]] | None = None, **options: Any
    ) -> Manager:
        """A coordinator connected through the proxies, closed when :meth:`run`
        ends (``dsn_params``: extra connection parameters per participant)."""
        dsn_params = dsn_params or {}
        dsns = {
            name: make_conninfo(self.proxies[name].dsn(dsn), **dsn_params.get(name, {}))
            for name, dsn in self.bank.dsns.items()
        }
        log = self.proxies["log"].dsn(self.bank.log) if "log" in self.proxies else self.bank.log
        return self.front.manager(dsns, log, **options)

    def run(self, scenario: Callable[[], Awaitable[T]]) -> T:
        return self.front.run(scenario)

    def transfer(self, **options: Any) -> Outcome:
        """One transfer by a new coordinator (closed afterwards)."""
        return self.run(lambda: transfer(self.manager(**options)))

    def log_proxy(self) -> FaultProxy:
        """The proxy carrying the decision transaction: the dedicated log's, or the
        log participant's (its own branch is L)."""
        return self.proxies.get("log") or self.proxies[self.bank.log]

    def recover(self) -> txmgr.RecoveryReport:
        report = txmgr.recover(self.bank.config())
        assert report.ok, report.errors
        return report

    def assert_rolled_back(self) -> None:
        assert (self.bank.balance("a"), self.bank.balance("b")) == (START, START)
        assert self.bank.total() == self.bank.expected_total
        assert self.bank.prepared() == []
        assert self.bank.decisions() == []

    def assert_committed(self, times: int = 1) -> None:
        moved = times * AMOUNT
        assert (self.bank.balance("a"), self.bank.balance("b")) == (START - moved, START + moved)
        assert self.bank.total() == self.bank.expected_total
        assert self.bank.prepared() == []


MakeNet = Callable[..., Net]


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> Front:
    return Front(request.param)


@pytest.fixture(autouse=True)
def quiet_proxies(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Cutting connections is the proxies' job: their threads log no problem about it."""
    caplog.set_level(logging.WARNING)
    yield
    noisy = [r for r in caplog.records if r.threadName.startswith("txmgr-fault-proxy")]
    assert noisy == [], [r.getMessage() for r in noisy]


# The rows whose I/O differs between the front ends (lost replies, retries on
# new connections, asking the log) run with both; the others with the blocking one.
SYNC_ONLY = pytest.mark.parametrize("front", ["sync"], indirect=True)


@pytest.fixture
def make_net(make_bank: MakeBank, front: Front) -> Iterator[MakeNet]:
    """``make_net(log="dedicated"|"a")``: participants "a" and "b" on two servers."""
    proxies: list[FaultProxy] = []

    def make(log: str = "dedicated") -> Net:
        bank = make_bank(("a", "b"), log=log)
        net = Net(bank, {name: proxy_for(dsn) for name, dsn in bank.dsns.items()}, front)
        if log == "dedicated":
            net.proxies["log"] = proxy_for(bank.log)
        proxies.extend(net.proxies.values())
        return net

    yield make
    for proxy in proxies:
        proxy.stop()


def assert_prepared_branch(net: Net, tx: Tx, participant: str) -> None:
    """Exactly one branch is prepared: ``tx``'s, on ``participant``."""
    left = net.bank.prepared()
    assert len(left) == 1 and f"_{tx.txid}_" in left[0], left
    assert left[0].endswith(f"_{participant}"), left


# -- before any PREPARE ---------------------------------------------------------------


@SYNC_ONLY
def test_participant_lost_while_the_application_works(make_net: MakeNet) -> None:
    net = make_net()

    async def scenario() -> Outcome:
        tx = net.manager().transaction()
        try:
            async with tx:
                await tx.execute("a", "UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                await tx.execute("b", "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                net.proxies["b"].drop_all()
        except txmgr.TxmgrError as e:
            return tx, e
        return tx, None

    tx, err = net.run(scenario)
    assert isinstance(err, txmgr.TransactionAborted), err
    assert "failed before prepare" in str(err)
    assert tx.state is TransactionState.ROLLED_BACK
    assert net.recover().resolutions == []
    net.assert_rolled_back()


@pytest.mark.parametrize("action", ["drop_before", "drop_after_forward"])
def test_participant_lost_while_opening_a_branch(make_net: MakeNet, action: Action) -> None:
    net = make_net()
    rule = net.proxies["b"].add_rule(r"^BEGIN; SELECT set_config\('txmgr\.txid'", action)
    tx, err = net.transfer()  # the branch is opened again on a new connection
    assert err is None and tx.state is TransactionState.COMMITTED and rule.hits == 1
    net.assert_committed()


# -- PREPARE TRANSACTION ------------------------------------------------------------


def test_prepare_lost_before_the_server_got_it(make_net: MakeNet) -> None:
    net = make_net()
    rule = net.proxies["b"].add_rule(r"^PREPARE TRANSACTION", "drop_before")

    async def scenario() -> tuple[Outcome, Outcome]:
        tm = net.manager()
        lost = await transfer(tm)
        # "a" was prepared and rolled back by the coordinator; "b" never prepared.
        assert net.bank.prepared() == []
        # The broken connection was discarded: the next transaction goes through.
        return lost, await transfer(tm)

    (tx, err), (again, again_err) = net.run(scenario)
    assert isinstance(err, txmgr.TransactionAborted), err
    assert "could not prepare" in str(err)
    assert rule.hits == 1 and tx.state is TransactionState.ROLLED_BACK
    assert again_err is None and again.state is TransactionState.COMMITTED
    assert net.recover().resolutions == []
    net.assert_committed()


@pytest.mark.parametrize("log", ["dedicated", "a"])
def test_prepare_executed_but_its_reply_lost(make_net: MakeNet, log: str) -> None:
    net = make_net(log)
    rule = net.proxies["b"].add_rule(r"^PREPARE TRANSACTION", "drop_after_forward")
    tx, err = net.transfer()
    assert isinstance(err, txmgr.TransactionAborted), err
    assert "could not prepare" in str(err)
    assert rule.hits == 1 and tx.state is TransactionState.ROLLED_BACK
    # "b" did prepare; its coordinator lost the connection that could roll it
    # back, and the decision was never made, so recovery rolls it back.
    assert_prepared_branch(net, tx, "b")
    assert net.bank.decisions() == []
    report = net.recover()
    assert (report.rolled_back, report.committed) == (1, 0)
    net.assert_rolled_back()


@SYNC_ONLY
def test_rollback_prepared_lost_after_a_failed_prepare(make_net: MakeNet) -> None:
    net = make_net()
    net.proxies["b"].add_rule(r"^PREPARE TRANSACTION", "drop_before")
    rule = net.proxies["a"].add_rule(r"^ROLLBACK PREPARED", "drop_before")
    tx, err = net.transfer()
    assert isinstance(err, txmgr.TransactionAborted), err
    assert rule.hits == 1 and tx.state is TransactionState.ROLLED_BACK
    assert_prepared_branch(net, tx, "a")  # the coordinator could not roll it back
    report = net.recover()
    assert (report.rolled_back, report.committed) == (1, 0)
    net.assert_rolled_back()


@SYNC_ONLY
def test_blackholed_participant_at_prepare(make_net: MakeNet) -> None:
    """A participant that stops answering while its PREPARE is in flight, its host
    still acknowledging every TCP segment (a frozen server, a stuck middlebox).

    Measured, without a step_timeout: the coordinator waits until the
    connection closes, whatever the TCP settings — keepalive probes are
    answered and no data stays unacknowledged, so neither keepalives nor
    ``tcp_user_timeout`` end the wait (hence step_timeout, tested below).
    Atomicity holds meanwhile: the log server
    aborts the idle decision transaction after ``log_idle_timeout``, and
    recovery rolls back the other, prepared branch while the coordinator still
    waits. When the connection finally breaks, the coordinator reports an abort.
    """
    net = make_net()
    eager = {"keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 1,
             "tcp_user_timeout": 1000}  # would notice a vanished peer within ~2 s
    rule = net.proxies["b"].add_rule(r"^PREPARE TRANSACTION", "blackhole")
    started = time.monotonic()
    outcome: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcome.append(
        net.transfer(dsn_params={"b": eager}, log_idle_timeout=1.0, step_timeout=None)))
    worker.start()
    try:
        wait_until(lambda: rule.hits == 1 and len(net.bank.prepared("a")) == 1)
        lxid = int(net.bank.prepared("a")[0].split("_")[3])
        wait_until(lambda: query(net.bank.log_dsn, "SELECT pg_xact_status(%s::text::xid8)",
                                 (lxid,))[0][0] == "aborted")
        report = net.recover()
        assert (report.rolled_back, report.committed) == (1, 0)  # "a", behind its back
        assert net.bank.prepared() == []
        # Still waiting, well past what the TCP settings would allow a dead peer.
        worker.join(timeout=max(0.0, 4.0 - (time.monotonic() - started)))
        assert worker.is_alive() and outcome == []
    finally:
        net.proxies["b"].drop_all()  # the connection breaks at last
        worker.join(timeout=60)
    assert not worker.is_alive()
    tx, err = outcome[0]
    assert isinstance(err, txmgr.TransactionAborted), err
    assert tx.state is TransactionState.ROLLED_BACK
    net.assert_rolled_back()


def step_timeout_in_chain(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, StepTimeout):
            return True
        err = err.__cause__ or err.__context__
    return False


def test_a_participant_silent_at_prepare_is_given_up_after_step_timeout(
    make_net: MakeNet,
) -> None:
    """As above, but with a step_timeout: the coordinator closes the silent
    connection and aborts, rolling back the other branch itself."""
    net = make_net()
    rule = net.proxies["b"].add_rule(r"^PREPARE TRANSACTION", "blackhole")
    tx, err = net.transfer(step_timeout=1.0)
    assert rule.hits == 1
    assert isinstance(err, txmgr.TransactionAborted), err
    assert step_timeout_in_chain(err), err
    assert tx.state is TransactionState.ROLLED_BACK
    # Its PREPARE never reached "b"; "a" was rolled back by the coordinator.
    net.assert_rolled_back()
    assert net.recover().resolutions == []


def test_a_participant_silent_at_commit_prepared_is_left_to_recovery_after_step_timeout(
    make_net: MakeNet,
) -> None:
    net = make_net()
    rule = net.proxies["b"].add_rule(r"^COMMIT PREPARED", "blackhole")
    tx, err = net.transfer(step_timeout=1.0)
    assert rule.hits == 1
    assert err is None, err  # decided: committed, "b" is finished by recovery
    assert tx.state is TransactionState.COMMITTED_PENDING
    assert_prepared_branch(net, tx, "b")
    report = net.recover()
    assert (report.committed, report.rolled_back) == (1, 0)
    net.assert_committed()


def test_a_log_silent_at_the_decision_is_given_up_after_step_timeout(
    make_net: MakeNet,
) -> None:
    """The decision's COMMIT is swallowed: after step_timeout the coordinator
    closes L's connection — the server aborts L — and learns from the log, on a
    new connection, that L never committed."""
    net = make_net()
    rule = net.proxies["log"].add_rule(DECISION_COMMIT, "blackhole")
    tx, err = net.transfer(step_timeout=1.0)
    assert rule.hits == 1
    assert isinstance(err, txmgr.TransactionAborted), err
    assert tx.state is TransactionState.ROLLED_BACK
    assert net.recover().resolutions == []
    net.assert_rolled_back()


# -- opening the decision ---------------------------------------------------------------


@pytest.mark.parametrize("action", ["drop_before", "drop_after_forward"])
def test_log_lost_while_opening_the_decision(make_net: MakeNet, action: Action) -> None:
    net = make_net()
    rules = []

    async def scenario() -> tuple[Outcome, Outcome]:
        tm = net.manager()
        first = await transfer(tm)
        assert net.bank.decisions() == [first[0].txid]  # deleted by the next decision
        # The one query that opens L: "BEGIN; DELETE finished rows; INSERT the decision".
        rules.append(
            net.proxies["log"].add_rule(r"^BEGIN;.*INSERT INTO txmgr_decision", action)
        )
        second = await transfer(tm)  # retried on a new connection: nothing was decided
        assert net.bank.decisions() == [second[0].txid]  # the retry deleted the first row
        return first, second

    (first, err1), (tx, err2) = net.run(scenario)
    assert err1 is None and first.state is TransactionState.COMMITTED
    assert err2 is None and tx.state is TransactionState.COMMITTED and rules[0].hits == 1
    net.assert_committed(times=2)
    net.recover()
    assert net.bank.decisions() == []


@SYNC_ONLY
@pytest.mark.parametrize("action", ["drop_before", "drop_after_forward"])
def test_log_participant_lost_while_deciding(make_net: MakeNet, action: Action) -> None:
    net = make_net("a")
    # L is "a"'s own branch, and "a" wrote: its xid names L from the vote on, and
    # the decision row goes with L's COMMIT, in one query sent after b prepared.
    rule = net.proxies["a"].add_rule(r"INSERT INTO txmgr_decision", action)
    tx, err = net.transfer()
    assert rule.hits == 1
    if action == "drop_before":  # the server never got it, and ends L: aborted
        assert isinstance(err, txmgr.TransactionAborted), err
        assert tx.state is TransactionState.ROLLED_BACK
        assert net.bank.prepared() == []  # the coordinator rolled b back itself
        net.assert_rolled_back()
    else:  # the server committed L, the reply was lost: the log says committed
        assert err is None and tx.state is TransactionState.COMMITTED
        net.assert_committed()
    assert net.recover().resolutions == []
    assert net.bank.decisions() == []


# -- the decision: COMMIT of L --------------------------------------------------------


@pytest.mark.parametrize("log", ["dedicated", "a"])
def test_decision_lost_before_the_log_got_it(make_net: MakeNet, log: str) -> None:
    net = make_net(log)
    rule = net.log_proxy().add_rule(DECISION_COMMIT, "drop_before")
    tx, err = net.transfer()
    # The coordinator asked the log on a new connection: L never committed.
    assert isinstance(err, txmgr.TransactionAborted), err
    assert "did not commit" in str(err)
    assert rule.hits == 1 and tx.state is TransactionState.ROLLED_BACK
    assert net.bank.prepared() == []  # the coordinator rolled its branches back itself
    assert net.recover().resolutions == []
    net.assert_rolled_back()


@pytest.mark.parametrize("log", ["dedicated", "a"])
def test_decision_committed_but_its_reply_lost(make_net: MakeNet, log: str) -> None:
    net = make_net(log)
    rule = net.log_proxy().add_rule(DECISION_COMMIT, "drop_after_forward")
    tx, err = net.transfer()
    # The coordinator asked the log on a new connection: L committed.
    assert err is None, err
    assert rule.hits == 1 and tx.state is TransactionState.COMMITTED
    net.assert_committed()
    assert net.recover().resolutions == []
    assert net.bank.decisions() == []


@pytest.mark.parametrize("action", ["drop_before", "drop_after_forward"])
def test_log_unreachable_after_a_lost_decision(
    make_net: MakeNet, monkeypatch: pytest.MonkeyPatch, action: Action
) -> None:
    import txmgr.transaction

    monkeypatch.setattr(txmgr.transaction, "CONFIRM_PATIENCE", 0.5)
    net = make_net()
    decision = net.proxies["log"].add_rule(DECISION_COMMIT, action)
    asking = net.proxies["log"].add_rule(r"pg_xact_status", "drop_before", times=None)
    tx, err = net.transfer()
    # The coordinator could not learn whether L committed: it must not guess.
    assert isinstance(err, txmgr.OutcomeUnknown), err
    assert err.txid == tx.txid and tx.state is TransactionState.UNKNOWN
    assert decision.hits == 1 and asking.hits >= 1
    assert len(net.bank.prepared()) == 2  # in doubt, for recovery to settle
    report = net.recover()
    if action == "drop_before":  # L never committed
        assert (report.rolled_back, report.committed) == (2, 0)
        net.assert_rolled_back()
    else:
        assert (report.rolled_back, report.committed) == (0, 2)
        net.assert_committed()
        assert net.bank.decisions() == []


def test_recovery_finishes_while_the_coordinator_asks_the_log(
    make_net: MakeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L committed but its reply was lost; while the coordinator's question to the
    log hangs, recovery commits every branch and deletes the row. The log can no
    longer tell the coordinator which way it went: OutcomeUnknown, not a guess."""
    import txmgr.transaction

    monkeypatch.setattr(txmgr.transaction, "CONFIRM_PATIENCE", 60.0)  # it keeps asking
    net = make_net()
    decision = net.proxies["log"].add_rule(DECISION_COMMIT, "drop_after_forward")
    asking = net.proxies["log"].add_rule(r"pg_xact_status", "blackhole")
    outcome: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcome.append(net.transfer()))
    worker.start()
    try:
        wait_until(lambda: asking.hits == 1)
        for _ in range(3):  # commit the branches, then delete the finished row
            report = net.recover()
            assert report.rolled_back == 0
            if not net.bank.decisions():
                break
        assert net.bank.decisions() == [] and net.bank.prepared() == []
    finally:
        net.proxies["log"].drop_all()  # the question fails; the coordinator asks again
        worker.join(timeout=60)
    assert not worker.is_alive()
    tx, err = outcome[0]
    assert decision.hits == 1
    assert isinstance(err, txmgr.OutcomeUnknown), err
    assert "recovery had already finished" in str(err)
    assert tx.state is TransactionState.UNKNOWN
    net.assert_committed()


@SYNC_ONLY
def test_decision_stuck_in_the_network(make_net: MakeNet) -> None:
    """The decision's COMMIT vanishes into a partition: the coordinator waits, L
    stays open on the log, and recovery leaves both prepared branches alone. When
    the connection breaks, the coordinator learns from the log that L never
    committed, and rolls back."""
    net = make_net()
    rule = net.proxies["log"].add_rule(DECISION_COMMIT, "blackhole")
    outcome: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcome.append(net.transfer()))
    worker.start()
    try:
        wait_until(lambda: rule.hits == 1)
        report = net.recover()
        assert [r.outcome for r in report.resolutions] == ["in progress", "in progress"]
        assert len(net.bank.prepared()) == 2
        assert worker.is_alive()  # nothing can reach it through the blackhole
    finally:
        net.proxies["log"].drop_all()
        worker.join(timeout=60)
    assert not worker.is_alive()
    tx, err = outcome[0]
    assert isinstance(err, txmgr.TransactionAborted), err
    assert tx.state is TransactionState.ROLLED_BACK
    assert net.recover().resolutions == []
    net.assert_rolled_back()


def test_stale_log_connection_after_a_decision(make_net: MakeNet) -> None:
    net = make_net()
    rule = net.proxies["log"].add_rule(DECISION_COMMIT, "drop_after_reply")

    async def scenario() -> tuple[Outcome, Outcome]:
        tm = net.manager(pool_max_size=1)  # the next decision gets the same, dead, connection
        first = await transfer(tm)
        return first, await transfer(tm)  # its decision fails, then is retried

    (first, err1), (tx, err2) = net.run(scenario)
    assert err1 is None and first.state is TransactionState.COMMITTED and rule.hits == 1
    assert err2 is None and tx.state is TransactionState.COMMITTED
    net.assert_committed(times=2)
    net.recover()
    assert net.bank.decisions() == []


@SYNC_ONLY
@pytest.mark.parametrize("action", ["drop_before", "drop_after_forward"])
def test_one_phase_commit_lost(make_net: MakeNet, action: Action) -> None:
    net = make_net()
    rule = net.proxies["a"].add_rule(DECISION_COMMIT, action)

    async def scenario() -> Outcome:
        # Only "a" writes: it commits in one phase, without the log, so a lost
        # reply leaves no way to learn the outcome but to look at the data.
        tx = net.manager().transaction()
        try:
            async with tx:
                await tx.execute("a", "UPDATE accounts SET balance = balance - 7 WHERE id = 1")
                await tx.execute("b", "SELECT balance FROM accounts WHERE id = 1")
        except txmgr.TxmgrError as e:
            return tx, e
        return tx, None

    tx, err = net.run(scenario)
    assert isinstance(err, txmgr.OutcomeUnknown), err
    assert rule.hits == 1 and tx.state is TransactionState.UNKNOWN
    assert net.recover().resolutions == []
    assert net.bank.balance("a") == (START if action == "drop_before" else START - 7)
    assert net.bank.prepared() == [] and net.bank.decisions() == []


# -- COMMIT PREPARED --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "action"),
    [
        (r"^COMMIT PREPARED", "drop_before"),
        (r"^COMMIT PREPARED", "drop_after_forward"),
        # prepared and acknowledged, then the connection is gone before COMMIT PREPARED
        (r"^PREPARE TRANSACTION", "drop_after_reply"),
    ],
)
def test_commit_prepared_lost(make_net: MakeNet, pattern: str, action: Action) -> None:
    net = make_net()
    rule = net.proxies["b"].add_rule(pattern, action)
    tx, err = net.transfer()
    # Decided: the application is told it committed; recovery finishes "b".
    assert err is None, err
    assert rule.hits == 1
    assert tx.state in (TransactionState.COMMITTED_PENDING, TransactionState.COMMITTED)
    if action == "drop_after_forward":  # the server committed it, the coordinator cannot know
        assert net.bank.prepared() == []
    else:
        assert tx.state is TransactionState.COMMITTED_PENDING
        assert_prepared_branch(net, tx, "b")
    left = len(net.bank.prepared())
    if tx.state is TransactionState.COMMITTED_PENDING:
        assert net.bank.decisions() == [tx.txid]  # kept while a branch may be in doubt
    report = net.recover()
    assert (report.committed, report.rolled_back) == (left, 0)
    net.assert_committed()
    assert net.bank.decisions() == []

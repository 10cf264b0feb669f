"""The commit protocol as pure steps: driven here by a scripted fake, no server.

The protocol (txmgr._protocol) yields requests and receives their results;
both front ends only perform them. These tests perform them with fakes and
check the requests themselves: which queries go out together in one round
trip, in which order, and what is released on every path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

import txmgr
from txmgr._ops import (
    Checkout,
    Forget,
    LogConnection,
    Op,
    ReadDecision,
    Release,
    ReleaseLog,
    Run,
    Step,
)
from txmgr._protocol import TransactionCore
from txmgr.config import Config
from txmgr.hooks import Hooks

State = txmgr.TransactionState


class FakeInfo:
    def __init__(self) -> None:
        self.transaction_status = TransactionStatus.IDLE
        self.encoding = "utf-8"


class FakeConn:
    """Just enough of a psycopg connection for the protocol and sql.Literal."""

    adapters = psycopg.adapters
    pgconn = None
    connection = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.info = FakeInfo()
        self.closed = False
        self.broken = False
        self._txmgr_branch: str | None = None

    def __repr__(self) -> str:
        return f"<FakeConn {self.name}>"


class FakeManager:
    def __init__(self, log: str = "host=log dbname=log") -> None:
        self.config = Config(participants={"a": "host=a dbname=a", "b": "host=b dbname=b",
                                           "c": "host=c dbname=c"}, log=log)
        self.hooks = Hooks()
        self.forgotten: list[str] = []
        self.waiting: list[str] = ["0123456789abcdef"]  # a finished decision to delete

    @property
    def log_participant(self) -> str | None:
        return self.config.log_participant

    def known_logid(self) -> str:
        return "0a1b2c3d"

    def take_forget(self) -> list[str]:
        batch, self.waiting = self.waiting, []
        return batch

    def forget_later(self, txids: list[str]) -> None:
        self.waiting[:0] = txids


LABELS = [  # (query prefix, label), first match wins
    (b"BEGIN; SELECT set_config", "begin"),
    (b"SELECT pg_current_xact_id_if_assigned", "vote"),
    (b"PREPARE TRANSACTION", "prepare"),
    (b"COMMIT PREPARED", "commit prepared"),
    (b"ROLLBACK PREPARED", "rollback prepared"),
    (b"COMMIT", "commit"),
    (b"ROLLBACK", "rollback"),
]


def name_of(conn: Any) -> str:
    return str(conn.name)


def label(query: bytes) -> str:
    if b"INSERT INTO txmgr_decision" in query:
        return "decide" if query.endswith(b"; COMMIT") else "open decision"
    if query.startswith(b"SET LOCAL synchronous_commit = on; SET LOCAL idle_in_transaction"):
        return "vote as L"  # the log participant's vote sets what L needs
    return next(name for prefix, name in LABELS if query.startswith(prefix))


class Servers:
    """Answers the protocol's requests like servers would, and records them."""

    def __init__(self, core: TransactionCore, writers: set[str]) -> None:
        self.core = core
        self.writers = writers
        self.trace: list[Any] = []
        self.fail: dict[tuple[str, str], BaseException] = {}  # (conn, label) -> error
        self.decision: tuple[Any, bool] = ("committed", True)  # what ReadDecision answers

    def perform(self, op: Op) -> Any:
        match op:
            case Run(jobs):
                self.trace.append(sorted((name_of(j.conn), label(j.query)) for j in jobs))
                for job in jobs:
                    self._answer(job)
                return None
            case Checkout(name):
                self.trace.append(("checkout", name))
                return FakeConn(name)
            case Release(name, _):
                self.trace.append(("release", name))
            case LogConnection(wait):
                self.trace.append(("log connection", wait))
                return FakeConn("log")
            case ReleaseLog(_):
                self.trace.append(("release", "log"))
            case ReadDecision(lxid, _):
                self.trace.append(("read decision", lxid))
                return self.decision
            case Forget(txids):
                self.trace.append(("forget", txids))
        return None

    def _answer(self, job: Any) -> None:
        conn: FakeConn = job.conn
        what = label(job.query)
        error = self.fail.get((conn.name, what))
        if error is not None:
            job.error = error
            return
        if what in ("begin", "open decision"):
            conn.info.transaction_status = TransactionStatus.INTRANS
        elif what in ("prepare", "commit", "rollback", "decide"):
            conn.info.transaction_status = TransactionStatus.IDLE
        job.tag = {"prepare": b"PREPARE TRANSACTION", "commit": b"COMMIT",
                   "decide": b"COMMIT"}.get(what, b"OK")
        if what == "begin":
            job.rows = [(self.core.txid, "app")]
        elif what in ("vote", "vote as L"):
            # The branch's xid if it wrote, else NULL.
            job.rows = [("7" if conn.name in self.writers else None, self.core.txid, "app")]
        elif what == "open decision":
            job.rows = [("77",)]


def drive(step: Step[Any], perform: Callable[[Op], Any]) -> Any:
    """What both front ends do, with ``perform`` for the I/O."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = step.send(result) if error is None else step.throw(error)
        except StopIteration as stop:
            return stop.value
        result = error = None
        try:
            result = perform(op)
        except BaseException as e:
            error = e


def transaction(names: tuple[str, ...], writers: set[str], log: str = "host=log dbname=log",
                ) -> tuple[TransactionCore, Servers, FakeManager]:
    tm = FakeManager(log)
    core = TransactionCore(tm)
    servers = Servers(core, writers)
    for n in names:
        drive(core.open_branch(n), servers.perform)
    servers.trace.clear()
    return core, servers, tm


@pytest.fixture(autouse=True)
def _no_failpoints() -> Iterator[None]:
    from txmgr import failpoints

    failpoints.clear()
    yield
    failpoints.clear()


def test_two_writers_take_four_round_trips() -> None:
    core, servers, tm = transaction(("a", "b"), writers={"a", "b"})
    drive(core.commit(patience=0), servers.perform)
    assert core.state is State.COMMITTED
    assert servers.trace == [
        ("log connection", False),
        # the votes and the decision row in one round trip
        [("a", "vote"), ("b", "vote"), ("log", "open decision")],
        [("a", "prepare"), ("b", "prepare")],
        [("log", "commit")],  # the commit point
        [("a", "commit prepared"), ("b", "commit prepared")],
        ("forget", [core.txid]),
        ("release", "log"),
        ("release", "a"),
        ("release", "b"),
    ]
    assert tm.waiting == []  # the earlier finished decision was deleted by this one


def test_one_writer_commits_in_one_phase_and_drops_the_decision() -> None:
    core, servers, tm = transaction(("a", "b"), writers={"a"})
    drive(core.commit(patience=0), servers.perform)
    assert core.state is State.COMMITTED
    assert servers.trace[1:4] == [
        [("a", "vote"), ("b", "vote"), ("log", "open decision")],
        [("a", "commit"), ("log", "rollback")],  # L was not needed
        [("b", "commit")],  # the reader ends after the writer
    ]
    assert tm.waiting == ["0123456789abcdef"]  # still to delete: L rolled back


def test_log_in_a_participant_is_its_branch() -> None:
    core, servers, _ = transaction(("b", "c"), writers={"b", "c"}, log="a")
    drive(core.commit(patience=0), servers.perform)
    assert core.state is State.COMMITTED
    assert servers.trace[:5] == [
        [("b", "vote"), ("c", "vote")],
        ("checkout", "a"),  # the log participant did no work: its branch opens now
        [("a", "begin")],
        [("a", "open decision")],
        [("b", "prepare"), ("c", "prepare")],
    ]
    assert servers.trace[5] == [("a", "commit")]  # one phase: the commit point


def test_a_log_participant_that_wrote_inserts_the_decision_with_its_commit() -> None:
    core, servers, tm = transaction(("a", "b", "c"), writers={"a", "b", "c"}, log="a")
    drive(core.commit(patience=0), servers.perform)
    assert core.state is State.COMMITTED
    assert servers.trace[:4] == [
        [("a", "vote as L"), ("b", "vote"), ("c", "vote")],
        # a's xid (from its vote) is L's: no round trip to open L
        [("b", "prepare"), ("c", "prepare")],
        [("a", "decide")],  # decision row + COMMIT: the commit point
        [("b", "commit prepared"), ("c", "commit prepared")],
    ]
    assert core.branches == {} and tm.waiting == []


def test_a_no_vote_rolls_everything_back() -> None:
    core, servers, tm = transaction(("a", "b", "c"), writers={"a", "b", "c"})
    servers.fail[("c", "prepare")] = psycopg.errors.UniqueViolation("dup")
    with pytest.raises(txmgr.TransactionAborted, match="'c' could not prepare") as info:
        drive(core.commit(patience=0), servers.perform)
    assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
    assert core.state is State.ROLLED_BACK
    assert servers.trace[2:5] == [
        [("a", "prepare"), ("b", "prepare"), ("c", "prepare")],
        [("log", "rollback")],
        # prepared branches are rolled back as such, the one that failed plainly
        [("a", "rollback prepared"), ("b", "rollback prepared"), ("c", "rollback")],
    ]
    assert ("read decision", 77) not in servers.trace
    assert servers.trace[-4:] == [("release", "log"), ("release", "a"), ("release", "b"),
                                  ("release", "c")]
    assert tm.waiting == ["0123456789abcdef"]  # not deleted: L rolled back


@pytest.mark.parametrize(("verdict", "state"), [(("committed", True), State.COMMITTED),
                                                (("aborted", False), State.ROLLED_BACK)])
def test_a_lost_commit_reply_is_settled_by_the_log(verdict: tuple[str, bool],
                                                   state: txmgr.TransactionState) -> None:
    core, servers, _ = transaction(("a", "b"), writers={"a", "b"})
    servers.fail[("log", "commit")] = psycopg.OperationalError("server closed the connection")
    servers.decision = verdict
    if state is State.ROLLED_BACK:
        with pytest.raises(txmgr.TransactionAborted, match="did not commit"):
            drive(core.commit(patience=0), servers.perform)
    else:
        drive(core.commit(patience=0), servers.perform)
    assert core.state is state
    assert servers.trace[4] == ("read decision", 77)
    finish = "commit prepared" if state is State.COMMITTED else "rollback prepared"
    assert servers.trace[5] == [("a", finish), ("b", finish)]


def test_an_interrupted_round_trip_still_releases_every_connection() -> None:
    core, servers, _ = transaction(("a", "b"), writers={"a", "b"})

    def interrupt_at_prepare(op: Op) -> Any:
        if isinstance(op, Run) and label(op.jobs[0].query) == "prepare":
            raise KeyboardInterrupt  # or asyncio.CancelledError in a task
        return servers.perform(op)

    with pytest.raises(KeyboardInterrupt):
        drive(core.commit(patience=0), interrupt_at_prepare)
    assert core.state is State.UNKNOWN  # recovery decides, as after a crash here
    assert servers.trace[-3:] == [("release", "log"), ("release", "a"), ("release", "b")]
    assert core.branches == {}

"""One global transaction and the commit protocol that ends it.

Protocol (see the README's "How it works"):

1. vote: ask every branch whether it wrote; read-only branches just end.
2. at most one writer: it commits in one phase, the log is not touched.
3. open the decision transaction ``L`` (dedicated log database, or the log
   participant's own branch) and insert the decision row; ``lxid`` = its xid.
4. ``PREPARE TRANSACTION`` every other writer in parallel; any failure aborts.
5. ``COMMIT`` ``L`` — the commit point. A lost reply is settled by asking
   ``pg_xact_status(lxid)`` on a fresh connection.
6. ``COMMIT PREPARED`` every branch in parallel; failures are left to recovery.
7. the decision row is deleted by a later decision transaction.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from txmgr import log as decision_log
from txmgr._branch import BranchConnection
from txmgr._gid import Gid, new_txid
from txmgr.config import Config
from txmgr.errors import (
    LogSchemaError,
    OutcomeUnknown,
    ParticipantUnavailable,
    TransactionAborted,
    TransactionStateError,
)
from txmgr.hooks import Hooks
from txmgr.participant import Participant, finish_prepared

__all__ = ["Transaction", "TransactionState"]

logger = logging.getLogger("txmgr")
T = TypeVar("T")
R = TypeVar("R")

# Seconds to keep asking the log about a decision whose COMMIT reply was lost
# while its server-side session is still winding down ("in progress").
CONFIRM_PATIENCE = 5.0


class _Coordinator(Protocol):
    """What a transaction needs from its manager (kept narrow: no import cycle)."""

    config: Config
    hooks: Hooks

    def logid(self) -> str: ...
    def participant(self, name: str) -> Participant: ...
    @property
    def log_participant(self) -> str | None: ...
    def log_connection(self) -> psycopg.Connection[Any]: ...
    def release_log_connection(self, conn: psycopg.Connection[Any]) -> None: ...
    def confirm_connection(self) -> psycopg.Connection[Any]: ...
    def parallel(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R | BaseException]: ...
    def take_forget(self) -> list[str]: ...
    def forget(self, txids: Iterable[str]) -> None: ...
    def forget_later(self, txids: list[str]) -> None: ...


class TransactionState(enum.Enum):
    ACTIVE = "active"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    #: committed by the decision, but some COMMIT PREPARED is left to recovery
    COMMITTED_PENDING = "committed (recovery finishes some branches)"
    UNKNOWN = "outcome unknown"


class _Branch:
    __slots__ = ("conn", "gid", "participant", "prepared")

    def __init__(self, participant: Participant, conn: BranchConnection) -> None:
        self.participant = participant
        self.conn = conn
        self.gid: str | None = None
        self.prepared = False

    @property
    def name(self) -> str:
        return self.participant.name


class Transaction:
    """A global transaction over any subset of the manager's participants.

    Not thread-safe: one thread drives one transaction (the manager is shared).
    """

    __slots__ = ("_branches", "_state", "_tm", "txid")

    def __init__(self, tm: _Coordinator) -> None:
        self._tm = tm
        self.txid = new_txid()
        self._branches: dict[str, _Branch] = {}  # participant name -> its branch
        self._state = TransactionState.ACTIVE

    def __repr__(self) -> str:
        return f"<Transaction {self.txid} {self._state.value} {sorted(self._branches)}>"

    @property
    def state(self) -> TransactionState:
        return self._state

    def connection(self, name: str) -> psycopg.Connection[Any]:
        """The psycopg connection of ``name``'s branch, opening the branch on first use."""
        self._require(TransactionState.ACTIVE, "connection()")
        branch = self._branches.get(name)
        if branch is None:
            participant = self._tm.participant(name)
            branch = _Branch(participant, self._open_branch(participant))
            self._branches[name] = branch
        return branch.conn

    def commit(self) -> None:
        """Commit every branch atomically (called by the ``with`` block on success)."""
        self._require(TransactionState.ACTIVE, "commit()")
        self._state = TransactionState.COMMITTING
        try:
            self._commit()
        finally:
            if self._state is TransactionState.COMMITTING:  # an unexpected error
                self._state = TransactionState.UNKNOWN
            self._release_all()

    def rollback(self) -> None:
        """Roll back every branch (called by the ``with`` block on an exception)."""
        if self._state is not TransactionState.ACTIVE:
            return
        self._rollback_branches(self._branches.values())
        self._state = TransactionState.ROLLED_BACK
        self._release_all()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.rollback()
        elif self._state is TransactionState.ACTIVE:
            self.commit()

    # -- steps ------------------------------------------------------------------

    def _require(self, state: TransactionState, call: str) -> None:
        if self._state is not state:
            raise TransactionStateError(
                f"'{call}' needs an {state.value} transaction; transaction {self.txid} is "
                f"{self._state.value}: start a new one with tm.transaction()"
            )

    def _open_branch(self, participant: Participant) -> BranchConnection:
        # Start the transaction now, so that conn.transaction() inside the
        # branch makes savepoints instead of committing by itself. A pooled
        # connection whose server restarted fails here: retry on a fresh one.
        for attempt in (1, 2):
            conn = participant.checkout()
            try:
                conn.execute("SELECT set_config('txmgr.txid', %s, true)", (self.txid,))
            except psycopg.OperationalError as e:
                participant.release(conn)
                if attempt == 2:
                    raise ParticipantUnavailable(
                        f"participant {participant.name!r} dropped the connection: {e}",
                        participant=participant.name,
                    ) from e
                continue
            conn._txmgr_branch = participant.name
            return conn
        raise AssertionError("unreachable")

    def _commit(self) -> None:
        branches = list(self._branches.values())
        for b in branches:
            b.conn._txmgr_branch = None  # txmgr drives the connections from now on
        writers = self._vote(branches)
        self._tm.hooks.after_vote(self.txid, [b.name for b in writers])
        log_name = self._tm.log_participant
        if len(writers) <= 1:
            for b in writers:
                self._commit_one_phase(b)
            self._state = TransactionState.COMMITTED
            return
        if log_name is not None:
            log_branch = self._branches.get(log_name)
            if log_branch is None:  # the log participant did no work: open its branch now
                p = self._tm.participant(log_name)
                log_branch = self._branches[log_name] = _Branch(p, self._open_branch(p))
                log_branch.conn._txmgr_branch = None
            to_prepare = [b for b in writers if b is not log_branch]
            self._two_phase(log_branch.conn, to_prepare, writers)
        else:
            lconn = self._tm.log_connection()
            try:
                self._two_phase(lconn, writers, writers)
            finally:
                self._tm.release_log_connection(lconn)

    def _vote(self, branches: list[_Branch]) -> list[_Branch]:
        """The branches that wrote; the others are ended. Any unusable branch aborts all."""
        for b in branches:
            status = b.conn.info.transaction_status
            if b.conn.closed or status != TransactionStatus.INTRANS:
                why = {
                    TransactionStatus.INERROR: "a statement failed and the branch is aborted",
                    TransactionStatus.IDLE: "its transaction was ended by hand",
                }.get(status, "its connection is broken")
                self._abort(f"participant {b.name!r} cannot commit: {why}", None)

        def vote(b: _Branch) -> bool:
            row = b.conn.execute(
                "SELECT pg_current_xact_id_if_assigned() IS NOT NULL, "
                "current_setting('txmgr.txid', true)"
            ).fetchone()
            assert row is not None
            if row[1] != self.txid:
                raise TransactionAborted(
                    f"participant {b.name!r}: its transaction was ended by hand inside the "
                    "branch (COMMIT/ROLLBACK must not be issued inside a txmgr transaction)",
                    txid=self.txid,
                )
            return bool(row[0])

        votes = self._tm.parallel(vote, branches)
        for b, v in zip(branches, votes, strict=True):
            if isinstance(v, BaseException):
                self._abort(f"participant {b.name!r} failed before prepare: {v}", v)
        writers = [b for b, v in zip(branches, votes, strict=True) if v is True]
        readers = [b for b in branches if b not in writers]
        self._rollback_branches(readers)
        return writers

    def _commit_one_phase(self, b: _Branch) -> None:
        try:
            b.conn.commit()
        except psycopg.OperationalError as e:
            self._state = TransactionState.UNKNOWN
            raise OutcomeUnknown(
                f"lost the connection to {b.name!r} while it committed (one-phase commit, "
                f"the only participant that wrote): the commit may or may not have happened; "
                f"check the data in {b.name!r}",
                txid=self.txid,
            ) from e
        except psycopg.Error as e:  # e.g. a deferred constraint failing at COMMIT
            self._abort(f"participant {b.name!r} could not commit: {e}", e)

    def _two_phase(
        self, lconn: psycopg.Connection[Any], to_prepare: list[_Branch], writers: list[_Branch]
    ) -> None:
        tm = self._tm
        logid = tm.logid()
        forget = tm.take_forget()
        try:
            lxid = decision_log.open_decision(
                lconn,
                self.txid,
                [b.name for b in writers],
                idle_timeout=tm.config.log_idle_timeout,
                forget=forget,
            )
        except psycopg.Error as e:
            tm.forget_later(forget)
            _quiet_rollback(lconn)
            if isinstance(e, psycopg.errors.UndefinedTable):
                self._rollback_branches(to_prepare)
                self._state = TransactionState.ROLLED_BACK
                raise LogSchemaError(
                    "the decision log has no txmgr tables: run `txmgr migrate --config FILE`"
                ) from None
            self._abort(f"could not open the decision in the log: {e}", e)
        for b in to_prepare:
            b.gid = str(Gid(logid, self.txid, lxid, b.name))

        def prepare(b: _Branch) -> None:
            assert b.gid is not None
            b.conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(b.gid)))
            b.prepared = True
            tm.hooks.after_prepare(self.txid, b.name, b.gid)

        results = tm.parallel(prepare, to_prepare)
        failed = [(b, r) for b, r in zip(to_prepare, results, strict=True) if r is not None]
        if failed:
            tm.forget_later(forget)
            _quiet_rollback(lconn)
            b, err = failed[0]
            self._abort(f"participant {b.name!r} could not prepare (voted no): {err}", err)
        tm.hooks.before_decision(self.txid, lxid)
        self._decide(lconn, lxid, forget, to_prepare)
        tm.hooks.after_decision(self.txid, lxid)

        def commit_prepared(b: _Branch) -> None:
            assert b.gid is not None
            tm.hooks.before_commit_prepared(self.txid, b.name, b.gid)
            _finish(b, commit=True)
            tm.hooks.after_commit_prepared(self.txid, b.name, b.gid)

        results = tm.parallel(commit_prepared, to_prepare)
        pending = [(b, r) for b, r in zip(to_prepare, results, strict=True) if r is not None]
        for b, err in pending:
            logger.warning(
                "txid=%s gid=%s participant=%s: COMMIT PREPARED failed, recovery will "
                "finish it: %s", self.txid, b.gid, b.name, err,
            )
        if pending:
            self._state = TransactionState.COMMITTED_PENDING
        else:
            tm.forget([self.txid])
            self._state = TransactionState.COMMITTED

    def _decide(
        self, lconn: psycopg.Connection[Any], lxid: int, forget: list[str], prepared: list[_Branch]
    ) -> None:
        """Commit the decision transaction; settle a lost reply by asking the log."""
        try:
            lconn.commit()
            return
        except psycopg.OperationalError as e:
            # The COMMIT may or may not have happened (connection lost, or the
            # server ended an idle session). The log knows.
            error: BaseException = e
            outcome = self._confirm(lxid)
        except psycopg.Error as e:  # the COMMIT was refused: L rolled back
            error, outcome = e, "aborted"
        if outcome == "committed":
            return
        self._tm.forget_later(forget)
        if outcome == "aborted":
            self._abort(f"the decision transaction in the log did not commit: {error}", error)
        self._state = TransactionState.UNKNOWN
        raise OutcomeUnknown(
            f"transaction {self.txid}: lost the log connection while committing the decision "
            f"and could not learn the outcome ({error}); it is committed on every participant "
            "or on none, and `txmgr recover` or the daemon will finish it",
            txid=self.txid,
        ) from error

    def _confirm(self, lxid: int) -> decision_log.XactStatus:
        """"committed", "aborted" or "in progress" (= could not learn) for our ``L``."""
        deadline = time.monotonic() + CONFIRM_PATIENCE
        while True:
            try:
                with self._tm.confirm_connection() as conn:
                    status = decision_log.xact_status(conn, [lxid]).get(lxid)
                    if status != "in progress":
                        # L is over; its row (read in a later statement) says how.
                        done = decision_log.committed_txids(conn, [self.txid])
                        return "committed" if self.txid in done else "aborted"
            except Exception as e:
                logger.warning("txid=%s: cannot reach the log to confirm: %s", self.txid, e)
            if time.monotonic() >= deadline:
                return "in progress"
            time.sleep(0.1)  # the old session is still being torn down by the server

    def _abort(self, message: str, cause: BaseException | None) -> Any:
        """Roll back every branch (prepared or not) and raise TransactionAborted."""
        self._rollback_branches(self._branches.values())
        self._state = TransactionState.ROLLED_BACK
        if isinstance(cause, TransactionAborted):
            raise cause
        raise TransactionAborted(
            f"transaction {self.txid} rolled back, nothing was committed: {message}",
            txid=self.txid,
        ) from cause

    def _rollback_branches(self, branches: Iterable[_Branch]) -> None:
        for b in branches:
            b.conn._txmgr_branch = None
            try:
                if b.prepared:
                    _finish(b, commit=False)
                elif not b.conn.closed:
                    b.conn.rollback()
            except Exception as e:  # the server rolls back on its own, recovery the rest
                logger.warning("txid=%s participant=%s: rollback failed: %s", self.txid, b.name, e)

    def _release_all(self) -> None:
        for b in self._branches.values():
            try:
                if not b.conn.closed and b.conn.autocommit:
                    b.conn.autocommit = False
            except psycopg.Error:
                pass
            b.participant.release(b.conn)
        self._branches.clear()


def _finish(b: _Branch, *, commit: bool) -> None:
    """COMMIT or ROLLBACK PREPARED ``b``'s gid on its own (now idle) connection."""
    assert b.gid is not None
    conn = b.conn
    if not conn.autocommit:
        conn.autocommit = True  # *PREPARED cannot run inside a transaction block
    result = finish_prepared(conn, b.gid, commit=commit)
    if result == "busy":  # recovery is finishing it right now; it follows the same log
        logger.info("gid=%s is being finished by another session", b.gid)
    b.prepared = False


def _quiet_rollback(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed:
            conn.rollback()
    except psycopg.Error:
        pass

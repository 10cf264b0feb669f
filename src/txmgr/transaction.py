"""One global transaction and the commit protocol that ends it.

Protocol (see the README's "How it works"); every step talks to all branches
at once (:mod:`txmgr._multiplex`):

1. vote: ask every branch whether it wrote — and, with a dedicated log, open
   the decision transaction ``L`` in the same round trip.
2. at most one writer: it commits in one phase (``L``, if open, rolls back).
3. otherwise ``L`` (dedicated log database, or the log participant's own
   branch) holds the decision row; ``lxid`` = its xid, written into each gid.
4. ``PREPARE TRANSACTION`` every other writer; any failure aborts everything.
5. ``COMMIT`` ``L`` — the commit point. A lost reply is settled by asking the
   log on a fresh connection (is ``L`` over? is its row there?).
6. ``COMMIT PREPARED`` every branch, and commit the read-only branches;
   failures are left to recovery.
7. the decision row is deleted by a later decision transaction.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NoReturn, Protocol

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from txmgr import failpoints
from txmgr import log as decision_log
from txmgr._branch import BranchConnection
from txmgr._gid import Gid, new_txid
from txmgr._multiplex import Job, run_all
from txmgr.config import Config
from txmgr.errors import (
    LogSchemaError,
    ManualTransactionControl,
    OutcomeUnknown,
    ParticipantUnavailable,
    TransactionAborted,
    TransactionStateError,
)
from txmgr.hooks import Hooks
from txmgr.participant import Participant

__all__ = ["Transaction", "TransactionState"]

logger = logging.getLogger("txmgr")

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
    def log_connection(self, *, wait: bool = True) -> psycopg.Connection[Any]: ...
    def release_log_connection(self, conn: psycopg.Connection[Any]) -> None: ...
    def confirm_connection(self) -> psycopg.Connection[Any]: ...
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
        self._state = TransactionState.ROLLED_BACK
        try:
            self._rollback_branches(self._branches.values())
        finally:
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
        # Pooled connections are in autocommit mode: open the branch's
        # transaction block now (conn.transaction() inside it then makes
        # savepoints), with the marker the vote checks, in one round trip. A
        # pooled connection whose server restarted fails here: retry once.
        begin = sql.SQL("BEGIN; SELECT set_config('txmgr.txid', {}, true)").format(
            sql.Literal(self.txid)
        )
        for attempt in (1, 2):
            conn = participant.checkout()
            try:
                job = Job(conn, begin.as_bytes(conn))
                run_all([job])
                if job.error is not None:
                    raise job.error
            except BaseException as e:
                participant.release(conn)
                if not isinstance(e, psycopg.OperationalError):
                    raise
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
        tm = self._tm
        branches = list(self._branches.values())
        for b in branches:
            b.conn._txmgr_branch = None  # txmgr drives the connections from now on
        self._check_usable(branches)
        try:
            failpoints.fire("before_vote")
        except Exception as e:
            self._abort(f"failpoint before_vote: {e}", e)
        # With a dedicated log and two or more branches, open the decision in
        # the same round trip as the votes: it is on the critical path otherwise.
        # If at most one branch wrote, it is rolled back unused.
        decision = (
            _Decision(tm, self.txid) if tm.log_participant is None and len(branches) > 1 else None
        )
        try:
            self._vote_and_commit(branches, decision)
        finally:
            if decision is not None:
                decision.release()

    def _vote_and_commit(self, branches: list[_Branch], decision: _Decision | None) -> None:
        tm = self._tm
        jobs = [Job(b.conn, _VOTE_QUERY) for b in branches]
        log_job = decision.job([b.name for b in branches]) if decision is not None else None
        run_all([*jobs, log_job] if log_job is not None else jobs)
        if decision is not None and log_job is not None:
            decision.opened(log_job)
        votes = [self._vote(b, job) for b, job in zip(branches, jobs, strict=True)]
        failed = [(b, v) for b, v in zip(branches, votes, strict=True) if isinstance(v, Exception)]
        if failed:
            if decision is not None:
                decision.cancel()
            b, err = failed[0]
            if isinstance(err, _ManualEnd):
                self._abort_manual(b)
            self._abort(f"participant {b.name!r} failed before prepare: {err}", err)
        writers = [b for b, v in zip(branches, votes, strict=True) if v is True]
        readers = [b for b in branches if b not in writers]
        try:
            tm.hooks.after_vote(self.txid, [b.name for b in writers])
        except Exception as e:
            if decision is not None:
                decision.cancel()
            self._abort(f"the after_vote hook failed: {e}", e)
        if len(writers) <= 1:
            self._commit_one_phase(writers[0] if writers else None, readers, decision)
            return
        if decision is None:
            log_name = tm.log_participant
            assert log_name is not None
            log_branch = self._branches.get(log_name)
            if log_branch is None:  # the log participant did no work: open its branch now
                p = tm.participant(log_name)
                log_branch = self._branches[log_name] = _Branch(p, self._open_branch(p))
                log_branch.conn._txmgr_branch = None
            to_prepare = [b for b in writers if b is not log_branch]
            readers = [b for b in readers if b is not log_branch]
            decision = _Decision(tm, self.txid, log_branch.conn)
            decision.open([b.name for b in writers])
        else:
            decision.open([b.name for b in branches])  # unless it already is
            to_prepare = writers
        self._two_phase(decision, to_prepare, readers)

    def _check_usable(self, branches: list[_Branch]) -> None:
        for b in branches:
            status = b.conn.info.transaction_status
            if not b.conn.closed and status == TransactionStatus.IDLE:
                self._abort_manual(b)
            if b.conn.closed or status != TransactionStatus.INTRANS:
                why = (
                    "a statement failed and the branch is aborted"
                    if status == TransactionStatus.INERROR
                    else "its connection is broken"
                )
                self._abort(f"participant {b.name!r} cannot commit: {why}", None)

    def _abort_manual(self, b: _Branch) -> NoReturn:
        """A branch's transaction was ended behind txmgr's back: say so honestly."""
        self._rollback_branches(self._branches.values())
        self._state = TransactionState.ROLLED_BACK
        raise ManualTransactionControl(
            f"transaction {self.txid}: the branch of participant {b.name!r} was ended by hand "
            "(COMMIT or ROLLBACK through a cursor txmgr does not guard, such as one "
            "constructed directly with psycopg.ClientCursor(conn)); what it had done may "
            f"be committed in {b.name!r}, every other branch was rolled back. Use "
            "conn.execute() or conn.cursor(), and never end a branch by hand"
        )

    def _vote(self, b: _Branch, job: Job) -> bool | Exception:
        """True when the branch wrote (it has an xid); checks it is still our transaction."""
        if job.error is not None:
            return job.error if isinstance(job.error, Exception) else RuntimeError(job.error)
        assert job.rows is not None
        wrote, marker = job.rows[0]
        if marker != self.txid:  # ended by hand, and a new transaction begun since
            return _ManualEnd(b.name)
        return wrote == "t"

    def _commit_one_phase(
        self, writer: _Branch | None, readers: list[_Branch], decision: _Decision | None
    ) -> None:
        """Commit the only writer, then end the read-only branches (committed, so that
        what they did — a NOTIFY — happens only if the writer committed)."""
        try:
            failpoints.fire("before_one_phase")
        except Exception as fp_error:
            if decision is not None:
                decision.cancel()
            self._abort(f"failpoint before_one_phase: {fp_error}", fp_error)
        jobs = []
        if decision is not None and decision.conn is not None:
            jobs.append(Job(decision.conn, b"ROLLBACK"))  # L was not needed
            decision.forget_later()
        commit = Job(writer.conn, b"COMMIT") if writer is not None else None
        run_all([*jobs, commit] if commit is not None else jobs)
        if commit is not None and commit.error is None and commit.tag != b"COMMIT":
            commit.error = TransactionAborted(
                f"participant {writer.name if writer else '?'!r}: its transaction had already "
                f"failed, so COMMIT rolled it back (server answered {commit.tag!r})",
                txid=self.txid,
            )
        if commit is not None and commit.error is not None:
            assert writer is not None
            e = commit.error
            if isinstance(e, psycopg.OperationalError):
                self._rollback_branches(readers)
                self._state = TransactionState.UNKNOWN
                raise OutcomeUnknown(
                    f"lost the connection to {writer.name!r} while it committed (one-phase "
                    f"commit, the only participant that wrote): the commit may or may not "
                    f"have happened; check the data in {writer.name!r}",
                    txid=self.txid,
                ) from e
            # e.g. a deferred constraint failing at COMMIT: the server rolled it back
            self._abort(f"participant {writer.name!r} could not commit: {e}", e)
        run_all([Job(b.conn, b"COMMIT") for b in readers])
        self._state = TransactionState.COMMITTED

    def _two_phase(
        self, decision: _Decision, to_prepare: list[_Branch], readers: list[_Branch]
    ) -> None:
        """Prepare the writers, decide, commit them; the read-only branches end with
        them (committed, so that their locks are held until the decision)."""
        tm = self._tm
        if decision.error is not None:
            decision.cancel()
            e = decision.error
            if isinstance(e, psycopg.errors.UndefinedTable):
                self._rollback_branches(self._branches.values())
                self._state = TransactionState.ROLLED_BACK
                raise LogSchemaError(
                    "the decision log has no txmgr tables: run `txmgr migrate --config FILE`"
                ) from None
            self._abort(f"could not open the decision in the log: {e}", e)
        lxid = decision.lxid
        logid = tm.logid()
        for b in to_prepare:
            b.gid = str(Gid(logid, self.txid, lxid, b.name))
        try:
            failpoints.fire("before_prepare")
        except Exception as e:
            decision.cancel()
            self._abort(f"failpoint before_prepare: {e}", e)
        jobs = [Job(b.conn, _command("PREPARE TRANSACTION {}", b)) for b in to_prepare]
        run_all(jobs)
        for b, job in zip(to_prepare, jobs, strict=True):
            if job.error is None and job.tag != b"PREPARE TRANSACTION":
                # The branch's transaction had failed: PREPARE rolled it back.
                job.error = TransactionAborted(
                    f"participant {b.name!r}: its transaction had already failed, so "
                    f"PREPARE TRANSACTION rolled it back (server answered {job.tag!r})",
                    txid=self.txid,
                )
            # A lost connection may have prepared the branch or not: if it did,
            # the decision (aborted below) makes recovery roll it back.
            b.prepared = job.error is None
        failed = [(b, j.error) for b, j in zip(to_prepare, jobs, strict=True) if j.error]
        if not failed:
            for b in to_prepare:
                assert b.gid is not None
                try:
                    failpoints.fire("after_prepare")
                    tm.hooks.after_prepare(self.txid, b.name, b.gid)
                except Exception as e:
                    failed.append((b, e))
        if failed:
            decision.cancel()
            b, err = failed[0]
            self._abort(f"participant {b.name!r} could not prepare (voted no): {err}", err)
        try:
            failpoints.fire("before_decision")
            tm.hooks.before_decision(self.txid, lxid)
        except Exception as e:
            decision.cancel()
            self._abort(f"the before_decision hook failed: {e}", e)
        self._decide(decision, to_prepare)
        _quiet_hook(_after_decision, tm.hooks, self.txid, lxid)

        def before(b: _Branch) -> None:
            assert b.gid is not None
            failpoints.fire("before_commit_prepared")
            tm.hooks.before_commit_prepared(self.txid, b.name, b.gid)

        jobs = [
            Job(b.conn, _command("COMMIT PREPARED {}", b), before=partial(before, b))
            for b in to_prepare
        ]
        run_all([*jobs, *(Job(b.conn, b"COMMIT") for b in readers)])
        pending = []
        for b, job in zip(to_prepare, jobs, strict=True):
            assert b.gid is not None
            # "does not exist": recovery committed it. "busy" (55000) is NOT done:
            # another session holds it right now, so the decision row must stay.
            if job.error is None or isinstance(job.error, psycopg.errors.UndefinedObject):
                b.prepared = False
                _quiet_hook(_after_commit_prepared, tm.hooks, self.txid, b.name, b.gid)
            else:
                pending.append(b)
                logger.warning(
                    "txid=%s gid=%s participant=%s: COMMIT PREPARED did not finish, recovery "
                    "will: %s", self.txid, b.gid, b.name, job.error,
                )
        if pending:
            self._state = TransactionState.COMMITTED_PENDING
        else:
            _quiet_hook(failpoints.fire, "before_cleanup")
            tm.forget([self.txid])
            self._state = TransactionState.COMMITTED

    def _decide(self, decision: _Decision, prepared: list[_Branch]) -> None:
        """Commit the decision transaction; settle a lost reply by asking the log."""
        conn = decision.conn
        assert conn is not None
        job = Job(conn, b"COMMIT")
        run_all([job])
        if job.error is None and job.tag == b"COMMIT":
            return
        error: BaseException = job.error or TransactionAborted(
            f"the decision transaction had failed: COMMIT answered {job.tag!r}", txid=self.txid
        )
        if isinstance(error, psycopg.OperationalError) or conn.closed or conn.broken:
            # The COMMIT may or may not have happened (connection lost, the
            # server ended an idle session or failed). The log knows.
            outcome = self._confirm(decision.lxid, prepared)
        else:  # the server refused the COMMIT (e.g. a deferred constraint): L rolled back
            outcome = "aborted"
        if outcome == "committed":
            return
        decision.forget_later()
        if outcome == "aborted":
            self._abort(f"the decision transaction in the log did not commit: {error}", error)
        self._state = TransactionState.UNKNOWN
        if outcome == "finished":
            raise OutcomeUnknown(
                f"transaction {self.txid}: lost the log connection while committing the "
                f"decision ({error}), and by the time the log answered, recovery had already "
                "finished every branch: they are all committed or all rolled back, but the "
                "log no longer tells which",
                txid=self.txid,
            ) from error
        raise OutcomeUnknown(
            f"transaction {self.txid}: lost the log connection while committing the decision "
            f"and could not learn the outcome ({error}); it is committed on every participant "
            "or on none, and `txmgr recover` or the daemon will finish it",
            txid=self.txid,
        ) from error

    def _confirm(self, lxid: int, prepared: list[_Branch]) -> str:
        """What became of our ``L``: "committed", "aborted", "finished" (by recovery,
        outcome no longer known) or "unknown" (the log could not be asked)."""
        deadline = time.monotonic() + CONFIRM_PATIENCE
        while True:
            try:
                with self._tm.confirm_connection() as conn:
                    statuses, committed = decision_log.read_decisions(conn, [(lxid, self.txid)])
                    status = statuses.get(lxid)
                    if status != "in progress":  # L is over, and its row says how
                        if self.txid in committed:
                            return "committed"
                        if status in ("aborted", "future"):
                            return "aborted"
                        # "committed" (or too old) and no row: either recovery
                        # committed every branch and deleted the row, or the log
                        # crashed and lxid now names another transaction. A
                        # committed decision's row outlives its prepared branches.
                        still = _any_prepared(prepared)
                        if still is not None:
                            return "aborted" if still else "finished"
            except Exception as e:
                logger.warning("txid=%s: cannot reach the log to confirm: %s", self.txid, e)
            if time.monotonic() >= deadline:
                return "unknown"
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
        """Roll back (or ROLLBACK PREPARED) every branch in one round trip."""
        jobs = []
        for b in branches:
            b.conn._txmgr_branch = None
            if b.prepared:
                jobs.append(Job(b.conn, _command("ROLLBACK PREPARED {}", b)))
            elif not b.conn.closed and b.conn.info.transaction_status != TransactionStatus.IDLE:
                jobs.append(Job(b.conn, b"ROLLBACK"))
        run_all(jobs)
        for b in branches:
            b.prepared = False
        for job in jobs:
            if job.error is not None and not _finished_elsewhere(job.error):
                # The server rolls back a lost session on its own, recovery the rest.
                logger.warning("txid=%s: rollback failed: %s", self.txid, job.error)

    def _release_all(self) -> None:
        branches = list(self._branches.values())
        self._branches.clear()
        for b in branches:
            try:
                b.participant.release(b.conn)
            except Exception as e:  # one bad connection must not strand the others
                logger.warning("participant=%s: could not return a connection: %s", b.name, e)


_VOTE_QUERY = (
    b"SELECT pg_current_xact_id_if_assigned() IS NOT NULL, current_setting('txmgr.txid', true)"
)


def _command(template: str, b: _Branch) -> bytes:
    """``template`` with the branch's gid as a quoted literal."""
    assert b.gid is not None
    return sql.SQL(template).format(sql.Literal(b.gid)).as_bytes(b.conn)


class _ManualEnd(Exception):
    """A vote found the branch's transaction ended by hand."""


def _quiet_hook(hook: Callable[..., None], *args: object) -> None:
    """Run a hook after the decision: its failure must not change the outcome."""
    try:
        hook(*args)
    except Exception as e:
        logger.warning("hook %s failed after the decision: %s", hook.__name__, e)


def _after_decision(hooks: Hooks, txid: str, lxid: int) -> None:
    failpoints.fire("after_decision")
    hooks.after_decision(txid, lxid)


def _after_commit_prepared(hooks: Hooks, txid: str, participant: str, gid: str) -> None:
    failpoints.fire("after_commit_prepared")
    hooks.after_commit_prepared(txid, participant, gid)


def _any_prepared(branches: list[_Branch]) -> bool | None:
    """Is any of these branches still prepared? None when a participant cannot tell."""
    jobs = [
        Job(b.conn, _command("SELECT count(*) FROM pg_prepared_xacts WHERE gid = {}", b))
        for b in branches
    ]
    run_all(jobs)
    if any(j.error is not None or not j.rows for j in jobs):
        return None
    return any(j.rows and j.rows[0][0] != "0" for j in jobs)


def _finished_elsewhere(error: BaseException) -> bool:
    """*PREPARED failed because somebody else (recovery) finished or is finishing it."""
    return isinstance(
        error, psycopg.errors.UndefinedObject | psycopg.errors.ObjectNotInPrerequisiteState
    )


def _quiet_rollback(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed:
            conn.rollback()
    except psycopg.Error:
        pass


class _Decision:
    """The decision transaction ``L``: on a dedicated log connection, or on the
    log participant's own branch connection (``conn`` given)."""

    __slots__ = ("_owned", "_tm", "_txid", "conn", "error", "forget", "lxid")

    def __init__(
        self, tm: _Coordinator, txid: str, conn: psycopg.Connection[Any] | None = None
    ) -> None:
        self._tm = tm
        self._txid = txid
        self._owned = conn is None  # a dedicated log connection, ours to release
        self.conn = conn
        self.lxid = 0  # set once L is open
        self.forget: list[str] = []
        self.error: BaseException | None = None

    def job(self, participants: list[str]) -> Job | None:
        """The query opening ``L``, to send along with the votes; None when no log
        connection is free right now (then :meth:`open` runs after the votes)."""
        try:
            self.conn = self._tm.log_connection(wait=False)
        except ParticipantUnavailable:
            return None
        return self._job(participants)

    def _job(self, participants: list[str]) -> Job:
        assert self.conn is not None
        self.forget = self._tm.take_forget()
        query = decision_log.decision_query(
            self._txid,
            participants,
            idle_timeout=self._tm.config.log_idle_timeout,
            forget=self.forget,
            # A dedicated log connection is idle and carries the settings for
            # its whole session; the log participant's branch is mid-transaction.
            begin=self.conn.info.transaction_status == TransactionStatus.IDLE,
            session_settings=self._owned,
        )
        return Job(self.conn, query.as_bytes(self.conn))

    def opened(self, job: Job) -> None:
        if job.error is None:
            assert job.rows is not None
            self.lxid = int(str(job.rows[-1][0]))
        elif self._owned and isinstance(job.error, psycopg.OperationalError):
            # Most likely a pooled connection that went stale (the log server
            # restarted): nothing was decided, open() retries on a fresh one.
            self._discard_connection()
        else:
            self.error = job.error

    def open(self, participants: list[str]) -> None:
        """Open ``L`` now, unless it already is; a failure is kept in ``error``."""
        if self.lxid or self.error is not None:
            return
        for attempt in (1, 2):  # a stale pooled connection is replaced once
            try:
                if self.conn is None:
                    self.conn = self._tm.log_connection()
            except Exception as e:
                self.error = e
                return
            job = self._job(participants)
            run_all([job])
            self.opened(job)
            if self.lxid or self.error is not None:
                return
            if attempt == 2:  # stale again: give up
                self.error = job.error

    def _discard_connection(self) -> None:
        self.forget_later()
        if self.conn is not None:
            self._tm.release_log_connection(self.conn)  # the pool drops a broken one
            self.conn = None

    def forget_later(self) -> None:
        """``L`` will not commit: its cleanup of finished rows waits for the next one."""
        self._tm.forget_later(self.forget)
        self.forget = []

    def cancel(self) -> None:
        """Roll ``L`` back: nothing is decided."""
        self.forget_later()
        if self.conn is not None:
            _quiet_rollback(self.conn)

    def release(self) -> None:
        if self._owned and self.conn is not None:
            self._tm.release_log_connection(self.conn)
            self.conn = None

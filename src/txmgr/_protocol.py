"""The commit protocol of one global transaction, free of I/O.

Every step is a generator (:data:`txmgr._ops.Step`) that yields requests —
run these queries on these connections, check out a connection, sleep — and
receives their results; :class:`txmgr.Transaction` performs them with
blocking calls, :class:`txmgr.AsyncTransaction` awaits them. One protocol,
two front ends. Hooks and failpoints are called directly: they are
synchronous and must be quick (see :mod:`txmgr.hooks`).

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

In Paxos mode (``config.paxos_log``) steps 3 to 5 differ: with two or more
writers the transaction is registered on the log databases (its voters go
into every gid), the writers are prepared, and the commit point is a
majority accepting ``log.propose_commit``; see :meth:`TransactionCore._paxos_two_phase`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import NoReturn, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from txmgr import _tag, failpoints
from txmgr._branch import AnyBranchConnection
from txmgr._coordinator_metrics import count_heuristic_mixed, count_transaction_timeout
from txmgr._decision import Decision
from txmgr._gid import Gid, new_txid
from txmgr._hints import FAILED_BRANCH_HINT, with_hint
from txmgr._multiplex import Job, literal
from txmgr._ops import (
    Forget,
    Release,
    Run,
    Step,
    checkout,
    paxos_propose,
    paxos_register,
    take_verdict,
)
from txmgr.config import Config
from txmgr.errors import (
    DeadlockDetected,
    HeuristicMixed,
    LogSchemaError,
    ManualTransactionControl,
    OutcomeUnknown,
    ParticipantUnavailable,
    RoleChangeInBranch,
    TransactionAborted,
    TransactionStateError,
    TransactionTimeout,
)
from txmgr.hooks import Hooks
from txmgr.log import decision_settings
from txmgr.paxos._core import Outcome, Voters
from txmgr.paxos._log import paxos_gid

__all__ = [
    "CANCEL_GRACE", "Branch", "Coordinator", "TransactionCore", "TransactionState", "step_limit",
]

logger = logging.getLogger("txmgr")


class Coordinator(Protocol):
    """What a transaction needs from its manager (kept narrow: no import cycle)."""

    @property
    def config(self) -> Config: ...
    @property
    def hooks(self) -> Hooks: ...
    @property
    def log_participant(self) -> str | None: ...
    def known_logid(self) -> str: ...
    def take_forget(self) -> list[str]: ...
    def forget_later(self, txids: list[str]) -> None: ...


class TransactionState(enum.Enum):
    """Where a global transaction stands (``tx.state``)."""

    ACTIVE = "active"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    #: committed by the decision, but some COMMIT PREPARED is left to recovery
    COMMITTED_PENDING = "committed (recovery finishes some branches)"
    #: committed by the decision, but another session rolled some branch back
    HEURISTIC_MIXED = "heuristic mixed (some branches rolled back by another session)"
    UNKNOWN = "outcome unknown"


class Branch:
    """One participant's branch: its connection and, once known, its gid."""

    __slots__ = ("conn", "gid", "name", "prepared", "role", "role_at_vote", "xid")

    def __init__(self, name: str, conn: AnyBranchConnection, role: str | None = None) -> None:
        self.name = name
        self.conn = conn
        self.gid: str | None = None
        self.prepared = False
        # current_user when the branch began and when it voted: only the role
        # that prepared a branch (or a superuser) can finish it, so a role
        # changed where the statement guard cannot see it (a function, a DO
        # block, set_config with a bound name) must stop the PREPARE.
        self.role = role
        self.role_at_vote = role
        self.xid: int | None = None  # the branch's own xid, as the vote found it


class TransactionCore:
    """The state of one global transaction and the protocol steps that end it.

    A front end calls :meth:`open_branch`, :meth:`commit` and :meth:`rollback`
    and drives the generators they return to the end.
    """

    __slots__ = ("_maybe_prepared", "_registered", "branches", "deadline", "run_deadline",
                 "state", "timeout", "tm", "txid")

    def __init__(self, tm: Coordinator, timeout: float | None = None) -> None:
        self.tm = tm
        self.txid = new_txid()
        self.branches: dict[str, Branch] = {}  # participant name -> its branch
        self.state = TransactionState.ACTIVE
        self._registered = False  # Paxos mode: the txid is registered on the log
        # A PREPARE or ROLLBACK PREPARED went unanswered or failed: a branch
        # may be left prepared for recovery.
        self._maybe_prepared = False
        if timeout is None:
            timeout = tm.config.transaction_timeout
        elif not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        # The deadline (time.monotonic()) covers everything up to the decision.
        # ``run_deadline`` is what the front ends bound each request by: the
        # same until the commit point, None after it (step_timeout and recovery
        # rule from there on).
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.run_deadline = self.deadline

    def expired(self) -> bool:
        """Whether the deadline has passed (never, without one)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timeout_error(self, what: str) -> TransactionTimeout:
        """The error the coordinator raises for this expired deadline (counted)."""
        assert self.timeout is not None
        _quiet_hook(count_transaction_timeout)
        return TransactionTimeout(
            f"transaction {self.txid} rolled back, nothing was committed: its deadline of "
            f"{self.timeout:g}s passed {what}; give it more time with "
            "tm.transaction(timeout=…) or [transaction] timeout, or find what it waited for "
            "(`txmgr status` shows waits)",
            txid=self.txid, timeout=self.timeout,
        )

    def _begin_query(self, conn: AnyBranchConnection) -> bytes:
        """BEGIN, the marker the vote checks, the tag, and the deadline's server-side
        limits, in one statement (one round trip)."""
        return (_BEGIN + literal(self.txid, conn) + b", true), current_user, "
                + _tag.begin_fragment(self.txid, conn)
                + self._limits(conn, b"idle_in_transaction_session_timeout"))

    def _limits(self, conn: AnyBranchConnection, *settings: bytes) -> bytes:
        """Select-list items that limit the branch's statements (and ``settings``) to
        what is left of the deadline, from now: the server ends a statement that
        outlives it by itself (57014), and the front end cancels at the deadline
        (a server that does not answer enforces nothing)."""
        if self.deadline is None:
            return b""
        left = literal(str(max(1, math.ceil((self.deadline - time.monotonic()) * 1000))), conn)
        return b"".join(b", set_config('" + name + b"', " + left + b", true)"
                        for name in (b"statement_timeout", *settings))

    def explain(self, error: BaseException) -> Step[BaseException | None]:
        """After a rollback caused by ``error`` (raised in the application's block):
        the txmgr error it stands for, if any — the deadline passed, or the
        deadlock detector cancelled this transaction's statement."""
        if self.expired():
            return self.timeout_error("while it was running")
        # SQLAlchemy wraps the driver's error (``.orig``).
        if not isinstance(error, psycopg.errors.QueryCanceled) and not isinstance(
            getattr(error, "orig", None), psycopg.errors.QueryCanceled
        ):
            return None
        try:
            verdict = yield from take_verdict(self.txid)
        except Exception as e:  # the log cannot tell: the cancel stays what it was
            logger.warning("txid=%s: could not ask the log why a statement was cancelled: %s",
                           self.txid, e)
            return None
        if verdict is None:
            return None  # cancelled by someone else (pg_cancel_backend by hand)
        return DeadlockDetected(
            f"transaction {self.txid} rolled back, nothing was committed: it was the "
            f"victim of a deadlock across servers: {verdict.detail}; run it again",
            txid=self.txid, others=verdict.others, relations=verdict.relations,
        )

    def require(self, state: TransactionState, call: str) -> None:
        if self.state is not state:
            raise TransactionStateError(
                f"'{call}' needs an {state.value} transaction; transaction {self.txid} is "
                f"{self.state.value}: start a new one with tm.transaction()"
            )

    # -- the three entry points ---------------------------------------------------

    def open_branch(self, name: str) -> Step[Branch]:
        """Check out a connection of ``name`` and begin its branch on it."""
        # Pooled connections are in autocommit mode: open the branch's
        # transaction block now (conn.transaction() inside it then makes
        # savepoints), with the marker the vote checks, in one round trip. A
        # pooled connection whose server restarted fails here: retry once.
        for attempt in (1, 2):
            conn = yield from checkout(name)
            try:
                job = Job(conn, self._begin_query(conn))
                yield Run([job])
                if job.error is not None:
                    raise job.error
            except BaseException as e:
                yield Release(name, conn)
                if not isinstance(e, psycopg.OperationalError):
                    raise
                if attempt == 2 or self.expired():
                    raise ParticipantUnavailable(
                        f"participant {name!r} dropped the connection: {e}", participant=name
                    ) from e
                continue
            existing = self.branches.get(name)
            if existing is not None:  # opened meanwhile by another task: keep one
                yield Release(name, conn)
                return existing
            conn._txmgr_branch = name
            conn._txmgr_deadline = (
                None if self.deadline is None else (self.deadline, self.txid, self.timeout or 0.0)
            )
            role = job.rows[-1][1] if job.rows else None
            branch = self.branches[name] = Branch(name, conn, role)
            return branch
        raise AssertionError("unreachable")

    def commit(self, *, patience: float) -> Step[None]:
        """Commit every branch atomically. ``patience``: seconds to keep asking
        the log about a decision whose COMMIT reply was lost."""
        self.require(TransactionState.ACTIVE, "commit()")
        self.state = TransactionState.COMMITTING
        try:
            yield from self._commit(patience)
        finally:
            if self.state is TransactionState.COMMITTING:  # an unexpected error
                self.state = TransactionState.UNKNOWN
            if self._registered:
                self._release_paxos()
            yield from self._release_all()

    def _release_paxos(self) -> None:
        """Tell the Paxos log this coordinator no longer drives the txid (in memory,
        no I/O): while it does, its liveness lock keeps recovery from deciding it.
        Settled: commit was chosen (recovery only applies it), or it ended rolled
        back with nothing left prepared; anything else is left to recovery."""
        log = self.tm.config.paxos_log
        assert log is not None
        settled = self.state in (TransactionState.COMMITTED,
                                 TransactionState.COMMITTED_PENDING) or (
            self.state is TransactionState.ROLLED_BACK and not self._maybe_prepared)
        log.release(self.txid, settled=settled)

    def rollback(self) -> Step[None]:
        """Roll back every branch (a no-op once the transaction has ended)."""
        if self.state is not TransactionState.ACTIVE:
            return
        self.state = TransactionState.ROLLED_BACK
        try:
            yield from self._rollback_branches(self.branches.values())
        finally:
            yield from self._release_all()

    # -- steps ------------------------------------------------------------------

    def _commit(self, patience: float) -> Step[None]:
        tm = self.tm
        branches = list(self.branches.values())
        for b in branches:
            b.conn._txmgr_branch = None  # txmgr drives the connections from now on
        if self.expired():
            yield from self._abort("before the commit began", None)
        yield from self._check_usable(branches)
        try:
            failpoints.fire("before_vote")
        except Exception as e:
            yield from self._abort(f"failpoint before_vote: {e}", e)
        # With a dedicated log and two or more branches, open the decision in
        # the same round trip as the votes: it is on the critical path otherwise.
        # If at most one branch wrote, it is rolled back unused.
        decision = (
            Decision(tm, self.txid)
            if tm.log_participant is None and tm.config.paxos_log is None and len(branches) > 1
            else None
        )
        try:
            yield from self._vote_and_commit(branches, decision, patience)
        finally:
            if decision is not None:
                yield from decision.release()

    def _vote_and_commit(
        self, branches: list[Branch], decision: Decision | None, patience: float
    ) -> Step[None]:
        tm = self.tm
        # The log participant's branch may become L: its vote sets what L needs.
        log_settings = (
            decision_settings(tm.config.log_idle_timeout)
            if tm.log_participant is not None and tm.config.paxos_log is None else b""
        )
        jobs = [Job(b.conn, (log_settings if b.name == tm.log_participant else b"")
                    + _VOTE_QUERY + b", " + _tag.vote_fragment(self.txid, b.conn)
                    # the PREPARE after it may take what is left, no more
                    + self._limits(b.conn))
                for b in branches]
        log_job = None
        if decision is not None:
            log_job = yield from decision.job([b.name for b in branches])
        yield Run([*jobs, log_job] if log_job is not None else jobs)
        if decision is not None and log_job is not None:
            yield from decision.opened(log_job)
        votes = [self._vote(b, job) for b, job in zip(branches, jobs, strict=True)]
        failed = [(b, v) for b, v in zip(branches, votes, strict=True) if isinstance(v, Exception)]
        if failed:
            if decision is not None:
                yield from decision.cancel()
            b, err = failed[0]
            if isinstance(err, _ManualEnd):
                yield from self._abort_manual(b)
            yield from self._abort(f"participant {b.name!r} failed before prepare: {err}", err)
        writers = [b for b, v in zip(branches, votes, strict=True) if v is True]
        readers = [b for b in branches if b not in writers]
        voters = None
        if tm.config.paxos_log is not None and len(writers) > 1:
            # Before the hook, so that it sees the final txid.
            voters = yield from self._paxos_register(writers)
        try:
            tm.hooks.after_vote(self.txid, [b.name for b in writers])
        except Exception as e:
            if decision is not None:
                yield from decision.cancel()
            if voters is not None:
                yield from self._abort_unproposed(f"the after_vote hook failed: {e}", e)
            yield from self._abort(f"the after_vote hook failed: {e}", e)
        if len(writers) <= 1:
            yield from self._commit_one_phase(writers[0] if writers else None, readers, decision)
            return
        if voters is not None:
            yield from self._paxos_two_phase(writers, readers, voters)
            return
        if decision is None:
            log_name = tm.log_participant
            assert log_name is not None
            log_branch = self.branches.get(log_name)
            if log_branch is None:  # the log participant did no work: open its branch now
                try:
                    log_branch = yield from self.open_branch(log_name)
                except (ParticipantUnavailable, psycopg.Error) as e:
                    # Nothing is prepared yet: without the log, nothing can be decided.
                    yield from self._abort(
                        f"cannot reach the log participant {log_name!r} to decide: {e}", e
                    )
                assert log_branch is not None
                log_branch.conn._txmgr_branch = None
            to_prepare = [b for b in writers if b is not log_branch]
            readers = [b for b in readers if b is not log_branch]
            decision = Decision(tm, self.txid, log_branch.conn)
            if log_branch.xid is not None:  # it wrote: its xid names L already
                decision.open_at_commit(log_branch.xid, [b.name for b in writers])
            else:
                yield from decision.open([b.name for b in writers])
        else:
            yield from decision.open([b.name for b in branches])  # unless it already is
            to_prepare = writers
        yield from self._two_phase(decision, to_prepare, readers, patience)

    def _check_usable(self, branches: list[Branch]) -> Step[None]:
        for b in branches:
            status = b.conn.info.transaction_status
            if not b.conn.closed and status == TransactionStatus.IDLE:
                yield from self._abort_manual(b)
            if b.conn.closed or status != TransactionStatus.INTRANS:
                why = (
                    f"a statement failed and the branch is aborted; {FAILED_BRANCH_HINT}"
                    if status == TransactionStatus.INERROR
                    else "its connection is broken"
                )
                yield from self._abort(f"participant {b.name!r} cannot commit: {why}", None)

    def _abort_manual(self, b: Branch) -> Step[NoReturn]:
        """A branch's transaction was ended behind txmgr's back: say so honestly."""
        yield from self._rollback_branches(self.branches.values())
        self.state = TransactionState.ROLLED_BACK
        raise ManualTransactionControl(
            f"transaction {self.txid}: the branch of participant {b.name!r} was ended by hand "
            "(COMMIT or ROLLBACK through a cursor txmgr does not guard, such as one "
            "constructed directly with psycopg.ClientCursor(conn)); what it had done may "
            f"be committed in {b.name!r}, every other branch was rolled back. Use "
            "conn.execute() or conn.cursor(), and never end a branch by hand"
        )

    def _vote(self, b: Branch, job: Job) -> bool | Exception:
        """True when the branch wrote (it has an xid); checks it is still our transaction."""
        if job.error is not None:
            return job.error if isinstance(job.error, Exception) else RuntimeError(job.error)
        assert job.rows is not None
        xid, marker, b.role_at_vote = job.rows[-1][:3]
        if marker != self.txid:  # ended by hand, and a new transaction begun since
            return _ManualEnd()
        b.xid = int(xid) if xid is not None else None
        return xid is not None

    def _commit_one_phase(
        self, writer: Branch | None, readers: list[Branch], decision: Decision | None
    ) -> Step[None]:
        """Commit the only writer, then end the read-only branches (committed, so that
        what they did — a NOTIFY — happens only if the writer committed)."""
        try:
            failpoints.fire("before_one_phase")
        except Exception as fp_error:
            if decision is not None:
                yield from decision.cancel()
            yield from self._abort(f"failpoint before_one_phase: {fp_error}", fp_error)
        if self.expired():
            if decision is not None:
                yield from decision.cancel()
            yield from self._abort("before the decision", None)
        self.run_deadline = None  # the COMMIT below is the decision
        jobs = []
        if decision is not None and decision.conn is not None:
            jobs.append(Job(decision.conn, b"ROLLBACK"))  # L was not needed
            decision.forget_later()
        commit = Job(writer.conn, b"COMMIT") if writer is not None else None
        if jobs or commit is not None:
            yield Run([*jobs, commit] if commit is not None else jobs)
        if commit is not None and commit.error is None and commit.tag != b"COMMIT":
            commit.error = TransactionAborted(
                f"participant {writer.name if writer else '?'!r}: its transaction had already "
                f"failed, so COMMIT rolled it back (server answered {commit.tag!r}); "
                + FAILED_BRANCH_HINT,
                txid=self.txid,
            )
        if commit is not None and commit.error is not None:
            assert writer is not None
            e = commit.error
            if isinstance(e, psycopg.OperationalError):
                yield from self._rollback_branches(readers)
                self.state = TransactionState.UNKNOWN
                raise OutcomeUnknown(
                    f"lost the connection to {writer.name!r} while it committed (one-phase "
                    f"commit, the only participant that wrote): the commit may or may not "
                    f"have happened; check the data in {writer.name!r}",
                    txid=self.txid,
                ) from e
            # e.g. a deferred constraint failing at COMMIT: the server rolled it back
            yield from self._abort(
                with_hint(f"participant {writer.name!r} could not commit: {e}", e), e
            )
        if readers:
            yield Run([Job(b.conn, b"COMMIT") for b in readers])
        self.state = TransactionState.COMMITTED

    def _two_phase(
        self, decision: Decision, to_prepare: list[Branch], readers: list[Branch],
        patience: float,
    ) -> Step[None]:
        """Prepare the writers, decide, commit them; the read-only branches end with
        them (committed, so that their locks are held until the decision)."""
        tm = self.tm
        if decision.error is not None:
            yield from decision.cancel()
            e = decision.error
            if isinstance(e, psycopg.errors.UndefinedTable):
                yield from self._abort_no_log_tables()
            yield from self._abort(f"could not open the decision in the log: {e}", e)
        lxid = decision.lxid
        logid = tm.known_logid()
        for b in to_prepare:
            b.gid = str(Gid(logid, self.txid, lxid, b.name))
        changed = [b for b in to_prepare if b.role_at_vote != b.role]
        if changed:
            yield from decision.cancel()
            yield from self._abort_role_change(changed[0])
        try:
            failpoints.fire("before_prepare")
        except Exception as e:
            yield from decision.cancel()
            yield from self._abort(f"failpoint before_prepare: {e}", e)
        failed = yield from self._prepare(to_prepare)
        if failed:
            yield from decision.cancel()
            b, err = failed[0]
            yield from self._abort(
                with_hint(f"participant {b.name!r} could not prepare (voted no): {err}", err), err
            )
        try:
            failpoints.fire("before_decision")
            tm.hooks.before_decision(self.txid, lxid)
        except Exception as e:
            yield from decision.cancel()
            yield from self._abort(f"the before_decision hook failed: {e}", e)
        if self.expired():
            yield from decision.cancel()
            yield from self._abort("before the decision", None)
        self.run_deadline = None  # committing L is the decision
        yield from self._decide(decision, to_prepare, patience)
        _quiet_hook(_after_decision, tm.hooks, self.txid, lxid)
        yield from self._commit_prepared(to_prepare, readers)

    def _abort_role_change(self, b: Branch) -> Step[None]:
        """Abort: ``b``'s role changed where the statement guard could not see it."""
        yield from self._abort(
            f"participant {b.name!r} cannot be prepared: its role changed from "
            f"{b.role!r} to {b.role_at_vote!r} inside the branch",
            RoleChangeInBranch(
                f"the branch of {b.name!r} changed its role ({b.role!r} -> "
                f"{b.role_at_vote!r}); only the role that prepares a branch can finish "
                "it: connect as that role in the participant's DSN instead of "
                "changing roles inside a global transaction"
            ),
        )

    def _paxos_register(self, to_prepare: list[Branch]) -> Step[Voters]:
        """Paxos mode: take a txid registered on the log databases (usually ahead,
        with many others: see :meth:`txmgr.PaxosLog.take`) — the transaction's
        txid from now on — and name its voters in every writer's gid, so that
        recovery needs nothing else to finish a branch."""
        changed = [b for b in to_prepare if b.role_at_vote != b.role]
        if changed:
            yield from self._abort_role_change(changed[0])
        try:
            txid, voters = yield from paxos_register()
        except Exception as e:  # LogQuorumUnavailable above all: nothing is prepared yet
            yield from self._abort(f"could not register the transaction on the Paxos log: {e}", e)
        logger.debug("txid=%s: registered on the Paxos log as %s", self.txid, txid)
        self.txid = txid
        self._registered = True
        for b in to_prepare:
            b.gid = paxos_gid(txid, voters, b.name)
        return voters

    def _paxos_two_phase(
        self, to_prepare: list[Branch], readers: list[Branch], voters: Voters
    ) -> Step[None]:
        """Paxos mode: prepare (the gids name the voters), propose commit, finish."""
        tm = self.tm
        try:
            failpoints.fire("before_prepare")
        except Exception as e:
            yield from self._abort_unproposed(f"failpoint before_prepare: {e}", e)
        failed = yield from self._prepare(to_prepare)
        if failed:
            # Nothing was proposed, and only this coordinator proposes commit:
            # commit can never be chosen. A branch prepared behind a lost
            # connection is rolled back by recovery (which decides abort).
            b, err = failed[0]
            yield from self._abort_unproposed(
                with_hint(f"participant {b.name!r} could not prepare (voted no): {err}", err), err
            )
        try:
            failpoints.fire("before_decision")
            tm.hooks.before_decision(self.txid, 0)  # no lxid in Paxos mode
        except Exception as e:
            yield from self._abort_unproposed(f"the before_decision hook failed: {e}", e)
        if self.expired():
            yield from self._abort_unproposed("before the decision", None)
        self.run_deadline = None
        try:
            outcome = yield from paxos_propose(self.txid, voters, [b.name for b in to_prepare])
        except Exception as e:  # the branches are prepared: only recovery can tell
            outcome = Outcome("undecided", detail=f"proposing commit failed: {e}")
        if outcome.decision == "abort":
            # A recovery process decided abort first (it found the branches
            # prepared and this coordinator silent for too long).
            yield from self._abort(
                f"the Paxos log decided abort (a recovery process preempted this "
                f"coordinator): {outcome.detail}", None
            )
        if not outcome.commits:
            yield from self._rollback_branches(readers)
            if outcome.decision == "forgotten":
                # Commit can no longer be chosen, or it was and every branch is
                # finished: rolling back what is still prepared is safe either way.
                yield from self._rollback_branches(to_prepare)
            self.state = TransactionState.UNKNOWN
            raise OutcomeUnknown(
                f"transaction {self.txid}: the Paxos log did not confirm the decision "
                f"({outcome.decision}: {outcome.detail}); it is committed on every participant "
                "or on none, and `txmgr recover` will finish it",
                txid=self.txid,
            )
        _quiet_hook(_after_decision, tm.hooks, self.txid, 0)
        yield from self._commit_prepared(to_prepare, readers)

    def _prepare(self, to_prepare: list[Branch]) -> Step[list[tuple[Branch, BaseException]]]:
        """PREPARE TRANSACTION every writer (gids set); the branches that failed."""
        tm = self.tm
        jobs = [Job(b.conn, _command(b"PREPARE TRANSACTION ", b)) for b in to_prepare]
        yield Run(jobs)
        for b, job in zip(to_prepare, jobs, strict=True):
            if job.error is None and job.tag != b"PREPARE TRANSACTION":
                # The branch's transaction had failed: PREPARE rolled it back.
                job.error = TransactionAborted(
                    f"participant {b.name!r}: its transaction had already failed, so "
                    f"PREPARE TRANSACTION rolled it back (server answered {job.tag!r}); "
                    + FAILED_BRANCH_HINT,
                    txid=self.txid,
                )
            # A lost connection may have prepared the branch or not: if it did,
            # the decision (aborted below) makes recovery roll it back.
            b.prepared = job.error is None
            if job.error is not None:
                self._maybe_prepared = True
        failed = [(b, j.error) for b, j in zip(to_prepare, jobs, strict=True) if j.error]
        if not failed:
            for b in to_prepare:
                assert b.gid is not None
                try:
                    failpoints.fire("after_prepare")
                    tm.hooks.after_prepare(self.txid, b.name, b.gid)
                except Exception as e:
                    failed.append((b, e))
        return failed

    def _commit_prepared(self, to_prepare: list[Branch], readers: list[Branch]) -> Step[None]:
        """Commit is decided: COMMIT PREPARED every writer, commit the readers."""
        tm = self.tm

        def before(b: Branch) -> None:
            assert b.gid is not None
            failpoints.fire("before_commit_prepared")
            tm.hooks.before_commit_prepared(self.txid, b.name, b.gid)

        jobs = [
            Job(b.conn, _command(b"COMMIT PREPARED ", b), before=partial(before, b))
            for b in to_prepare
        ]
        yield Run([*jobs, *(Job(b.conn, b"COMMIT") for b in readers)])
        # "does not exist": somebody else finished the branch — recovery committed
        # it, or someone rolled it back. Only the participant knows which.
        gone = [b for b, job in zip(to_prepare, jobs, strict=True)
                if isinstance(job.error, psycopg.errors.UndefinedObject)]
        fates = (yield from _fates(self.txid, gone)) if gone else {}
        pending, rolled_back = [], []
        for b, job in zip(to_prepare, jobs, strict=True):
            assert b.gid is not None
            fate = fates.get(b.name, "committed" if job.error is None else None)
            if fate == "committed":
                b.prepared = False
                _quiet_hook(_after_commit_prepared, tm.hooks, self.txid, b.name, b.gid)
            elif fate == "aborted":
                b.prepared = False
                rolled_back.append(b)
            else:
                # "busy" (55000) is NOT done: another session holds it right now,
                # so the decision row must stay; so must it when the participant
                # could not say what became of a vanished branch.
                pending.append(b)
                logger.warning(
                    "txid=%s gid=%s participant=%s: COMMIT PREPARED did not finish, recovery "
                    "will: %s", self.txid, b.gid, b.name, job.error,
                )
        if rolled_back:
            yield from self._heuristic_mixed(to_prepare, rolled_back, pending)
        if pending:
            self.state = TransactionState.COMMITTED_PENDING
        else:
            _quiet_hook(failpoints.fire, "before_cleanup")
            yield Forget([self.txid])
            self.state = TransactionState.COMMITTED

    def _heuristic_mixed(
        self, writers: list[Branch], rolled_back: list[Branch], pending: list[Branch]
    ) -> Step[NoReturn]:
        """Commit was decided, yet someone rolled back these branches: say so loudly."""
        lost = [b.name for b in rolled_back]
        committed = [b.name for b in writers if b not in rolled_back and b not in pending]
        logger.error(
            "txid=%s: HEURISTIC MIXED OUTCOME: the decision is commit, but the branches of %s "
            "were rolled back by another session (ROLLBACK PREPARED); committed: %s",
            self.txid, ", ".join(lost), ", ".join(committed) or "none",
            extra={"txid": self.txid, "event": "heuristic_mixed", "rolled_back": lost,
                   "committed": committed},
        )  # fmt: skip
        _quiet_hook(count_heuristic_mixed, lost)
        if not pending:  # every branch is finished one way or the other
            yield Forget([self.txid])
        self.state = TransactionState.HEURISTIC_MIXED
        raise HeuristicMixed(
            f"transaction {self.txid}: the decision was commit, but the prepared branch of "
            + ", ".join(repr(n) for n in lost)
            + " was rolled back by another session before the coordinator's COMMIT PREPARED "
            f"(committed: {', '.join(repr(n) for n in committed) or 'none'}"
            + (f"; left to recovery: {', '.join(repr(b.name) for b in pending)}" if pending
               else "")
            + "). Atomicity is broken for this transaction: repair the data of the "
            "rolled-back participants by hand, and find what ran ROLLBACK PREPARED on "
            "txmgr's gids (only recovery, the daemon and `txmgr resolve` may finish them)",
            txid=self.txid, committed=committed, rolled_back=lost,
        )

    def _decide(self, decision: Decision, prepared: list[Branch], patience: float) -> Step[None]:
        """Commit the decision transaction; settle a lost reply by asking the log."""
        conn = decision.conn
        assert conn is not None
        job = decision.commit_job()
        yield Run([job])
        if job.error is None and job.tag == b"COMMIT":
            return
        if isinstance(job.error, psycopg.errors.UndefinedTable):  # L rolled back
            decision.forget_later()
            yield from self._abort_no_log_tables()
        error: BaseException = job.error or TransactionAborted(
            f"the decision transaction had failed: COMMIT answered {job.tag!r}", txid=self.txid
        )
        if isinstance(error, psycopg.OperationalError) or conn.closed or conn.broken:
            # The COMMIT may or may not have happened (connection lost, the
            # server ended an idle session or failed). The log knows.
            gids = [(b.conn, b.gid) for b in prepared if b.gid is not None]
            outcome = yield from decision.confirm(gids, patience)
        else:  # the server refused the COMMIT (e.g. a deferred constraint): L rolled back
            outcome = "aborted"
        if outcome == "committed":
            return
        decision.forget_later()
        if outcome == "aborted":
            yield from self._abort(
                f"the decision transaction in the log did not commit: {error}", error
            )
        self.state = TransactionState.UNKNOWN
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

    def _abort_no_log_tables(self) -> Step[NoReturn]:
        """Roll back every branch: the decision log lacks its tables (say how to fix it)."""
        yield from self._rollback_branches(self.branches.values())
        self.state = TransactionState.ROLLED_BACK
        raise LogSchemaError(
            "the decision log has no txmgr tables: run `txmgr migrate --config FILE`"
        ) from None

    def _abort_unproposed(self, message: str, cause: BaseException | None) -> Step[NoReturn]:
        """Paxos mode, before proposing: abort, and delete the registration later —
        nothing was proposed for it, so no slot of it can hold a commit."""
        self.tm.forget_later([self.txid])
        yield from self._abort(message, cause)
        raise AssertionError("unreachable: _abort raises")

    def _abort(self, message: str, cause: BaseException | None) -> Step[NoReturn]:
        """Roll back every branch (prepared or not) and raise TransactionAborted."""
        yield from self._rollback_branches(self.branches.values())
        self.state = TransactionState.ROLLED_BACK
        if self.expired():  # whatever failed, the deadline is why
            raise self.timeout_error(
                message if message.startswith("before") else f"while committing ({message})"
            ) from cause
        if isinstance(cause, TransactionAborted):
            raise cause
        raise TransactionAborted(
            f"transaction {self.txid} rolled back, nothing was committed: {message}",
            txid=self.txid,
        ) from cause

    def _rollback_branches(self, branches: Iterable[Branch]) -> Step[None]:
        """Roll back (or ROLLBACK PREPARED) every branch in one round trip."""
        branches = list(branches)
        jobs = []
        for b in branches:
            b.conn._txmgr_branch = None
            if b.prepared:
                jobs.append(Job(b.conn, _command(b"ROLLBACK PREPARED ", b)))
            elif not b.conn.closed and b.conn.info.transaction_status != TransactionStatus.IDLE:
                jobs.append(Job(b.conn, b"ROLLBACK"))
        if jobs:
            yield Run(jobs)
        for b in branches:
            b.prepared = False
        for job in jobs:
            if job.error is not None and not _finished_elsewhere(job.error):
                # The server rolls back a lost session on its own, recovery the rest.
                logger.warning("txid=%s: rollback failed: %s", self.txid, job.error)
                self._maybe_prepared = True

    def _release_all(self) -> Step[None]:
        branches = list(self.branches.values())
        self.branches.clear()
        for b in branches:
            try:
                yield Release(b.name, b.conn)
            except Exception as e:  # one bad connection must not strand the others
                logger.warning("participant=%s: could not return a connection: %s", b.name, e)


#: Seconds past a deadline the front ends give a server to end a statement
#: itself (the statement_timeout the core sets, a cancel request) before they
#: close its connection: a statement ended by the server leaves nothing behind,
#: a PREPARE cut off by a closed connection may leave a branch for recovery.
CANCEL_GRACE = 2.0


def step_limit(step_timeout: float | None, core: TransactionCore
               ) -> tuple[float | None, float | None]:
    """(timeout, cancel_after) of a request of ``core`` (see
    :func:`txmgr._multiplex.run_all`): step_timeout and, until the commit point,
    a cancel request at the deadline and the connection closed
    :data:`CANCEL_GRACE` seconds later."""
    deadline = core.run_deadline
    if deadline is None:
        return step_timeout, None
    left = max(deadline - time.monotonic(), 0.0)
    timeout = left + CANCEL_GRACE
    return (timeout if step_timeout is None else min(timeout, step_timeout)), left


_VOTE_QUERY = (
    b"SELECT pg_current_xact_id_if_assigned()::text, current_setting('txmgr.txid', true),"
    b" current_user"
)


_BEGIN = b"BEGIN; SELECT set_config('txmgr.txid', "


def _command(command: bytes, b: Branch) -> bytes:
    """``command`` followed by the branch's gid as a quoted literal."""
    assert b.gid is not None
    return command + literal(b.gid, b.conn)


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


def _fates(txid: str, gone: list[Branch]) -> Step[dict[str, str]]:
    """What became of branches whose gid vanished before COMMIT PREPARED: by participant,
    "committed" or "aborted" (``pg_xact_status`` of the branch's own xid, kept from the
    vote: a prepared transaction keeps its xid). A participant that cannot tell is
    left out."""
    known = [b for b in gone if b.xid is not None]  # every writer voted with its xid
    jobs = [
        Job(b.conn, b"SELECT pg_xact_status(" + literal(str(b.xid), b.conn) + b"::xid8)")
        for b in known
    ]
    if jobs:
        yield Run(jobs)
    fates: dict[str, str] = {}
    for b, job in zip(known, jobs, strict=True):
        status = job.rows[0][0] if job.error is None and job.rows else None
        if status in ("committed", "aborted"):
            fates[b.name] = status
        else:
            logger.warning("txid=%s gid=%s participant=%s: its gid is gone and the "
                           "participant cannot say what became of it (%s)",
                           txid, b.gid, b.name, job.error or status)
    return fates


def _finished_elsewhere(error: BaseException) -> bool:
    """*PREPARED failed because somebody else (recovery) finished or is finishing it."""
    return isinstance(
        error, psycopg.errors.UndefinedObject | psycopg.errors.ObjectNotInPrerequisiteState
    )

"""The decision transaction ``L`` of one global transaction, as protocol steps.

``L`` lives on a dedicated log connection (from the manager's log pool), or
on the log participant's own branch connection. Opening it inserts the
decision row (and deletes the rows of decisions finished earlier); committing
it is the commit point; rolling it back is the abort. Pure: every call that
talks to a server is a :mod:`txmgr._ops` request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from txmgr import log as decision_log
from txmgr._multiplex import AnyConnection, Job, literal
from txmgr._ops import ReleaseLog, Run, Sleep, Step, log_connection, read_decision
from txmgr.config import Config
from txmgr.errors import ParticipantUnavailable

__all__ = ["Decision", "ForgetQueue", "Outcome"]

logger = logging.getLogger("txmgr")

#: What became of ``L`` after its COMMIT reply was lost; "finished": recovery
#: finished every branch, so the log no longer says which way; "unknown": the
#: log could not be asked.
Outcome = Literal["committed", "aborted", "finished", "unknown"]


class ForgetQueue(Protocol):
    """What a decision needs from its manager: settings and finished decisions."""

    @property
    def config(self) -> Config: ...
    def take_forget(self) -> list[str]: ...
    def forget_later(self, txids: list[str]) -> None: ...


class Decision:
    """The decision transaction ``L``: on a dedicated log connection, or on the
    log participant's own branch connection (``conn`` given)."""

    __slots__ = ("_owned", "_tm", "_txid", "conn", "error", "forget", "lxid", "row")

    def __init__(self, tm: ForgetQueue, txid: str, conn: AnyConnection | None = None) -> None:
        self._tm = tm
        self._txid = txid
        self._owned = conn is None  # a dedicated log connection, ours to release
        self.conn = conn
        self.lxid = 0  # set once L is open
        self.forget: list[str] = []  # finished decisions this L deletes
        self.error: BaseException | None = None  # why L could not be opened
        # Participants of a decision row not inserted yet: it goes with the COMMIT.
        self.row: list[str] | None = None

    def job(self, participants: Sequence[str]) -> Step[Job | None]:
        """The query opening ``L``, to send along with the votes; None when no log
        connection is free right now (then :meth:`open` runs after the votes)."""
        try:
            self.conn = yield from log_connection(wait=False)
        except ParticipantUnavailable:
            return None
        return self._job(participants)

    def _job(self, participants: Sequence[str]) -> Job:
        assert self.conn is not None
        self.forget = self._tm.take_forget()
        query = decision_log.decision_query(
            self._txid,
            participants,
            idle_timeout=self._tm.config.log_idle_timeout,
            forget=self.forget,
            # A dedicated log connection is idle; the log participant's branch
            # is mid-transaction.
            begin=self.conn.info.transaction_status == TransactionStatus.IDLE,
        )
        return Job(self.conn, query.as_bytes(self.conn))

    def opened(self, job: Job) -> Step[None]:
        """Take in the answer of :meth:`job`'s query."""
        if job.error is None:
            assert job.rows is not None
            self.lxid = int(str(job.rows[-1][0]))
        elif self._owned and isinstance(job.error, psycopg.OperationalError):
            # Most likely a pooled connection that went stale (the log server
            # restarted): nothing was decided, open() retries on a fresh one.
            yield from self._discard_connection()
        else:
            self.error = job.error

    def open(self, participants: Sequence[str]) -> Step[None]:
        """Open ``L`` now, unless it already is; a failure is kept in ``error``."""
        if self.lxid or self.error is not None:
            return
        for attempt in (1, 2):  # a stale pooled connection is replaced once
            try:
                if self.conn is None:
                    self.conn = yield from log_connection(wait=True)
            except Exception as e:
                self.error = e
                return
            job = self._job(participants)
            yield Run([job])
            yield from self.opened(job)
            if self.lxid or self.error is not None:
                return
            if attempt == 2:  # stale again: give up
                self.error = job.error

    def open_at_commit(self, lxid: int, participants: Sequence[str]) -> None:
        """``L`` is the log participant's branch, which wrote and so has its xid:
        the decision row is inserted by the query that commits it, one round
        trip fewer than :meth:`open` (the branch's vote set what ``L`` needs,
        see :func:`txmgr.log.decision_settings`)."""
        self.lxid = lxid
        self.row = list(participants)

    def commit_job(self) -> Job:
        """The query that commits ``L`` — the commit point."""
        assert self.conn is not None
        if self.row is None:
            return Job(self.conn, b"COMMIT")
        self.forget = self._tm.take_forget()
        query = decision_log.decide_query(self._txid, self.row, forget=self.forget)
        return Job(self.conn, query.as_bytes(self.conn))

    def _discard_connection(self) -> Step[None]:
        self.forget_later()
        if self.conn is not None:
            conn, self.conn = self.conn, None
            yield ReleaseLog(conn)  # the pool drops a broken one

    def forget_later(self) -> None:
        """``L`` will not commit: its cleanup of finished rows waits for the next one."""
        self._tm.forget_later(self.forget)
        self.forget = []

    def cancel(self) -> Step[None]:
        """Roll ``L`` back: nothing is decided. Never fails (the server rolls back
        a lost session by itself)."""
        self.forget_later()
        conn = self.conn
        if (
            conn is not None
            and not conn.closed
            and conn.info.transaction_status != TransactionStatus.IDLE
        ):
            yield Run([Job(conn, b"ROLLBACK")])  # an error is left in the job

    def confirm(
        self, prepared: Sequence[tuple[AnyConnection, str]], patience: float
    ) -> Step[Outcome]:
        """Ask the log, for up to ``patience`` seconds, what became of ``L`` whose
        COMMIT reply was lost; ``prepared``: the (connection, gid) of its branches."""
        deadline = time.monotonic() + patience
        while True:
            try:
                status, committed = yield from read_decision(self.lxid, self._txid)
                if status != "in progress":  # L is over, and its row says how
                    if committed:
                        return "committed"
                    if status in ("aborted", "future"):
                        return "aborted"
                    # "committed" (or too old) and no row: either recovery
                    # committed every branch and deleted the row, or the log
                    # crashed and lxid now names another transaction. A
                    # committed decision's row outlives its prepared branches.
                    still = yield from _any_prepared(prepared)
                    if still is not None:
                        return "aborted" if still else "finished"
            except Exception as e:
                logger.warning("txid=%s: cannot reach the log to confirm: %s", self._txid, e)
            if time.monotonic() >= deadline:
                return "unknown"
            yield Sleep(0.1)  # the old session is still being torn down by the server

    def release(self) -> Step[None]:
        if self._owned and self.conn is not None:
            conn, self.conn = self.conn, None
            yield ReleaseLog(conn)


def _any_prepared(prepared: Sequence[tuple[AnyConnection, str]]) -> Step[bool | None]:
    """Is any of these gids still prepared? None when a participant cannot tell."""
    query = b"SELECT count(*) FROM pg_prepared_xacts WHERE gid = "
    jobs = [Job(conn, query + literal(gid, conn)) for conn, gid in prepared]
    if jobs:
        yield Run(jobs)
    if any(j.error is not None or not j.rows for j in jobs):
        return None
    return any(j.rows and j.rows[0][0] != "0" for j in jobs)

"""A txmgr transaction seen through SQLAlchemy: Connections and Sessions on its branches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from sqlalchemy.engine import Connection, Engine

from txmgr.errors import TransactionAborted, TransactionStateError
from txmgr.sqlalchemy._engine import connect_branch
from txmgr.sqlalchemy._session import BranchSession
from txmgr.sqlalchemy._state import BranchState
from txmgr.transaction import Transaction, TransactionState

__all__ = ["SQLAlchemyTransaction"]

logger = logging.getLogger("txmgr")


class _Branch:
    __slots__ = ("connection", "session", "state")

    def __init__(self, connection: Connection, state: BranchState) -> None:
        self.connection = connection
        self.state = state
        self.session: BranchSession | None = None


class SQLAlchemyTransaction:
    """A :class:`txmgr.Transaction` whose branches are also used through SQLAlchemy.

    Use it as a context manager. Leaving the block without an exception
    flushes every session, then commits every branch atomically; an exception
    rolls every branch back and is re-raised. Not thread-safe, like the
    transaction it wraps: one thread drives it.
    """

    __slots__ = ("_branches", "_engine", "_session_options", "_tx")

    def __init__(
        self,
        tx: Transaction,
        engine: Callable[[str], Engine],
        session_options: Mapping[str, Any],
    ) -> None:
        self._tx = tx
        self._engine = engine
        self._session_options = dict(session_options)
        self._branches: dict[str, _Branch] = {}  # participant name -> its branch

    def __repr__(self) -> str:
        return f"<SQLAlchemyTransaction {self._tx.txid} {self._tx.state.value}>"

    @property
    def transaction(self) -> Transaction:
        """The txmgr transaction (commit through this object, not through it)."""
        return self._tx

    @property
    def txid(self) -> str:
        """The global transaction's id (in its gids, logs and ``txmgr status``)."""
        return self._tx.txid

    @property
    def state(self) -> TransactionState:
        """The global transaction's state (active, committed, rolled back, …)."""
        return self._tx.state

    def connection(self, name: str) -> Connection:
        """The SQLAlchemy Connection on ``name``'s branch (the same one on every call)."""
        return self._branch(name, "connection").connection

    def session(self, name: str) -> BranchSession:
        """The ORM Session on ``name``'s branch (the same one on every call)."""
        branch = self._branch(name, "session")
        if branch.session is None:
            branch.session = BranchSession(
                branch.connection, branch.state, **self._session_options
            )
        return branch.session

    def raw_connection(self, name: str) -> psycopg.Connection[Any]:
        """The branch's psycopg connection: the one under :meth:`connection` and :meth:`session`."""
        return self._tx.connection(name)

    def commit(self) -> None:
        """Flush every session, then commit every branch atomically (done by the block)."""
        self._require_active("commit()")
        try:
            failure = self._flush()
        except BaseException:  # KeyboardInterrupt and the like: roll back, re-raise
            self.rollback()
            raise
        if failure is not None:
            self.rollback()
            message, cause = failure
            raise TransactionAborted(
                f"transaction {self.txid} rolled back, nothing was committed: {message}",
                txid=self.txid,
            ) from cause
        try:
            self._close_sqlalchemy(quiet=False)
        except BaseException:
            self._tx.rollback()
            raise
        self._tx.commit()

    def rollback(self) -> None:
        """Roll back every branch (done by the block on an exception)."""
        self._close_sqlalchemy(quiet=True)
        self._tx.rollback()

    def __enter__(self) -> SQLAlchemyTransaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            self.rollback()
            better = self._tx.explain(exc)  # the deadline, or a deadlock victim
            if better is not None:
                raise better from exc
        elif self._tx.state is TransactionState.ACTIVE:
            self.commit()
        else:  # ended through .transaction: still let go of SQLAlchemy's objects
            self._close_sqlalchemy(quiet=True)

    # -- internals --------------------------------------------------------------

    def _require_active(self, call: str) -> None:
        if self._tx.state is not TransactionState.ACTIVE:
            raise TransactionStateError(
                f"'{call}' needs an active transaction; transaction {self.txid} is "
                f"{self._tx.state.value}: start a new one with transaction()"
            )

    def _branch(self, name: str, call: str) -> _Branch:
        self._require_active(f"{call}({name!r})")
        branch = self._branches.get(name)
        if branch is None:
            conn = self._tx.connection(name)  # opens the txmgr branch; checks the name
            state = BranchState(name)
            branch = _Branch(connect_branch(self._engine(name), conn, state), state)
            self._branches[name] = branch
        return branch

    def _flush(self) -> tuple[str, BaseException | None] | None:
        """Write pending ORM changes: why the transaction cannot commit, or None."""
        for name, b in self._branches.items():
            if b.state.rolled_back is not None:  # no point flushing then
                return (
                    f"participant {name!r}: {b.state.rolled_back}; one branch cannot roll "
                    "back alone, so the whole transaction rolled back",
                    b.state.rollback_cause,
                )
        for name, b in self._branches.items():
            if b.session is None:
                continue
            try:
                b.session.flush()
            except Exception as e:
                return f"flushing the session of participant {name!r} failed: {e}", e
        return None

    def _close_sqlalchemy(self, *, quiet: bool) -> None:
        """Close sessions and Connections; none of it reaches the server (see _dialect)."""
        for b in self._branches.values():
            b.state.open = False
        first: BaseException | None = None
        for name, b in self._branches.items():
            for closeable in (b.session, b.connection):
                if closeable is None:
                    continue
                try:
                    closeable.close()
                except Exception as e:
                    logger.warning("txid=%s participant=%s: closing SQLAlchemy's %s failed: %s",
                                   self.txid, name, type(closeable).__name__, e)
                    first = first or e
        self._branches.clear()
        if first is not None and not quiet:
            raise first

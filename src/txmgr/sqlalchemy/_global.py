"""The txmgr transaction behind one transaction of a :class:`TwoPhaseSession`.

SQLAlchemy's Session begins a transaction lazily ("autobegin") and ends it
with commit, rollback or close; one :class:`GlobalTransaction` follows each
such root transaction. It opens a txmgr :class:`~txmgr.Transaction` when the
session first needs a Connection, gives each participant's Connection a
branch of it, and is the ``owner`` those Connections' dialect calls when
SQLAlchemy commits or rolls them back (:mod:`txmgr.sqlalchemy._dialect`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from txmgr.errors import TransactionAborted, TransactionStateError
from txmgr.sqlalchemy._engine import attach
from txmgr.sqlalchemy._state import BranchState
from txmgr.transaction import TransactionState

__all__ = ["GlobalTransaction", "SessionTransactionSource", "TxmgrTransaction"]


class TxmgrTransaction(Protocol):
    """What a session needs of a txmgr transaction: a :class:`~txmgr.Transaction`,
    or, for asyncio sessions, an :class:`~txmgr.AsyncTransaction` awaited from
    SQLAlchemy's greenlet (:mod:`txmgr.sqlalchemy._aio`)."""

    @property
    def txid(self) -> str: ...

    @property
    def state(self) -> TransactionState: ...

    def connection(self, name: str) -> Any: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class SessionTransactionSource(Protocol):
    """Where sessions get their txmgr transactions (a :class:`~txmgr.TransactionManager`)."""

    def transaction(self) -> TxmgrTransaction: ...

logger = logging.getLogger("txmgr")

_COMMITTED = (TransactionState.COMMITTED, TransactionState.COMMITTED_PENDING)


class GlobalTransaction:
    """One global transaction for one root SessionTransaction (``root``).

    Not thread-safe, like the Session it belongs to.
    """

    __slots__ = ("_branches", "_cause", "_reason", "_tm", "_tx", "root")

    def __init__(self, tm: SessionTransactionSource, root: object) -> None:
        self._tm = tm
        self.root = root  # the SessionTransaction this transaction follows
        self._tx: TxmgrTransaction | None = None  # opened by the first connect()
        self._branches: list[tuple[Connection, BranchState]] = []
        self._reason: str | None = None  # why SQLAlchemy rolled it back, if it did
        self._cause: BaseException | None = None

    def __repr__(self) -> str:
        return f"<GlobalTransaction {self._tx!r}>"

    @property
    def transaction(self) -> TxmgrTransaction | None:
        """The txmgr transaction, once the session used a participant."""
        return self._tx

    @property
    def active(self) -> bool:
        return self._tx is None or self._tx.state is TransactionState.ACTIVE

    def connect(self, name: str, connect: Callable[[], Connection]) -> Connection:
        """A SQLAlchemy Connection (made by ``connect``) on participant ``name``'s branch."""
        if not self.active:
            raise TransactionStateError(
                f"the session's global transaction is over ({self.ended_reason()}): call "
                "session.rollback() (or leave the session's block) to begin a new one"
            )
        if self._tx is None:
            self._tx = self._tm.transaction()
        raw = self._tx.connection(name)  # opens the branch; UnknownParticipant
        state = BranchState(name, owner=self)
        conn = attach(connect, raw, state)
        self._branches.append((conn, state))
        return conn

    # -- BranchOwner: called by the dialect ------------------------------------

    def commit_all(self) -> None:
        tx = self._tx
        if tx is None or tx.state in _COMMITTED:
            return  # another Connection of this session committed it already
        if tx.state is TransactionState.ACTIVE:
            try:
                tx.commit()  # TransactionAborted, OutcomeUnknown, … reach session.commit()
            finally:
                self._close_branches()
            return
        if tx.state is TransactionState.ROLLED_BACK:
            raise self.aborted()
        raise TransactionStateError(f"cannot commit: {self.ended_reason()}")

    def rollback_all(self, why: str, cause: BaseException | None) -> None:
        tx = self._tx
        if tx is None or tx.state is not TransactionState.ACTIVE:
            return  # ended already: nothing left to undo
        self._reason, self._cause = why, cause
        try:
            tx.rollback()
        finally:
            self._close_branches()

    def ended_reason(self) -> str:
        tx = self._tx
        if tx is None:
            return "no global transaction"
        what = f"global transaction {tx.txid} is {tx.state.value}"
        return f"{what}: {self._reason}" if self._reason else what

    # -- used by the session -----------------------------------------------------

    def rolled_back_early(self) -> bool:
        """SQLAlchemy rolled a branch back while the session's transaction goes on."""
        return self._tx is not None and self._tx.state is TransactionState.ROLLED_BACK

    def aborted(self) -> TransactionAborted:
        txid = self._tx.txid if self._tx is not None else None
        error = TransactionAborted(
            f"transaction {txid} rolled back, nothing was committed: "
            f"{self._reason or 'it was rolled back before the commit'}; call "
            "session.rollback() to begin a new one",
            txid=txid,
        )
        error.__cause__ = self._cause
        return error

    def end(self) -> None:
        """The session's transaction ended: roll back what is still open (a
        transaction no Connection of the session committed or rolled back) and
        let go of every Connection."""
        try:
            self.rollback_all("the session's transaction ended without a commit", None)
        finally:
            branches, self._branches = self._branches, []
            for conn, state in branches:
                state.open = False
                try:
                    conn.close()  # nothing reaches the server (see _dialect)
                except Exception as e:
                    logger.warning("participant=%s: closing SQLAlchemy's Connection failed: %s",
                                   state.participant, e)

    def _close_branches(self) -> None:
        # The connections went back to txmgr's pool: SQLAlchemy must not use them.
        for _, state in self._branches:
            state.open = False

"""The ORM Session handed out for one branch."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from txmgr.sqlalchemy._state import BranchState, refuse

__all__ = ["BranchSession"]

_HINT = (
    "call flush() to write pending changes now, begin_nested() for a savepoint, "
    "expunge() to drop pending objects, or raise an exception to roll everything back"
)


class BranchSession(Session):
    """A Session joined to one txmgr branch; the txmgr transaction is its transaction.

    It joins the branch's SQLAlchemy Connection with
    ``join_transaction_mode="rollback_only"``: the branch is an *external*
    transaction the session never commits or closes. While the transaction
    block runs, ending the session's transaction by hand — ``commit()``,
    ``rollback()``, ``begin()``, ``close()``/``reset()`` — raises
    :class:`~txmgr.errors.ManualTransactionControl`: committing one branch
    alone would break atomicity, and closing would silently drop unflushed
    changes. ``invalidate()`` marks the whole transaction to roll back. The
    block flushes and closes the session when it ends.
    ``begin_nested()`` (savepoints) and ``flush()`` work as usual.
    """

    def __init__(self, bind: Connection, branch: BranchState, **options: Any) -> None:
        super().__init__(bind=bind, join_transaction_mode="rollback_only", **options)
        self._txmgr_branch = branch

    def _txmgr_refuse(self, what: str) -> None:
        if self._txmgr_branch.open:
            raise refuse(f"Session.{what}", self._txmgr_branch.participant, _HINT)

    def commit(self) -> None:
        self._txmgr_refuse("commit()")
        super().commit()

    def rollback(self) -> None:
        self._txmgr_refuse("rollback()")
        super().rollback()

    def begin(self, nested: bool = False) -> SessionTransaction:
        # begin_nested() comes through here with nested=True: savepoints are fine.
        # A root begin() would only last until its block "commits".
        if not nested:
            self._txmgr_refuse("begin()")
        return super().begin(nested=nested)

    def close(self) -> None:
        self._txmgr_refuse("close()")
        super().close()

    def reset(self) -> None:
        self._txmgr_refuse("reset()")
        super().reset()

    def invalidate(self) -> None:
        # Like close(), and the application says the connection is unsafe:
        # this branch's work cannot be trusted, so none of the transaction's can.
        if self._txmgr_branch.open:
            self._txmgr_branch.mark_rolled_back("Session.invalidate() was called", None)
        super().invalidate()

    def __exit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if type_ is not None and self._txmgr_branch.open:
            # An exception is on its way to the transaction block, which rolls
            # back every branch and closes this session: do not hide it.
            return
        self.close()

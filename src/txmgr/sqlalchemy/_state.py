"""What the SQLAlchemy side knows about one branch, shared by the dialect and the sessions.

A branch is driven in one of two ways:

- by a transaction block (:class:`~txmgr.sqlalchemy.SQLAlchemyTransaction`):
  the block ends the branch, so SQLAlchemy may never commit it and a rollback
  only marks the whole transaction to roll back (``owner`` is None);
- by a :class:`~txmgr.sqlalchemy.TwoPhaseSession`: the session's own commit
  and rollback end the global transaction, through its ``owner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from txmgr.errors import ManualTransactionControl, TransactionStateError

__all__ = ["INFO_KEY", "BranchOwner", "BranchState", "branch_closed", "refuse"]

#: Key of the BranchState in the ``record_info`` of the pool entry under a
#: branch's SQLAlchemy Connection: the dialect finds its branch through it.
INFO_KEY = "txmgr.branch"


class BranchOwner(Protocol):
    """The global transaction a session-driven branch belongs to.

    The dialect calls it from SQLAlchemy's transaction methods; both calls are
    idempotent (the first one ends every branch, the others find it ended).
    """

    def commit_all(self) -> None:
        """The session commits: run txmgr's commit over every branch."""

    def rollback_all(self, why: str, cause: BaseException | None) -> None:
        """SQLAlchemy rolled back (or gave up) one branch: roll back every branch."""

    def ended_reason(self) -> str:
        """Why the branches are over, for errors on a Connection used afterwards."""


@dataclass(eq=False, slots=True)
class BranchState:
    """One participant's branch as seen by SQLAlchemy, for one global transaction."""

    participant: str
    #: None: the branch belongs to a transaction block; else the session's
    #: global transaction, which SQLAlchemy's commit and rollback end.
    owner: BranchOwner | None = None
    #: True while the branch's connection is ours; False once txmgr ended the
    #: branch (from then on SQLAlchemy must not touch the connection: it is
    #: back in txmgr's pool, maybe already in another transaction).
    open: bool = True
    #: Why SQLAlchemy rolled the branch back, if it did (transaction blocks
    #: only): the transaction can then only roll back as a whole.
    rolled_back: str | None = None
    rollback_cause: BaseException | None = None

    def mark_rolled_back(self, why: str, cause: BaseException | None) -> None:
        if self.rolled_back is None:  # the first reason is the one to report
            self.rolled_back = why
            self.rollback_cause = cause


def refuse(what: str, participant: str, hint: str) -> ManualTransactionControl:
    return ManualTransactionControl(
        f"{what} on participant {participant!r}'s branch is not allowed inside a txmgr "
        f"transaction: txmgr commits or rolls back every branch together when the "
        f"transaction ends; {hint}"
    )


def branch_closed(state: BranchState) -> TransactionStateError:
    """The error for SQL on a Connection whose branch txmgr already ended."""
    if state.owner is not None:
        why = state.owner.ended_reason()
        hint = "call session.rollback() (or leave the session's block), then use the session"
    else:
        why = "its transaction block ended"
        hint = "use the Connections of a new transaction"
    return TransactionStateError(
        f"this SQLAlchemy Connection's branch of participant {state.participant!r} is over "
        f"({why}); its database connection went back to txmgr's pool: {hint}"
    )

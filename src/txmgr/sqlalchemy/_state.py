"""What the SQLAlchemy side knows about one branch, shared by the dialect and the session."""

from __future__ import annotations

from dataclasses import dataclass

from txmgr.errors import ManualTransactionControl

__all__ = ["INFO_KEY", "BranchState", "refuse"]

#: Key of the BranchState in the ``record_info`` of the pool entry under a
#: branch's SQLAlchemy Connection: the dialect finds its branch through it.
INFO_KEY = "txmgr.branch"


@dataclass(eq=False, slots=True)
class BranchState:
    """One participant's branch as seen by SQLAlchemy, for one global transaction."""

    participant: str
    #: True while the transaction block runs; False once txmgr ends the branch
    #: (from then on SQLAlchemy's own cleanup must not touch the connection).
    open: bool = True
    #: Why SQLAlchemy rolled the branch back, if it did: the transaction can
    #: then only roll back as a whole.
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
        f"transaction block ends; {hint}"
    )

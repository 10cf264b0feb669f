"""Hooks called at each step of the commit protocol.

Subclass :class:`Hooks` and pass an instance as ``TransactionManager(hooks=…)``
to observe the protocol (metrics, tracing) or to inject faults in tests: the
crash tests kill the coordinator process from ``after_decision`` to prove
that recovery finishes what a dead coordinator decided. Hooks run on the
committing thread (with asyncio: on the event loop's thread) and must be
quick. An exception from a hook before the decision aborts the transaction
(``TransactionAborted``); after the decision it is logged and changes
nothing (the transaction is committed);
``before_commit_prepared`` raising leaves that branch to recovery.
"""

from __future__ import annotations

__all__ = ["Hooks"]


class Hooks:
    """No-op hooks; override the ones you need."""

    def after_vote(self, txid: str, writers: list[str]) -> None:
        """Every branch was asked whether it wrote; ``writers`` will commit."""

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        """``participant``'s branch is prepared (the decision is not made yet)."""

    def before_decision(self, txid: str, lxid: int) -> None:
        """Every branch is prepared; the decision transaction is about to commit."""

    def after_decision(self, txid: str, lxid: int) -> None:
        """The commit decision is durable; no branch is committed yet."""

    def before_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        """``COMMIT PREPARED`` of ``participant``'s branch is about to be sent."""

    def after_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        """``participant``'s prepared branch is committed."""

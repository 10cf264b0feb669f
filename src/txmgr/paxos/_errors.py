"""Errors of Paxos mode (to move into :mod:`txmgr.errors` when the mode is wired in)."""

from __future__ import annotations

from txmgr.errors import TxmgrError

__all__ = ["LogQuorumUnavailable"]


class LogQuorumUnavailable(TxmgrError):
    """Fewer than a majority of the Paxos log databases answered.

    Raised before anything was prepared, so nothing is committed anywhere;
    ``answered`` and ``needed`` count log databases, ``problems`` says what
    each unreachable one answered (DSNs masked).
    """

    def __init__(self, message: str, *, answered: int, needed: int,
                 problems: list[str]) -> None:
        super().__init__(message)
        self.answered = answered
        self.needed = needed
        self.problems = problems

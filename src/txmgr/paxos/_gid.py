"""The gid of a prepared branch in Paxos mode: a value object with a validating constructor.

Wire form: ``txp1_<txid>_<q><voters>_<participant>``

- ``txid``: 16 hex characters, the global transaction.
- ``q`` (one digit) and ``voters`` (12 hex characters per acceptor
  incarnation, sorted): the acceptors that registered the transaction and how
  many of them decide. Recovery counts only replies from these incarnations,
  so a log database that was wiped and re-created (new incarnation) can never
  vote on a transaction it forgot, and a gid of another Paxos log is simply
  one none of whose voters answers.
- ``participant``: ``[a-z][a-z0-9_]{0,31}``, last because it may contain ``_``.

There is no log id and no xid (the default mode's ``txm1_<logid>_<txid>_<lxid>_``):
the voters name the log. At most 5+17+(1+108+1)+32 = 164 bytes for 9
acceptors, under PostgreSQL's 200.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from txmgr._gid import check_participant_name
from txmgr.paxos._core import Voters

__all__ = ["PAXOS_GID_PREFIX", "PaxosGid"]

PAXOS_GID_PREFIX = "txp1_"
_TXID = re.compile(r"[0-9a-f]{16}")
_GID = re.compile(
    r"txp1_(?P<txid>[0-9a-f]{16})_(?P<q>[1-9])(?P<voters>(?:[0-9a-f]{12}){1,9})"
    r"_(?P<participant>[a-z][a-z0-9_]{0,31})"
)


@dataclass(frozen=True, slots=True)
class PaxosGid:
    """The identifier of one prepared branch of a Paxos-mode transaction."""

    txid: str
    voters: Voters
    participant: str

    def __post_init__(self) -> None:
        if not _TXID.fullmatch(self.txid):
            raise ValueError(f"invalid txid {self.txid!r}: expected 16 hex characters")
        if list(self.voters.incarnations) != sorted(self.voters.incarnations):
            # One spelling per transaction: every branch's gid names the same voters.
            raise ValueError("the voters of a gid are sorted")
        check_participant_name(self.participant)

    @classmethod
    def parse(cls, gid: str) -> PaxosGid | None:
        """The PaxosGid written as ``gid``, or None when it is not one."""
        m = _GID.fullmatch(gid)
        if m is None:
            return None
        raw = m["voters"]
        incarnations = tuple(raw[i:i + 12] for i in range(0, len(raw), 12))
        try:
            return cls(m["txid"], Voters(int(m["q"]), incarnations), m["participant"])
        except ValueError:
            return None

    def __str__(self) -> str:
        v = self.voters
        return (f"{PAXOS_GID_PREFIX}{self.txid}_{v.quorum}{''.join(v.incarnations)}"
                f"_{self.participant}")

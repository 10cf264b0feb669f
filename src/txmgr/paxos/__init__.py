"""Paxos mode: commit decisions replicated over several log databases.

Gray and Lamport's Paxos Commit: the decision of each global transaction is
chosen by a majority of 2F+1 acceptors — ordinary PostgreSQL databases — so any
F of them may be down, unreachable or wiped without blocking or losing a
decision, and any proposer (a recovery process anywhere) can finish a
transaction whose coordinator died. The coordinator and recovery are
proposers, the log databases acceptors, whoever applies the outcome a learner.

- :class:`PaxosLog` — the decision log over the acceptor databases;
- :class:`PaxosGid` — the gid of a branch, naming the transaction's voters;
- the protocol and its safety argument: :mod:`txmgr.paxos._core`;
- a deterministic simulation of it: ``python -m txmgr.paxos.sim``.
"""

from txmgr.paxos._core import ABORT, Outcome, Value, Voters
from txmgr.paxos._errors import LogQuorumUnavailable
from txmgr.paxos._gid import PAXOS_GID_PREFIX, PaxosGid
from txmgr.paxos._log import AcceptorStatus, ForgetReport, PaxosLog, paxos_gid
from txmgr.paxos._round import Registration

__all__ = [
    "ABORT",
    "PAXOS_GID_PREFIX",
    "AcceptorStatus",
    "ForgetReport",
    "LogQuorumUnavailable",
    "Outcome",
    "PaxosGid",
    "PaxosLog",
    "Registration",
    "Value",
    "Voters",
    "paxos_gid",
]

"""Errors of Paxos mode: they live in :mod:`txmgr.errors`, re-exported here."""

from __future__ import annotations

from txmgr.errors import LogQuorumUnavailable

__all__ = ["LogQuorumUnavailable"]

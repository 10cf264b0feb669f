"""The gid of a prepared branch: a value object with a validating constructor.

Wire form: ``txm1_<logid>_<txid>_<lxid>_<participant>``

- ``logid``: 8 hex characters naming the decision log (stored in the log when
  its schema is created). Recovery ignores gids of other logs, so an xid is
  never looked up in the wrong cluster.
- ``txid``: 16 hex characters, random, names the global transaction.
- ``lxid``: the 64-bit xid (``xid8``) of the decision transaction in the log.
- ``participant``: the participant name, ``[a-z][a-z0-9_]{0,31}``; it may
  contain ``_``, which is why it comes last.

At most 5+9+17+21+32 = 84 bytes, well under PostgreSQL's 200-byte limit.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from txmgr.errors import InvalidParticipantName

__all__ = ["GID_PREFIX", "Gid", "check_participant_name", "log_prefix", "new_txid"]

GID_PREFIX = "txm1_"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_LOGID = re.compile(r"[0-9a-f]{8}")
_TXID = re.compile(r"[0-9a-f]{16}")
_GID = re.compile(
    r"txm1_(?P<logid>[0-9a-f]{8})_(?P<txid>[0-9a-f]{16})_(?P<lxid>[0-9]{1,20})"
    r"_(?P<participant>[a-z][a-z0-9_]{0,31})"
)


def check_participant_name(name: object) -> str:
    """Return ``name`` if it is a valid participant name, else raise InvalidParticipantName."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidParticipantName(
            f"invalid participant name {name!r}: names must match [a-z][a-z0-9_]{{0,31}} "
            "(lower-case letter first, then up to 31 lower-case letters, digits or '_'); "
            "rename it in the [participants] table or the participants= argument"
        )
    return name


def new_txid() -> str:
    """A fresh random global transaction id (16 hex characters)."""
    return secrets.token_hex(8)


def log_prefix(logid: str) -> str:
    """The prefix every gid of the log ``logid`` starts with."""
    if not _LOGID.fullmatch(logid):
        raise ValueError(f"invalid logid {logid!r}: expected 8 hex characters")
    return f"{GID_PREFIX}{logid}_"


@dataclass(frozen=True, slots=True)
class Gid:
    """The identifier of one prepared branch."""

    logid: str
    txid: str
    lxid: int
    participant: str

    def __post_init__(self) -> None:
        if not _LOGID.fullmatch(self.logid):
            raise ValueError(f"invalid logid {self.logid!r}: expected 8 hex characters")
        if not _TXID.fullmatch(self.txid):
            raise ValueError(f"invalid txid {self.txid!r}: expected 16 hex characters")
        # xid8 is an epoch and an xid; no cluster reaches 2**63 (and the log
        # compares lxids as bigint), so larger values are not ours.
        if not 0 < self.lxid < 2**63:
            raise ValueError(f"invalid lxid {self.lxid!r}: expected a 64-bit transaction id")
        check_participant_name(self.participant)

    @classmethod
    def parse(cls, gid: object) -> Gid | None:
        """The Gid written as ``gid``, or None when ``gid`` is not one of txmgr's.

        Never raises: gids come from pg_prepared_xacts and from the command line,
        where anybody may have written anything.
        """
        if not isinstance(gid, str):
            return None
        m = _GID.fullmatch(gid)
        if m is None:
            return None
        try:
            return cls(m["logid"], m["txid"], int(m["lxid"]), m["participant"])
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{GID_PREFIX}{self.logid}_{self.txid}_{self.lxid}_{self.participant}"

"""The tag that names a branch's global transaction on its server.

Each branch sets its session's ``application_name`` (``SET LOCAL``: it reverts
when the branch ends, is prepared or rolled back) in the statement that
begins the branch, so tagging costs no round trip::

    txm:<txid>:a <the application's own name>    from BEGIN up to the vote
    txm:<txid>:v <the application's own name>    from the vote to PREPARE/COMMIT

``pg_stat_activity`` then maps every backend to its global transaction, for
any role (``application_name`` is one of the columns PostgreSQL shows for
other roles' sessions too), which is what the deadlock detector
(:mod:`txmgr.deadlock`) and ``txmgr status`` read. The second form marks a
transaction that has voted: the detector never cancels it (a vote starts the
commit protocol; from then on only the decision may end the branch).

The application's own name follows the tag, so monitoring keeps seeing it
(PostgreSQL shows the first 63 bytes of the whole).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from txmgr._multiplex import AnyConnection, literal

__all__ = ["Tag", "begin_fragment", "parse", "vote_fragment"]

_PREFIX = "txm:"
# "txm:" + 16 hex + ":a " : the application's name starts after it.
_LENGTH = len(_PREFIX) + 16 + 3
_TAG = re.compile(r"txm:([0-9a-f]{16}):([av])(?: |$)")


@dataclass(frozen=True, slots=True)
class Tag:
    """What a backend's ``application_name`` says of its global transaction."""

    txid: str
    voted: bool


def parse(application_name: str | None) -> Tag | None:
    """The tag at the start of ``application_name``, or None for other sessions."""
    if not application_name:
        return None
    m = _TAG.match(application_name)
    if m is None:
        return None
    return Tag(m.group(1), m.group(2) == "v")


def active_tag(txid: str) -> str:
    """The exact prefix of a branch of ``txid`` that has not voted (to match on)."""
    return f"{_PREFIX}{txid}:a"


def begin_fragment(txid: str, conn: AnyConnection) -> bytes:
    """Select-list items (after a comma) that tag the new branch of ``txid``."""
    return (
        b"set_config('application_name', "
        + literal(f"{_PREFIX}{txid}:a ", conn)
        + b" || current_setting('application_name'), true)"
    )


def vote_fragment(txid: str, conn: AnyConnection) -> bytes:
    """Select-list items (after a comma) that mark the branch of ``txid`` as voted."""
    return (
        b"set_config('application_name', "
        + literal(f"{_PREFIX}{txid}:v ", conn)
        + b" || substr(current_setting('application_name'), "
        + str(_LENGTH + 1).encode()
        + b"), true)"
    )

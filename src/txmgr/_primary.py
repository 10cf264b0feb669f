"""The one rule for standbys: decisions are read, and prepared transactions listed or
finished, only on a primary.

A hot standby may lag behind its primary. There ``pg_xact_status`` of a decision
not replayed yet reads as not committed (recovery would roll back a branch of a
committed transaction), and ``pg_prepared_xacts`` lists nothing (recovery would
take every branch as finished and delete the decision row). A DSN can reach a
standby by mistake, or after a failover through a multi-host DSN, so the check
runs on every use, not once: every statement that reads a decision, lists
prepared transactions or takes the daemon's leadership lock (a standby grants
advisory locks too) carries :data:`IN_RECOVERY` as a column, and its caller
passes the value to :func:`require_primary` before looking at the rest of the
answer. A primary never turns into a standby under an open connection (that
takes a restart, which ends the session), so a later statement of the same
pass on the same connection is on a primary too.
"""

from __future__ import annotations

from txmgr._dsn import mask
from txmgr.errors import NotPrimary

__all__ = ["FIX", "IN_RECOVERY", "require_primary", "standby_error"]

#: The SQL expression each checked statement selects (true on a standby).
IN_RECOVERY = "pg_is_in_recovery()"

#: How to fix it, in every message.
FIX = (
    "point its DSN at the primary, or list every server of the cluster with "
    "target_session_attrs=read-write so that libpq picks the primary "
    "(host=h1,h2 port=p1,p2 target_session_attrs=read-write)"
)


def standby_error(what: str, participant: str, dsn: str) -> NotPrimary:
    """The error for ``what`` ("the decision log", "participant 'b'") on a standby."""
    return NotPrimary(
        f"{what} is a hot standby (pg_is_in_recovery() is true at {mask(dsn)}): a "
        "standby may lag behind its primary, so txmgr reads decisions and lists or "
        "finishes prepared transactions only on the primary; nothing was done there. "
        f"To fix it, {FIX}",
        participant=participant,
        dsn=mask(dsn),
    )


def require_primary(in_recovery: object, what: str, participant: str, dsn: str) -> None:
    """Raise :class:`NotPrimary` unless ``in_recovery`` (a :data:`IN_RECOVERY` value) is false."""
    if in_recovery is not False:
        raise standby_error(what, participant, dsn)

"""Deadlock verdicts: how a victim learns why its statement was cancelled.

``pg_cancel_backend`` carries no reason: the victim's statement fails with
57014 (query_canceled) like any cancel. So the detector first records the
verdict — the victim's txid, whom it waited for, the tables — in
``txmgr_deadlock_victim`` on the decision log (on every log database that
answers, in Paxos mode), commits it, and only then cancels. A coordinator
whose statement was cancelled takes (deletes) its txid's row: found, the
error is :class:`~txmgr.errors.DeadlockDetected`; not found, it was some
other cancel. A verdict whose cancel came too late to matter (the wait had
ended) is purged by the detector after :data:`KEEP_SECONDS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from txmgr.config import Config
from txmgr.participant import connect

__all__ = ["KEEP_SECONDS", "Verdict", "log_dsns", "purge", "record", "take", "take_any"]

#: Seconds a verdict nobody took is kept (a victim asks within moments).
KEEP_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """One deadlock resolution: ``txid`` was cancelled to break a cycle."""

    txid: str
    others: tuple[str, ...]  # txids, or "pid N on participant" for foreign sessions
    relations: tuple[str, ...]
    detail: str  # one line for the victim's error message


def log_dsns(config: Config) -> list[str]:
    """The databases verdicts are written to and read from (the decision log's)."""
    paxos = config.paxos_log
    return list(paxos.dsns) if paxos is not None else [config.log_dsn]


def record(conn: psycopg.Connection[Any], verdict: Verdict) -> None:
    """Store ``verdict`` (autocommit connection: committed on return)."""
    conn.execute(
        "INSERT INTO txmgr_deadlock_victim (txid, others, relations, detail) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (txid) DO UPDATE SET others = EXCLUDED.others, "
        "relations = EXCLUDED.relations, detail = EXCLUDED.detail, detected_at = now()",
        (verdict.txid, list(verdict.others), list(verdict.relations), verdict.detail),
    )


def take(conn: psycopg.Connection[Any], txid: str) -> Verdict | None:
    """Delete and return ``txid``'s verdict, if there is one."""
    row = conn.execute(
        "DELETE FROM txmgr_deadlock_victim WHERE txid = %s RETURNING others, relations, detail",
        (txid,),
    ).fetchone()
    if row is None:
        return None
    return Verdict(txid, tuple(row[0]), tuple(row[1]), row[2])


def purge(conn: psycopg.Connection[Any], keep: float = KEEP_SECONDS) -> int:
    """Delete verdicts older than ``keep`` seconds; how many."""
    cur = conn.execute(
        "DELETE FROM txmgr_deadlock_victim WHERE detected_at < now() - make_interval(secs => %s)",
        (keep,),
    )
    return cur.rowcount


def take_any(dsns: Sequence[str], txid: str, *, connect_timeout: float) -> Verdict | None:
    """``txid``'s verdict from the first of ``dsns`` that has one; raises the last
    connection error only when none answered."""
    error: Exception | None = None
    answered = False
    for dsn in dsns:
        try:
            with connect(dsn, "log", connect_timeout=connect_timeout, autocommit=True) as conn:
                verdict = take(conn, txid)
        except Exception as e:  # unreachable, or its schema is older
            error = e
            continue
        answered = True
        if verdict is not None:
            return verdict
    if not answered and error is not None:
        raise error
    return None

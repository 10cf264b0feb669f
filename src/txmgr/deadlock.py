"""Distributed deadlock detection: one wait-for graph over every participant.

Each server detects the deadlocks it can see; a cycle through two servers
(``T1`` waits for ``T2`` on ``a``, ``T2`` for ``T1`` on ``b``) is a plain wait
on each, forever. A :class:`Detector` pass:

1. reads, on every participant (in its own database, one query), the backends
   that carry a txmgr tag (:mod:`txmgr._tag`) or wait for a lock, with
   ``pg_blocking_pids`` and the tables of the locks they wait for;
2. builds one graph (:mod:`txmgr._waitgraph`) and finds its cycles and their
   victims: the youngest transaction of each cycle that has not voted;
3. records each verdict on the decision log (:mod:`txmgr._verdict`), then
   cancels the victim's waiting statement with ``pg_cancel_backend`` — only
   if that backend still carries the victim's not-voted tag and still waits,
   checked by the same statement that cancels. The victim's coordinator sees
   57014, rolls every branch back and raises
   :class:`~txmgr.errors.DeadlockDetected`; the others go on.

What a pass sees is not one snapshot: each server is read a moment apart. A
real deadlock stays put, so it is found; a cycle that only seemed to exist
(one wait ended between two reads) may cost one needless victim, which the
check-and-cancel statement makes unlikely. Nothing after a vote is ever
cancelled, so atomicity does not depend on any of this.

The daemon's active instance runs a pass every ``[deadlock] interval``
seconds; ``Detector(config).run_pass()`` can be called from anywhere else
(an application without a daemon, a test). The roles in participants' DSNs
need ``pg_signal_backend`` (or to be the role of the sessions they cancel),
and ``pg_read_all_stats`` to see when other roles' transactions began.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from txmgr import _tag, _verdict
from txmgr._connections import ConnectionCache
from txmgr._dsn import redact
from txmgr._waitgraph import Backend, Deadlock, Wait, WaitGraph
from txmgr.config import Config
from txmgr.errors import TxmgrError
from txmgr.participant import connect

__all__ = ["Detector", "DetectorReport", "Wait", "read_waits"]

logger = logging.getLogger("txmgr.deadlock")

# One row per backend of this database (not this session) that is tagged or
# waits for a lock. Granted tuple locks name the table of a row-lock wait (the
# waiter holds the tuple lock and waits on the holder's transaction id).
_BACKENDS = """
SELECT a.pid, a.application_name, a.xact_start,
       CASE WHEN w.waiting THEN pg_blocking_pids(a.pid) END,
       w.relations, extract(epoch FROM clock_timestamp() - w.since)::float8
FROM pg_stat_activity a
CROSS JOIN LATERAL (
    SELECT coalesce(bool_or(NOT l.granted), false) AS waiting,
           array_agg(DISTINCT l.relation::regclass::text) FILTER (
               WHERE l.relation IS NOT NULL AND (NOT l.granted OR l.locktype = 'tuple')
           ) AS relations,
           min({since}) FILTER (WHERE NOT l.granted) AS since
    FROM pg_locks l WHERE l.pid = a.pid
) w
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND (w.waiting OR starts_with(a.application_name, 'txm:'))
"""

# Cancel only a backend that still carries the victim's not-voted tag and
# still waits for a lock: checked and done in one statement.
_CANCEL = (
    "SELECT pg_cancel_backend(a.pid) FROM pg_stat_activity a "
    "WHERE a.pid = %s AND starts_with(a.application_name, %s) "
    "AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)"
)


def _backends_query(conn: psycopg.Connection[Any]) -> str:
    # pg_locks.waitstart appeared in PostgreSQL 14; before, the statement's start.
    since = "l.waitstart" if conn.info.server_version >= 140000 else "a.query_start"
    return _BACKENDS.format(since=since)


def read_backends(conn: psycopg.Connection[Any], participant: str) -> list[Backend]:
    """The tagged or waiting backends of ``participant``'s database."""
    rows = conn.execute(_backends_query(conn)).fetchall()
    return [
        Backend(participant, r[0], _tag.parse(r[1]), r[2], tuple(r[3] or ()),
                tuple(r[4] or ()), r[5])
        for r in rows
    ]


def read_waits(config: Config) -> tuple[list[Wait], dict[str, str]]:
    """Who waits for whom across every participant right now (for ``txmgr status``):
    the waits, and the participants that could not be read (name -> error)."""
    detector = Detector(config, application_name="txmgr-status")
    try:
        graph, errors = detector.gather()
        return graph.waits, errors
    finally:
        detector.close()


@dataclass(slots=True)
class DetectorReport:
    """What one pass found and did."""

    waits: list[Wait] = field(default_factory=list)
    deadlocks: list[Deadlock] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # txids whose statement was cancelled
    errors: dict[str, str] = field(default_factory=dict)  # participant or "log" -> error
    duration: float = 0.0


class Detector:
    """Finds and breaks wait-for cycles across the participants of ``config``.

    Keeps one autocommit connection per participant between passes. ``on_pass``
    is called with every report (the daemon's metrics).
    """

    def __init__(
        self,
        config: Config,
        *,
        application_name: str = "txmgr-deadlock",
        on_pass: Callable[[DetectorReport], None] | None = None,
    ) -> None:
        self.config = config
        self._conns = ConnectionCache(
            connect_timeout=config.connect_timeout, application_name=application_name
        )
        self._on_pass = on_pass

    def close(self) -> None:
        """Close the connections kept between passes."""
        self._conns.close()

    def gather(self) -> tuple[WaitGraph, dict[str, str]]:
        """Read every participant; build the graph of what answered."""
        backends: list[Backend] = []
        errors: dict[str, str] = {}
        for name, dsn in self.config.participants.items():
            try:
                backends += read_backends(self._conns.get(name, dsn, name), name)
            except (psycopg.Error, TxmgrError) as e:
                self._conns.drop(name)
                errors[name] = redact(str(e)).strip()
        return WaitGraph(backends), errors

    def run_pass(self) -> DetectorReport:
        """One pass: gather, find the cycles, cancel their victims."""
        t0 = time.monotonic()
        graph, errors = self.gather()
        report = DetectorReport(waits=graph.waits, errors=errors)
        report.deadlocks = graph.deadlocks()
        for dl in report.deadlocks:
            if dl.victim is None:
                logger.info("a wait-for cycle through %s has no transaction that may be "
                            "cancelled (all voted, or not txmgr's)", ", ".join(dl.members))
                continue
            if self._break(dl, report):
                report.cancelled.append(dl.victim)
        report.duration = time.monotonic() - t0
        if self._on_pass is not None:
            self._on_pass(report)
        return report

    def _break(self, dl: Deadlock, report: DetectorReport) -> bool:
        assert dl.victim is not None
        detail = _describe(dl)
        verdict = _verdict.Verdict(dl.victim, dl.others, dl.relations, detail)
        recorded = self._record(verdict, report)
        cancelled = False
        for w in dl.waits:
            try:
                conn = self._conns.get(w.participant, self.config.participants[w.participant],
                                       w.participant)
                row = conn.execute(_CANCEL, (w.pid, _tag.active_tag(dl.victim))).fetchone()
            except (psycopg.Error, TxmgrError) as e:
                self._conns.drop(w.participant)
                report.errors[w.participant] = _cancel_hint(e)
                continue
            cancelled = cancelled or bool(row and row[0])
        if cancelled:
            logger.warning("deadlock: cancelled transaction %s (%s)", dl.victim, detail,
                           extra={"event": "deadlock", "txid": dl.victim})
        elif recorded:  # its wait ended meanwhile: nobody will take the verdict
            self._forget(dl.victim)
        return cancelled

    def _record(self, verdict: _verdict.Verdict, report: DetectorReport) -> bool:
        """Store the verdict on every log database that answers (before cancelling)."""
        ok = False
        for dsn in _verdict.log_dsns(self.config):
            try:
                with connect(dsn, "log", connect_timeout=self.config.connect_timeout,
                             autocommit=True) as conn:
                    _verdict.purge(conn)
                    _verdict.record(conn, verdict)
                ok = True
            except (psycopg.Error, TxmgrError) as e:
                report.errors["log"] = redact(str(e)).strip()
        if not ok:
            # Breaking the cycle matters more: the victim then sees a plain cancel.
            logger.warning("could not record the deadlock verdict on %s in the log: %s",
                           verdict.txid, report.errors.get("log"))
        return ok

    def _forget(self, txid: str) -> None:
        for dsn in _verdict.log_dsns(self.config):
            try:
                with connect(dsn, "log", connect_timeout=self.config.connect_timeout,
                             autocommit=True) as conn:
                    _verdict.take(conn, txid)
            except (psycopg.Error, TxmgrError):
                pass  # purged later


def _describe(dl: Deadlock) -> str:
    waits = "; ".join(
        f"on {w.participant} it waited for {w.holder.removeprefix('tx ')}"
        + (f" ({', '.join(w.relations)})" if w.relations else "")
        for w in dl.waits
    )
    return (f"a wait-for cycle among {', '.join(dl.members)} over the tables "
            f"{', '.join(dl.relations) or '(unknown)'}; {waits}")


def _cancel_hint(e: Exception) -> str:
    text = redact(str(e)).strip()
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return (f"{text} (the deadlock detector's role may not cancel that session: "
                "GRANT pg_signal_backend TO it, or use the sessions' own role)")
    return text

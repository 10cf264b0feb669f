"""Recovery: finish the prepared branches that no coordinator is finishing.

One pass:

1. Read the decision rows of the log (before listing any branch: a row seen
   here was committed after all its branches were prepared, so a branch of it
   missing from a later listing is finished).
2. On every participant, in its own database, list the prepared gids of this
   log (``txm1_<logid>_``); ignore everything else.
3. Ask the log ``pg_xact_status(lxid)`` for every gid's decision transaction
   ``L``: in progress → leave the branch, a coordinator is inside the protocol.
4. For the others ``L`` is over; read their decision rows in a later
   statement: row present → ``COMMIT PREPARED``, absent → ``ROLLBACK PREPARED``.
   (The row, not the xid's status, decides: after a crash of the log server
   an xid that never reached its WAL can be reused by another transaction.)
5. Delete decision rows whose branches are gone from every participant.

Every step is idempotent, so concurrent passes, or a pass racing a live
coordinator, never do harm. No clock and no timeout decides anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg

from txmgr import log as decision_log
from txmgr._connections import LOG_KEY, ConnectionCache
from txmgr._dsn import redact
from txmgr._gid import Gid, log_prefix
from txmgr.config import Config
from txmgr.errors import TxmgrError
from txmgr.participant import PreparedBranch, finish_prepared, list_prepared

__all__ = ["Recoverer", "RecoveryReport", "Resolution", "recover"]

logger = logging.getLogger("txmgr.recovery")

Outcome = Literal["committed", "rolled back", "in progress", "already finished", "busy", "error"]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What recovery did with one prepared branch."""

    participant: str
    gid: str
    txid: str
    outcome: Outcome
    prepared_at: datetime
    detail: str = ""


@dataclass(slots=True)
class RecoveryReport:
    """The result of one recovery pass."""

    resolutions: list[Resolution] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # participants that did not answer
    decisions_deleted: int = 0
    decisions_pending: int = 0
    log_reachable: bool = True

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.resolutions if r.outcome == outcome)

    @property
    def committed(self) -> int:
        return self.count("committed")

    @property
    def rolled_back(self) -> int:
        return self.count("rolled back")

    @property
    def in_progress(self) -> int:
        return self.count("in progress") + self.count("busy")

    @property
    def ok(self) -> bool:
        """True when every decidable branch was resolved and every server answered."""
        return not self.errors

    def summary(self) -> str:
        return (
            f"committed={self.committed} rolled_back={self.rolled_back} "
            f"in_progress={self.in_progress} already_finished={self.count('already finished')} "
            f"errors={len(self.errors)} decisions_deleted={self.decisions_deleted}"
        )


def recover(config: Config, **kwargs: Any) -> RecoveryReport:
    """Run one recovery pass over every participant of ``config``."""
    recoverer = Recoverer(config, **kwargs)
    try:
        return recoverer.run_pass()
    finally:
        recoverer.close()


class Recoverer:
    """Runs recovery passes, keeping its connections between passes (for the daemon).

    ``on_resolution`` is called for every branch committed or rolled back.
    """

    def __init__(
        self,
        config: Config,
        *,
        on_resolution: Callable[[Resolution], None] | None = None,
    ) -> None:
        self.config = config
        self._on_resolution = on_resolution
        self._conns = ConnectionCache(connect_timeout=config.connect_timeout)

    def close(self) -> None:
        self._conns.close()

    def _conn(self, key: str, dsn: str) -> psycopg.Connection[Any]:
        name = (self.config.log_participant or "log") if key == LOG_KEY else key
        return self._conns.get(key, dsn, name)

    def _drop(self, key: str) -> None:
        self._conns.drop(key)

    def log_connection(self) -> psycopg.Connection[Any]:
        return self._conn(LOG_KEY, self.config.log_dsn)

    def run_pass(self) -> RecoveryReport:
        report = RecoveryReport()
        try:
            lconn = self.log_connection()
            logid = decision_log.read_logid(lconn, self.config.log_dsn)
            rows = {r.txid: r for r in decision_log.decision_rows(lconn)}
        except (psycopg.Error, TxmgrError) as e:
            self._drop(LOG_KEY)
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
            return report
        prefix = log_prefix(logid)
        listed: dict[str, list[PreparedBranch]] = {}
        for name, dsn in self.config.participants.items():
            try:
                listed[name] = list_prepared(self._conn(name, dsn), prefix)
            except (psycopg.Error, TxmgrError) as e:
                self._drop(name)
                report.unreachable.append(name)
                report.errors.append(f"{name}: {redact(str(e))}")
        gids = {b.gid: Gid.parse(b.gid) for branches in listed.values() for b in branches}
        ours = [g for g in gids.values() if g is not None]
        try:
            statuses, committed = decision_log.read_decisions(
                lconn, [(g.lxid, g.txid) for g in ours]
            )
        except psycopg.Error as e:
            self._drop(LOG_KEY)
            report.log_reachable = False
            report.errors.append(f"log: {redact(str(e))}")
            return report
        remaining: set[str] = set()  # txids with a branch still prepared somewhere
        for name, branches in listed.items():
            for branch in branches:
                gid = gids[branch.gid]
                if gid is None:  # our prefix but not our format: not ours to touch
                    continue
                if statuses.get(gid.lxid) == "in progress":
                    res = Resolution(name, branch.gid, gid.txid, "in progress", branch.prepared,
                                     "its coordinator is inside the commit protocol")
                else:
                    res = self._finish(name, branch, gid, commit=gid.txid in committed)
                report.resolutions.append(res)
                if res.outcome == "error":
                    report.errors.append(f"{name}: {res.gid}: {res.detail}")
                if res.outcome in ("in progress", "busy", "error"):
                    remaining.add(gid.txid)
                elif res.outcome in ("committed", "rolled back") and self._on_resolution:
                    self._on_resolution(res)
        self._cleanup(lconn, rows, listed, remaining, report)
        return report

    def _finish(self, name: str, branch: PreparedBranch, gid: Gid, *, commit: bool) -> Resolution:
        def result(outcome: Outcome, detail: str = "") -> Resolution:
            return Resolution(name, branch.gid, gid.txid, outcome, branch.prepared, detail)

        try:
            conn = self._conn(name, self.config.participants[name])
            done = finish_prepared(conn, branch.gid, commit=commit)
        except psycopg.errors.InsufficientPrivilege as e:
            return result(
                "error",
                f"{e}: connect recovery as the role that prepared it ({branch.owner}) "
                "or a superuser",
            )
        except (psycopg.Error, TxmgrError) as e:  # lost connection: reconnect next branch
            self._drop(name)
            return result("error", redact(str(e)))
        if done == "missing":
            return result("already finished")
        if done == "busy":
            return result("busy", "another session is finishing it")
        outcome: Outcome = "committed" if commit else "rolled back"
        logger.info(
            "resolved txid=%s gid=%s participant=%s outcome=%s",
            gid.txid, branch.gid, name, outcome,
            extra={"txid": gid.txid, "gid": branch.gid, "participant": name, "outcome": outcome},
        )
        return result(outcome)

    def _cleanup(
        self,
        lconn: psycopg.Connection[Any],
        rows: dict[str, decision_log.DecisionRow],
        listed: dict[str, list[PreparedBranch]],
        remaining: set[str],
        report: RecoveryReport,
    ) -> None:
        """Delete rows whose branches are finished on every participant they name."""
        finished = [
            txid
            for txid, row in rows.items()
            if txid not in remaining and all(p in listed for p in row.participants)
        ]
        try:
            report.decisions_deleted = decision_log.delete_decisions(lconn, finished)
        except psycopg.Error as e:
            self._drop(LOG_KEY)
            report.errors.append(f"log: could not delete finished decisions: {redact(str(e))}")
        report.decisions_pending = len(rows) - report.decisions_deleted

"""The nemesis's faults on the three log databases of Paxos mode.

A majority of the log databases decides each transaction, so the nemesis
never takes more than two of the three down at once (:class:`LogOutages`
keeps count) and brings every one back before the final check. What counts
as down: a server stopped, a database cut off at its proxy, or being wiped.

- ``restart_log``: crash one log server (``pg_ctl stop -m immediate``), keep
  it down a moment, start it again (as in the other modes, on one of three).
- ``stop_log``: crash one log server and leave it down for a while *in the
  background* (2.6 to 9.5 s) while the nemesis goes on with other faults —
  participant crashes, kills, another log database down (two at most) —
  then start it again.
- ``isolate_log``: one log database unreachable through its proxy for a
  while: every connection cut, then every statement swallowed (a partition:
  the sessions hang) or refused (each connection cut at its first
  statement).
- ``wipe_log``: drop one log database and create it empty again, migrated:
  a new incarnation, none of its rows restored. See :meth:`PaxosFaults.wipe_log`
  for why the clients are frozen until no transaction slot is left.
- ``two_logs_down``: two log databases down at once (both crashed, one
  crashed and one cut off, or both cut off): commits must end with
  ``TransactionAborted`` (nothing was prepared: fewer than a majority
  registered) or ``OutcomeUnknown``, never anything half done. Then one
  returns, and the run waits (a while at most) until recovery has finished
  every in-doubt transaction that a majority of its voters can now decide;
  then the other returns.
- ``drop_log_commit``: lose the next phase-2 (accept) statement through one
  log database's proxy — before it runs, after, or after its reply.
- ``log_outage``: lose the accept statements of two log databases for a
  while (before or after they run them): a coordinator cannot learn whether
  its commit was chosen and must say ``OutcomeUnknown``; recovery finishes it
  once they answer again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import psycopg

from txmgr.testing.proxy import Rule
from txmgr.torture._logdbs import LogDatabase, in_doubt
from txmgr.torture._procs import ProcessGroup
from txmgr.torture._rules import (
    ACCEPT_PATTERN,
    ANY_STATEMENT,
    DROP_ACTIONS,
    wait_for_hit,
)

if TYPE_CHECKING:
    from txmgr.torture._nemesis import Fault

__all__ = ["MAX_DOWN", "LogOutages", "PaxosFaults"]

#: At most this many of the three log databases down at once.
MAX_DOWN = 2

Why = Literal["stopped", "isolated", "wiping"]


class LogOutages:
    """Which log databases are down, why, and until when (``stop_log``)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.down: dict[int, Why] = {}
        self.due: dict[int, float] = {}  # stopped in the background: monotonic restart time

    def choose(self, f: Fault, want: int) -> list[int] | None:
        """``want`` log databases that are up, from the fault's draw on; None when
        taking them down too would put more than :data:`MAX_DOWN` down."""
        if len(self.down) + want > MAX_DOWN:
            return None
        start = f.target % self.count
        ring = [(start + k) % self.count for k in range(self.count)]
        up = [i for i in ring if i not in self.down]
        return up[:want] if len(up) >= want else None


class PaxosFaults:
    """Injects the faults of the module docstring; every method returns
    ``(effective, detail)`` like the nemesis's own."""

    def __init__(
        self,
        logs: Sequence[LogDatabase],
        clients: ProcessGroup,
        participant_dsns: Sequence[str],
        stop: threading.Event,
        probe_cli: Callable[[], None],
        grace: float,
    ) -> None:
        self.logs = list(logs)
        self.clients = clients
        self.participant_dsns = list(participant_dsns)
        self.stop = stop
        self.probe_cli = probe_cli
        self.grace = grace  # the daemons' paxos grace: they decide in-doubt ones after it
        self.outages = LogOutages(len(self.logs))
        self.observations: Counter[str] = Counter()  # what two_logs_down saw, for the report
        self._isolation: dict[int, Rule] = {}

    # -- bookkeeping ------------------------------------------------------------------

    def up_proxies(self) -> set[int]:
        """ids of the log proxies whose database is up (a rule there can fire)."""
        return {id(db.proxy) for db in self.logs if db.index not in self.outages.down}

    def restore_due(self) -> list[str]:
        """Start the servers ``stop_log`` stopped whose time is up; what was done."""
        now = time.monotonic()
        done = []
        for i, due in sorted(self.outages.due.items()):
            if due <= now:
                self._bring_back(i)
                done.append(f"log {i} started again")
        return done

    def restore_all(self) -> None:
        """Bring back everything this module took down (``heal``)."""
        for i in sorted(self.outages.down):
            self._bring_back(i)
        self.clients.thaw()

    def _take_down(self, i: int, why: Why, blackhole: bool = True) -> None:
        db = self.logs[i]
        self.outages.down[i] = why
        if why == "stopped":
            db.server.crash()
        else:
            # Statements swallowed (the sessions hang, as behind a partition) or
            # refused (each connection cut at its first statement).
            self._isolation[i] = db.proxy.add_rule(
                ANY_STATEMENT, "blackhole" if blackhole else "drop_before", times=None)
            db.proxy.drop_all()

    def _bring_back(self, i: int) -> None:
        db = self.logs[i]
        why = self.outages.down.pop(i, None)
        self.outages.due.pop(i, None)
        rule = self._isolation.pop(i, None)
        if rule is not None:
            db.proxy.remove_rule(rule)
            db.proxy.drop_all()  # ends the blackholed sessions
        if why == "stopped" or not db.server.is_running():
            db.server.restart()

    def _restore_background(self) -> None:
        """Start a server ``stop_log`` left down now, ahead of time (for the faults
        that need every log database up, or two of their own down)."""
        for i in sorted(self.outages.due):
            self._bring_back(i)

    # -- the faults -----------------------------------------------------------------

    def restart_log(self, f: Fault) -> tuple[bool, str]:
        chosen = self.outages.choose(f, 1)
        if chosen is None:
            return False, "no log database may go down now"
        i = chosen[0]
        self._take_down(i, "stopped")
        try:
            if f.variant % 2 == 0:
                self.probe_cli()
            self.stop.wait(f.seconds)
        finally:
            self._bring_back(i)
        return True, f"log {i}"

    def stop_log(self, f: Fault) -> tuple[bool, str]:
        chosen = self.outages.choose(f, 1)
        if chosen is None:
            return False, "no log database may go down now"
        i = chosen[0]
        down_for = round(2.0 + 3.0 * f.seconds, 2)
        self._take_down(i, "stopped")
        self.outages.due[i] = time.monotonic() + down_for
        return True, f"log {i} down for about {down_for:g}s, in the background"

    def isolate_log(self, f: Fault) -> tuple[bool, str]:
        chosen = self.outages.choose(f, 1)
        if chosen is None:
            return False, "no log database may go down now"
        i = chosen[0]
        blackhole = f.variant % 2 == 0
        had = self.logs[i].proxy.connections
        self._take_down(i, "isolated", blackhole=blackhole)
        rule = self._isolation[i]
        hold = round(1.0 + f.seconds, 2)
        try:
            self.stop.wait(hold)
        finally:
            hits = rule.hits
            self._bring_back(i)
        how = "statements swallowed" if blackhole else "connections refused"
        return hits > 0 or had > 0, f"log {i} cut off ({how}) for {hold:g}s, {hits} statements"

    def drop_accept(self, f: Fault) -> tuple[bool, str]:
        up = [i for i in range(len(self.logs)) if i not in self.outages.down]
        if not up:
            return False, "no log database is up"
        i = up[f.target % len(up)]
        action = DROP_ACTIONS[f.variant % len(DROP_ACTIONS)]
        proxy = self.logs[i].proxy
        rule = proxy.add_rule(ACCEPT_PATTERN, action, times=1)
        try:
            hit = wait_for_hit([rule], self.stop)
        finally:
            proxy.remove_rule(rule)
        return hit, f"log {i} accept {action}"

    def lose_decisions(self, f: Fault) -> tuple[bool, str]:
        # Two log databases lose their accepts: one already down counts as one.
        want = max(0, 2 - len(self.outages.down))
        up = [i for i in range(len(self.logs)) if i not in self.outages.down]
        start = f.target % len(up) if up else 0
        targets = (up[start:] + up[:start])[:want]
        if not targets:
            return False, "two log databases are down already"
        action = DROP_ACTIONS[f.variant % 2]  # before or after the acceptor ran it
        rules = [(self.logs[i].proxy, self.logs[i].proxy.add_rule(ACCEPT_PATTERN, action,
                                                                  times=None))
                 for i in targets]
        hold = round(1.0 + f.seconds, 2)
        try:
            hit = wait_for_hit([r for _, r in rules], self.stop)
            if hit:
                self.stop.wait(hold)
        finally:
            for proxy, rule in rules:
                proxy.remove_rule(rule)
        also = f" (log {sorted(self.outages.down)} down)" if self.outages.down else ""
        return hit, f"logs {targets} lose accepts {action} for {hold:g}s{also}"

    def wipe_log(self, f: Fault) -> tuple[bool, str]:
        """Drop one log database and create it empty again (a new incarnation).

        Paxos survives losing one acceptor's state for a transaction with three
        voters, not for one whose gids name only two (registered while a log
        database was slow or down): its quorum is both, and losing either
        strands it for good (tests/test_paxos_torture_findings.py). Nor for one
        that lost its slot on another voter already (deleted as unused while
        its coordinator stalled: deleted counts as a lost voter, wiped as a
        silent one). So the wipe waits, with the clients frozen (SIGSTOP), until
        the daemons have finished or forgotten every transaction — no slot left
        on any log database — cuts the victim off at its proxy, checks again,
        and only then drops it. (A frozen coordinator's transactions are
        decided once its liveness lock ends, after the clients' beacon_timeout,
        which the torture sets to the log idle timeout.) The frozen coordinators wake up to a log
        database with a new incarnation, their transactions decided by recovery.
        """
        self._restore_background()
        chosen = self.outages.choose(f, 1)
        if chosen is None:
            return False, "no log database may go down now"
        i = chosen[0]
        db = self.logs[i]
        old = db.incarnation()
        frozen = self.clients.freeze()

        def slots() -> int:
            return sum(d.slot_count() for d in self.logs)

        try:
            # The daemons' grace, a few passes, and reconnecting to a log
            # database that was down a moment ago (its pool backs off).
            patience = 3 * self.grace + 25.0
            if not self._wait(lambda: slots() == 0, patience):
                return False, f"slots left after {patience:g}s: log {i} not wiped"
            self._take_down(i, "wiping", blackhole=False)
            try:
                db.terminate_sessions()
                left = slots()  # nobody can write now: frozen clients, no slot to decide
                if left:
                    return False, f"{left} slots appeared: log {i} not wiped"
                db.recreate()
            finally:
                self._bring_back(i)
        finally:
            self.clients.thaw()
        new = db.incarnation()
        if new == old:
            raise RuntimeError(f"log {i} kept its incarnation {old} through the wipe")
        return True, f"log {i} incarnation {old} -> {new} ({frozen} clients frozen)"

    def two_logs_down(self, f: Fault) -> tuple[bool, str]:
        self._restore_background()
        pair = self.outages.choose(f, 2)
        if pair is None:
            return False, "two log databases may not go down now"
        how = ("crashed", "crashed+cut off", "cut off")[f.variant % 3]
        for k, i in enumerate(pair):
            stopped = how == "crashed" or (how == "crashed+cut off" and k == 0)
            self._take_down(i, "stopped" if stopped else "isolated", blackhole=k == 0)
        hold = round(1.5 + f.seconds, 2)
        try:
            if f.variant % 2 == 0:
                self.probe_cli()  # `txmgr status` without a majority: scanned output
            self.stop.wait(hold)
            self._bring_back(pair[0])
            seen = self._finish_in_doubt(missing=pair[1])
        finally:
            for i in pair:
                if i in self.outages.down:
                    self._bring_back(i)
        return True, f"logs {pair} {how} for {hold:g}s; then log {pair[0]} back: {seen}"

    def _finish_in_doubt(self, missing: int) -> str:
        """With log ``missing`` still down: wait (a while at most) until recovery has
        finished every in-doubt transaction a majority of its voters can decide."""
        try:
            up = {self.logs[i].incarnation() for i in range(len(self.logs))
                  if i not in self.outages.down}
            found = in_doubt(self.participant_dsns)
        except psycopg.Error as e:
            return f"could not look: {type(e).__name__}"
        decidable = {t for t, gid in found.items()
                     if len(up & set(gid.voters.incarnations)) >= gid.voters.quorum}
        left = set(decidable)

        def finished() -> bool:
            left.intersection_update(in_doubt(self.participant_dsns))
            return not left

        self._wait(finished, 2 * self.grace + 10.0)
        self.observations["in doubt when one log database came back"] += len(found)
        self.observations["... of which finished before the other came back"] += \
            len(decidable) - len(left)
        self.observations["... of which waited for the other (voters)"] += \
            len(found) - len(decidable)
        return (f"{len(found)} in doubt, {len(decidable) - len(left)} of {len(decidable)} "
                f"decidable finished, {len(found) - len(decidable)} waited for log {missing}")

    def _wait(self, done: Callable[[], bool], patience: float) -> bool:
        deadline = time.monotonic() + patience
        while True:
            try:
                if done():
                    return True
            except psycopg.Error:
                pass  # a server the nemesis restarted is not up yet
            if time.monotonic() >= deadline or self.stop.wait(0.25):
                return False

"""The recovery daemon: a recovery pass every ``interval`` seconds, one active daemon per log.

Each step of the loop:

1. keep or take the leadership lock on the log database (:mod:`txmgr._leader`);
   a daemon that cannot get it is a standby and tries again next step. In
   Paxos mode the lock is taken on the first log database that answers, in
   the configured order: leadership only saves duplicate work there, as
   recovery is safe with several proposers;
2. the active daemon runs one :class:`~txmgr.recovery.Recoverer` pass (it keeps
   its connections between passes; a participant that is down is reported and
   skipped, the others are recovered);
3. with metrics served, a :class:`~txmgr.status.Inspector` look sets the
   in-doubt gauges (what is left prepared after the pass).

Beside the loop, while this daemon is active, a thread runs a
:class:`~txmgr.deadlock.Detector` pass every ``[deadlock] interval`` seconds
(default 1): cycles of waits across participants are broken within about
two intervals, whatever the recovery interval.

Steps start ``interval * uniform(0.8, 1.0)`` apart, so several daemons drift
apart and a standby tries within one interval of the active daemon's death.
While the log is unreachable, retries back off exponentially from
:data:`BACKOFF_START` up to the interval.

The clock, the wait and the jitter are injectable (the tenacity habit), so
tests drive the loop without sleeping; :attr:`Daemon.stop` is a
``threading.Event`` that ends :meth:`Daemon.run` after the current step —
the command line sets it from SIGTERM and SIGINT.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from txmgr._dsn import mask
from txmgr._leader import LeaderLock, LeaderState
from txmgr.config import Config
from txmgr.deadlock import Detector, DetectorReport
from txmgr.metrics import DaemonMetrics, MetricsServer
from txmgr.recovery import Recoverer, RecoveryReport, Resolution
from txmgr.status import Inspector, StatusReport

__all__ = ["BACKOFF_START", "Daemon", "Step"]

logger = logging.getLogger("txmgr.daemon")

#: First retry delay, seconds, after the decision log could not be reached.
BACKOFF_START = 0.5
#: Steps start between these fractions of the interval apart.
JITTER = (0.8, 1.0)


class _Recoverer(Protocol):
    def run_pass(self) -> RecoveryReport: ...
    def close(self) -> None: ...


class _Leader(Protocol):
    logid: str | None
    last_error: str | None
    acquisitions: int  # times the lock was taken

    def ensure(self) -> LeaderState: ...
    def release(self) -> None: ...


class _Detector(Protocol):
    def run_pass(self) -> DetectorReport: ...
    def close(self) -> None: ...


class _Inspector(Protocol):
    def inspect(self) -> StatusReport: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of the loop did."""

    state: LeaderState
    report: RecoveryReport | None  # None unless this daemon was active
    status: StatusReport | None  # None unless metrics are served
    duration: float


class Daemon:
    """Runs recovery on an interval; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        interval: float | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        jitter: Callable[[float, float], float] = random.uniform,
        metrics: DaemonMetrics | None = None,
        recoverer: _Recoverer | None = None,
        leader: _Leader | None = None,
        inspector: _Inspector | None = None,
        detector: _Detector | None = None,
    ) -> None:
        self.config = config
        self.interval = float(interval if interval is not None else config.recovery_interval)
        if not self.interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self.stop = stop if stop is not None else threading.Event()
        self._clock = clock
        #: ``wait(seconds) -> True to stop``; by default waits on :attr:`stop`.
        self._wait = wait if wait is not None else self.stop.wait
        self._jitter = jitter
        self.metrics = metrics or DaemonMetrics(config.participants)
        self.identity = f"txmgr-daemon {os.getpid()}@{socket.gethostname()}"[:63]
        self._recoverer = recoverer or Recoverer(config, on_resolution=self.on_resolution)
        paxos = config.paxos_log
        self._leader = leader or LeaderLock(
            paxos.dsns if paxos is not None else config.log_dsn,
            name=config.log_participant or "log",
            connect_timeout=config.connect_timeout,
            application_name=self.identity,
            dead_peer_after=max(3 * self.interval, 10.0),
        )
        self._inspector = inspector
        # An injected recoverer means a test drives the loop with fakes: no
        # deadlock detector then, unless it is given one too.
        self._detector = detector if detector is not None or recoverer is not None else Detector(
            config, application_name=f"txmgr-deadlock {os.getpid()}@{socket.gethostname()}"[:63]
        )
        self._detector_stop = threading.Event()
        self._detector_thread: threading.Thread | None = None
        self._server: MetricsServer | None = None
        self._state: LeaderState | None = None  # of the previous step
        self._acquisitions = 0  # the leader's count when we last became active
        self._failures = 0  # consecutive steps that could not reach the log
        self._last_log_ok: float | None = None  # clock() of the last good log contact
        self._log_error: str | None = "no recovery pass has run yet"

    # -- public -----------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this daemon held the recovery lock at its last step."""
        return self._state == "active"

    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve /metrics and /healthz (port 0: any free port, see ``.port``)."""
        if self._inspector is None:
            # Not the lock session's name: that one alone tells which daemon is active.
            status_name = f"txmgr-status {os.getpid()}@{socket.gethostname()}"[:63]
            self._inspector = Inspector(self.config, application_name=status_name)
        self._server = MetricsServer(
            self.metrics.registry, self.health, host=host, port=port
        ).start()
        return self._server

    def run(self) -> None:
        """Step until :attr:`stop` is set; the step in progress is finished first."""
        logger.info(
            "txmgr daemon started: log=%s participants=%s interval=%gs",
            _describe_log(self.config), sorted(self.config.participants), self.interval,
            extra={"event": "started", "pid": os.getpid()},
        )  # fmt: skip
        if self._detector is not None:
            self._detector_thread = threading.Thread(
                target=self._detect, name="txmgr-deadlock-detector", daemon=True
            )
            self._detector_thread.start()
        try:
            while not self.stop.is_set():
                started = self._clock()
                try:
                    self.step()
                except Exception:
                    # A bug or an unforeseen error must not end recovery for
                    # good: report it, back off, try again.
                    self._failures += 1
                    self.metrics.errors.labels("daemon").inc()
                    logger.exception("unexpected error in a daemon step; retrying",
                                     extra={"event": "error", "source": "daemon"})
                if self.stop.is_set():
                    break
                try:
                    delay = max(0.0, started + self.next_delay() - self._clock())
                except Exception:  # never let the loop itself die
                    logger.exception("could not compute the next delay; using the interval")
                    delay = self.interval
                if self._wait(delay):
                    break
        finally:
            self.close()
            logger.info("txmgr daemon stopped", extra={"event": "stopped"})

    def step(self) -> Step:
        """One step: leadership, a recovery pass when active, metrics."""
        t0 = self._clock()
        state = self._leader.ensure()
        self._transition(state)
        report: RecoveryReport | None = None
        if state == "unreachable":
            self._log_failed(self._leader.last_error or "unreachable")
        else:
            self._log_ok()
            if state == "active":
                report = self._run_pass()
        status = self._inspect()
        return Step(state, report, status, self._clock() - t0)

    def next_delay(self) -> float:
        """Seconds from the start of one step to the next: interval or backoff, jittered."""
        base = self._backoff() if self._failures else self.interval
        return base * self._jitter(*JITTER)

    def _backoff(self) -> float:
        # The exponent is capped: a log down for hours must not overflow the float.
        return min(self.interval, BACKOFF_START * 2.0 ** min(self._failures - 1, 40))

    def health(self) -> tuple[bool, str]:
        """For /healthz: healthy while the last contact with the log succeeded recently."""
        if self._log_error is not None:
            return False, f"decision log unreachable: {self._log_error}"
        stale_after = 3 * self.interval + 3 * self.config.connect_timeout
        if self._last_log_ok is None or self._clock() - self._last_log_ok > stale_after:
            return False, f"no contact with the decision log for more than {stale_after:g}s"
        return True, f"ok {'active' if self.active else 'standby'}"

    def on_resolution(self, res: Resolution) -> None:
        """Called by the recoverer for each branch it committed or rolled back."""
        outcome = "committed" if res.outcome == "committed" else "rolled_back"
        self.metrics.resolved.labels(res.participant, outcome).inc()

    def detect_pass(self) -> DetectorReport | None:
        """One deadlock detector pass if this daemon is active (else None)."""
        if self._detector is None or not self.active:
            return None
        report = self._detector.run_pass()
        self.metrics.record_detector(report)
        for source in report.errors:
            self.metrics.errors.labels(source).inc()
        return report

    def _detect(self) -> None:
        while not self._detector_stop.is_set():
            try:
                self.detect_pass()
            except Exception:  # never let detection die; report and go on
                self.metrics.errors.labels("deadlock").inc()
                logger.exception("unexpected error in a deadlock detector pass",
                                 extra={"event": "error", "source": "deadlock"})
            if self._detector_stop.wait(self.config.deadlock_interval):
                return

    def close(self) -> None:
        """Release the lock and close every connection and the metrics server."""
        self._detector_stop.set()
        if self._detector_thread is not None:
            self._detector_thread.join()
            self._detector_thread = None
        if self._detector is not None:
            self._detector.close()
        self._leader.release()
        self._recoverer.close()
        if self._inspector is not None:
            self._inspector.close()
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.metrics.active.set(0)
        self._state = None

    # -- internals --------------------------------------------------------------

    def _transition(self, state: LeaderState) -> None:
        before, self._state = self._state, state
        self.metrics.active.set(1 if state == "active" else 0)
        logid = self._leader.logid
        retaken = state == "active" and self._leader.acquisitions != self._acquisitions
        if before == "active" and (state != "active" or retaken):
            # Our recovery connections may be as dead as the lock's: start afresh.
            self._recoverer.close()
            if state != "active":
                logger.warning(
                    "no longer active (lost the recovery lock of log %s)", logid,
                    extra={"event": "lost_leadership", "logid": logid},
                )  # fmt: skip
        if retaken:
            self._acquisitions = self._leader.acquisitions
            logger.info(
                "active: this daemon holds the recovery lock of log %s", logid,
                extra={"event": "active", "logid": logid},
            )  # fmt: skip
        if state == before:
            return
        if state == "standby":
            logger.info(
                "standby: another daemon holds the recovery lock of log %s; trying again "
                "every %gs", logid, self.interval,
                extra={"event": "standby", "logid": logid},
            )  # fmt: skip

    def _run_pass(self) -> RecoveryReport:
        t0 = self._clock()
        report = self._recoverer.run_pass()
        duration = self._clock() - t0
        self.metrics.passes.inc()
        self.metrics.pass_duration.observe(duration)
        if not report.log_reachable:  # counted among report.errors below
            self._log_failed("; ".join(report.errors) or "unreachable", count=False)
        for name in self.config.participants:
            self.metrics.participant_up.labels(name).set(0 if name in report.unreachable else 1)
        if report.log_reachable:
            self.metrics.decision_rows.set(report.decisions_pending)
        for err in report.errors:
            source = err.split(":", 1)[0]
            self.metrics.errors.labels(source).inc()
            if source in report.unreachable:
                logger.warning(
                    "participant %s is unreachable; its branches wait for the next pass: %s",
                    source, err.split(":", 1)[1].strip(),
                    extra={"event": "unreachable", "participant": source},
                )  # fmt: skip
            else:
                logger.error("recovery error: %s", err, extra={"event": "error", "source": source})
        busy = report.committed or report.rolled_back or report.decisions_deleted
        logger.log(
            logging.INFO if busy or report.errors else logging.DEBUG,
            "pass done in %.3fs: %s", duration, report.summary(),
            extra={"event": "pass", "duration": round(duration, 6)},
        )  # fmt: skip
        return report

    def _inspect(self) -> StatusReport | None:
        if self._inspector is None:
            return None
        status = self._inspector.inspect()
        self.metrics.record_status(status)
        return status

    def _log_ok(self) -> None:
        if self._failures:
            logger.info("the decision log is reachable again", extra={"event": "log_reachable"})
        self._failures = 0
        self._last_log_ok = self._clock()
        self._log_error = None
        self.metrics.log_up.set(1)

    def _log_failed(self, error: str, *, count: bool = True) -> None:
        self._failures += 1
        self._log_error = error
        self.metrics.log_up.set(0)
        if count:
            self.metrics.errors.labels("log").inc()
        logger.warning(
            "cannot reach the decision log (attempt %d; next in about %.1fs): %s",
            self._failures, self._backoff(), error,
            extra={"event": "log_unreachable", "attempt": self._failures},
        )  # fmt: skip


def _describe_log(config: Config) -> str:
    """The decision log for the start line, passwords masked."""
    paxos = config.paxos_log
    if paxos is None:
        return mask(config.log_dsn)
    return f"paxos[{', '.join(mask(d) for d in paxos.dsns)}] (recovery lock on the first " \
        "that answers)"

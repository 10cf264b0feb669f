"""Prometheus metrics of the recovery daemon, and the HTTP server that exposes them.

Every daemon has a registry of its own (not prometheus_client's global one),
so that several daemons — in tests, or embedded in one process — never mix
their numbers. Served paths:

- ``/metrics``: the Prometheus text format;
- ``/healthz``: 200 while the daemon reaches the decision log, 503 otherwise.

Metric names (all prefixed ``txmgr_``):

========================================  =====================================================
``in_doubt_branches{participant,decision}``  prepared branches seen at the end of the last pass
``oldest_in_doubt_seconds{participant}``  age of the oldest prepared branch (0 when none)
``branches_resolved_total{participant,outcome}``  committed / rolled_back by this daemon
``recovery_passes_total``                 recovery passes run while active
``recovery_pass_duration_seconds``        histogram of their duration
``recovery_errors_total{source}``         errors, by participant name or ``log``
``participant_up{participant}``           1 when the participant answered the last pass
``log_up``                                1 when the decision log answered
``decision_rows``                         decision rows waiting for cleanup (Paxos
                                          mode: transactions with slots, per pass)
``daemon_active``                         1 when this daemon holds the recovery lock
``deadlocks_detected_total``              wait-for cycles across participants found
``deadlock_victims_cancelled_total``      transactions cancelled to break them
``deadlock_pass_duration_seconds``        histogram of the detector's passes
``lock_waits``                            branches waiting for a lock at the last pass
========================================  =====================================================

Two metrics belong to the coordinator, in the process's default registry (the
one an application already serves), when prometheus_client is installed:
``txmgr_heuristic_mixed_branches_total{participant}`` counts branches that
another session rolled back although the decision was commit (see
:class:`~txmgr.errors.HeuristicMixed` and :mod:`txmgr._coordinator_metrics`), and
``txmgr_transaction_timeouts_total`` counts transactions whose deadline passed
(:class:`~txmgr.errors.TransactionTimeout`, :mod:`txmgr._coordinator_metrics`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from types import ModuleType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from txmgr.deadlock import DetectorReport
from txmgr.errors import ConfigError
from txmgr.status import StatusReport

if TYPE_CHECKING:  # prometheus_client is the optional `metrics` extra
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["METRICS_EXTRA_HINT", "DaemonMetrics", "MetricsServer", "require_prometheus"]

#: How to get the optional dependency, quoted in the error when it is missing.
METRICS_EXTRA_HINT = "pip install 'txmgr[metrics]'"

#: ``(healthy, text)`` for /healthz.
HealthCheck = Callable[[], tuple[bool, str]]

_PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _prometheus_client() -> ModuleType | None:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        return None


def require_prometheus() -> ModuleType:
    """The ``prometheus_client`` module, or a :class:`ConfigError` saying how to install it."""
    module = _prometheus_client()
    if module is None:
        raise ConfigError(
            "serving metrics needs the prometheus-client package, which is not installed: "
            f"{METRICS_EXTRA_HINT} (or run the daemon without --metrics-port / [metrics] port)"
        )
    return module


class _NullMetric:
    """Stands in for every metric when prometheus_client is not installed."""

    def labels(self, *values: str) -> _NullMetric:
        return self

    def set(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class DaemonMetrics:
    """The daemon's metrics, in a registry of their own.

    Without the ``metrics`` extra (prometheus_client) every metric is a no-op, so
    the daemon runs all the same; only serving them (:class:`MetricsServer`, or
    reading :attr:`registry`) raises :class:`~txmgr.errors.ConfigError`.
    """

    in_doubt: Gauge
    oldest: Gauge
    resolved: Counter
    passes: Counter
    pass_duration: Histogram
    errors: Counter
    participant_up: Gauge
    log_up: Gauge
    decision_rows: Gauge
    active: Gauge
    deadlocks: Counter
    victims: Counter
    detector_duration: Histogram
    lock_waits: Gauge

    def __init__(self, participants: Iterable[str], registry: CollectorRegistry | None = None):
        self.participants = list(participants)
        self._seen: set[tuple[str, str]] = set()  # in_doubt label pairs set last time
        self._registry: CollectorRegistry | None = None
        # An explicit registry means the caller wants real metrics: insist on the package.
        prom = _prometheus_client() if registry is None else require_prometheus()
        if prom is None:
            null: Any = _NullMetric()
            self.in_doubt = self.oldest = self.participant_up = null
            self.log_up = self.decision_rows = self.active = null
            self.resolved = self.passes = self.errors = self.pass_duration = null
            self.deadlocks = self.victims = self.detector_duration = self.lock_waits = null
            return
        r = self._registry = registry if registry is not None else prom.CollectorRegistry()
        self.in_doubt = prom.Gauge(
            "txmgr_in_doubt_branches",
            "Prepared branches on the participant at the end of the last pass, by the log's "
            "decision (commit, abort, in progress, not ours, unknown)",
            ["participant", "decision"],
            registry=r,
        )
        self.oldest = prom.Gauge(
            "txmgr_oldest_in_doubt_seconds",
            "Age of the oldest prepared branch on the participant (0 when none)",
            ["participant"],
            registry=r,
        )
        self.resolved = prom.Counter(
            "txmgr_branches_resolved",
            "Prepared branches this daemon finished, by outcome (committed, rolled_back)",
            ["participant", "outcome"],
            registry=r,
        )
        self.passes = prom.Counter(
            "txmgr_recovery_passes", "Recovery passes run while active", registry=r
        )
        self.pass_duration = prom.Histogram(
            "txmgr_recovery_pass_duration_seconds",
            "Duration of recovery passes",
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.errors = prom.Counter(
            "txmgr_recovery_errors",
            "Errors met by the daemon, by source (a participant name, or 'log')",
            ["source"],
            registry=r,
        )
        self.participant_up = prom.Gauge(
            "txmgr_participant_up",
            "1 when the participant answered the daemon's last look, else 0",
            ["participant"],
            registry=r,
        )
        self.log_up = prom.Gauge("txmgr_log_up", "1 when the decision log answered", registry=r)
        self.decision_rows = prom.Gauge(
            "txmgr_decision_rows", "Decision rows waiting for cleanup", registry=r
        )
        self.active = prom.Gauge(
            "txmgr_daemon_active", "1 when this daemon holds the recovery lock", registry=r
        )
        self.deadlocks = prom.Counter(
            "txmgr_deadlocks_detected",
            "Wait-for cycles across participants the deadlock detector found", registry=r,
        )
        self.victims = prom.Counter(
            "txmgr_deadlock_victims_cancelled",
            "Transactions the deadlock detector cancelled to break a cycle", registry=r,
        )
        self.detector_duration = prom.Histogram(
            "txmgr_deadlock_pass_duration_seconds", "Duration of deadlock detector passes",
            buckets=_PASS_BUCKETS, registry=r,
        )
        self.lock_waits = prom.Gauge(
            "txmgr_lock_waits", "Sessions waiting for a lock on a participant at the "
            "detector's last pass", registry=r,
        )
        for name in self.participants:
            self.oldest.labels(name).set(0)
            for outcome in ("committed", "rolled_back"):
                self.resolved.labels(name, outcome)  # exported as 0 before the first one

    @property
    def registry(self) -> CollectorRegistry:
        """The registry holding these metrics; ConfigError without prometheus_client."""
        if self._registry is None:
            require_prometheus()  # raises: the package is missing
        assert self._registry is not None
        return self._registry

    def record_detector(self, report: DetectorReport) -> None:
        """Count what one deadlock detector pass found and did."""
        self.deadlocks.inc(len(report.deadlocks))
        self.victims.inc(len(report.cancelled))
        self.detector_duration.observe(report.duration)
        self.lock_waits.set(len({(w.participant, w.pid) for w in report.waits}))

    def record_status(self, report: StatusReport) -> None:
        """Set the in-doubt gauges from a fresh :class:`StatusReport`."""
        counts: dict[tuple[str, str], int] = {}  # (participant, decision) -> branches
        oldest: dict[str, float] = dict.fromkeys(self.participants, 0.0)
        for b in report.branches:
            key: tuple[str, str] = (b.participant, b.decision)
            counts[key] = counts.get(key, 0) + 1
            oldest[b.participant] = max(oldest.get(b.participant, 0.0), b.age)
        for key in self._seen - set(counts):
            if key[0] in report.unreachable:
                continue  # unknown: keep the last value rather than claim 0
            self.in_doubt.labels(*key).set(0)  # keep the series, at 0, once it existed
        for key, n in counts.items():
            self.in_doubt.labels(*key).set(n)
        self._seen |= set(counts)
        for name, age in oldest.items():
            if name in report.unreachable:
                continue  # unknown: keep the last value rather than claim 0
            self.oldest.labels(name).set(age)
        for name in self.participants:
            self.participant_up.labels(name).set(0 if name in report.unreachable else 1)
        if report.log_reachable and report.mode == "single":
            # Paxos mode has no decision rows: the recovery pass sets the gauge
            # to the slots it saw (RecoveryReport.decisions_pending).
            self.decision_rows.set(len(report.pending))


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, served from a daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthCheck,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._metrics_app = require_prometheus().make_wsgi_app(registry)
        self._health = health
        self._server: WSGIServer = make_server(
            host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="txmgr-metrics", daemon=True
        )

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Start serving from a daemon thread; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok, text = self._health()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode() + b"\n"]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # One thread per request: a slow scraper must not hold up /healthz.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""

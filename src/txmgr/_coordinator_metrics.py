"""The coordinator's own metrics: branches another session rolled back although the
decision was commit (:class:`~txmgr.errors.HeuristicMixed`), and transactions
their deadline ended (:class:`~txmgr.errors.TransactionTimeout`).

They live in the process's default prometheus_client registry — the one an
application already serves — when prometheus_client is installed, and are
no-ops otherwise. A module of its own, not part of :mod:`txmgr.metrics` (the
daemon's metrics, which import recovery and status): the commit protocol sits
below those and must not import them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "HEURISTIC_MIXED_METRIC",
    "TRANSACTION_TIMEOUTS_METRIC",
    "count_heuristic_mixed",
    "count_transaction_timeout",
]

#: Their names in the exposition format gain prometheus_client's ``_total``.
HEURISTIC_MIXED_METRIC = "txmgr_heuristic_mixed_branches"
TRANSACTION_TIMEOUTS_METRIC = "txmgr_transaction_timeouts"


class _LazyCounter:
    """A prometheus_client Counter made on first use; None without prometheus_client."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self._args = (name, documentation, list(labels))
        self._lock = threading.Lock()
        self._counter: Any = None  # False when prometheus_client is missing

    def get(self) -> Any:
        with self._lock:
            if self._counter is None:
                try:
                    prom = importlib.import_module("prometheus_client")
                except ImportError:
                    self._counter = False
                else:
                    self._counter = prom.Counter(*self._args)
        return None if self._counter is False else self._counter


_heuristic_mixed = _LazyCounter(
    HEURISTIC_MIXED_METRIC,
    "Branches of committed transactions that another session rolled back "
    "(the coordinator raised HeuristicMixed), by participant",
    ["participant"],
)
_timeouts = _LazyCounter(
    TRANSACTION_TIMEOUTS_METRIC,
    "Transactions rolled back because their deadline passed "
    "(the coordinator raised TransactionTimeout)",
)


def count_heuristic_mixed(participants: Iterable[str]) -> None:
    """Count one branch per participant named, rolled back against a commit decision."""
    counter = _heuristic_mixed.get()
    if counter is not None:
        for name in participants:
            counter.labels(name).inc()


def count_transaction_timeout() -> None:
    """Count one transaction rolled back because its deadline passed."""
    counter = _timeouts.get()
    if counter is not None:
        counter.inc()

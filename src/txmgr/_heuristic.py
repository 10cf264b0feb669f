"""The coordinator's one metric: branches another session rolled back although the
decision was commit (:class:`~txmgr.errors.HeuristicMixed`).

It lives in the process's default prometheus_client registry — the one an
application already serves — when prometheus_client is installed, and is a
no-op otherwise. It is a module of its own, not part of :mod:`txmgr.metrics`
(the daemon's metrics, which import recovery and status): the commit
protocol sits below those and must not import them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["HEURISTIC_MIXED_METRIC", "count_heuristic_mixed"]

#: Its name in the exposition format gains prometheus_client's ``_total``.
HEURISTIC_MIXED_METRIC = "txmgr_heuristic_mixed_branches"

_lock = threading.Lock()
_counter: Any = None  # made on first use; False when prometheus_client is missing


def count_heuristic_mixed(participants: Iterable[str]) -> None:
    """Count one branch per participant named, rolled back against a commit decision."""
    global _counter
    with _lock:
        if _counter is None:
            try:
                prom = importlib.import_module("prometheus_client")
            except ImportError:
                _counter = False
            else:
                _counter = prom.Counter(
                    HEURISTIC_MIXED_METRIC,
                    "Branches of committed transactions that another session rolled back "
                    "(the coordinator raised HeuristicMixed), by participant",
                    ["participant"],
                )
    if _counter is False:
        return
    for name in participants:
        _counter.labels(name).inc()

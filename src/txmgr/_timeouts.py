"""The coordinator's counter of transactions its deadline ended
(:class:`~txmgr.errors.TransactionTimeout`).

Like :mod:`txmgr._heuristic`: it lives in the process's default
prometheus_client registry — the one an application already serves — when
prometheus_client is installed, and is a no-op otherwise; a module of its own
because the commit protocol must not import :mod:`txmgr.metrics`.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

__all__ = ["TRANSACTION_TIMEOUTS_METRIC", "count_transaction_timeout"]

#: Its name in the exposition format gains prometheus_client's ``_total``.
TRANSACTION_TIMEOUTS_METRIC = "txmgr_transaction_timeouts"

_lock = threading.Lock()
_counter: Any = None  # made on first use; False when prometheus_client is missing


def count_transaction_timeout() -> None:
    """Count one transaction rolled back because its deadline passed."""
    global _counter
    with _lock:
        if _counter is None:
            try:
                prom = importlib.import_module("prometheus_client")
            except ImportError:
                _counter = False
            else:
                _counter = prom.Counter(
                    TRANSACTION_TIMEOUTS_METRIC,
                    "Transactions rolled back because their deadline passed "
                    "(the coordinator raised TransactionTimeout)",
                )
    if _counter is False:
        return
    _counter.inc()

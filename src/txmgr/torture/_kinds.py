"""The nemesis's fault kinds (a module of its own: the CLI needs the names
without importing the harness)."""

from __future__ import annotations

__all__ = ["KINDS"]

KINDS = (
    "kill_client",
    "kill_daemon",
    "restart_participant",
    "restart_log",
    "drop_connections",
    "drop_prepare",
    "drop_commit_prepared",
    "drop_log_commit",
    "log_outage",
    "partition",
    "failpoint_crash",
    "failpoint_raise",
    "failpoint_sleep",
)

"""The nemesis's fault kinds (a module of its own: the CLI needs the names
without importing the harness).

:data:`KINDS` are those of the single-log modes (a dedicated log database, or
the log inside a participant). Paxos mode (``--log paxos``, three log
databases) keeps every one of them — those aimed at "the log" pick one log
database, or two for ``log_outage`` — and adds :data:`PAXOS_ONLY`. With
``--standby`` (every server has a synchronous standby) the single-log modes
add :data:`FAILOVER` (the log's failover only where the log has a server of
its own; ``stale_replica`` checks that a lagging standby is refused).
"""

from __future__ import annotations

__all__ = ["ALL_KINDS", "FAILOVER", "KINDS", "PAXOS_KINDS", "PAXOS_ONLY", "kinds_for"]

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

#: Faults that need several log databases.
PAXOS_ONLY = (
    "stop_log",  # one log server down for a while, in the background
    "wipe_log",  # one log database dropped and re-created empty: a new incarnation
    "isolate_log",  # one log database unreachable through its proxy for a while
    "two_logs_down",  # two of the three at once; then one returns, later the other
)

PAXOS_KINDS = KINDS + PAXOS_ONLY

#: Faults that need a standby of each server (``--standby``).
FAILOVER = (
    "failover_participant",  # a participant's primary dies; its synchronous standby takes over
    "failover_log",  # the same for the dedicated log's server
    # a standby lags (replay paused); `txmgr status` and `txmgr recover` pointed at
    # it must refuse it (NotPrimary) and change nothing
    "stale_replica",
)

ALL_KINDS = PAXOS_KINDS + FAILOVER


def kinds_for(log: str, *, standby: bool = False) -> tuple[str, ...]:
    """Every fault kind that makes sense with this ``--log`` mode (and ``--standby``)."""
    if log == "paxos":
        return PAXOS_KINDS
    if not standby:
        return KINDS
    return KINDS + tuple(k for k in FAILOVER if log == "dedicated" or k != "failover_log")

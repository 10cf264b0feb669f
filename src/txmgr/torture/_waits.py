"""The hot workload's rule: no attempt waited longer than its bound.

The deadline (``tm.transaction(timeout=)``) covers everything up to the
decision, and a deadlock is broken within one detector interval of forming;
so no attempt may wait, start to decision (or to its error when it never
reached one), longer than ``deadline + detector interval + SLACK``. The
slack covers what the contract leaves after the deadline: at expiry txmgr
sends a cancel and closes a connection whose server does not answer only
:data:`~txmgr._protocol.CANCEL_GRACE` (2 s) later; then the block rolls the
other branches back; plus the scheduling of a loaded machine (1 s). A client
that was SIGKILLed wrote no ``W`` line for its last attempt: nothing to
judge. Attempts during which a failpoint fired are not judged either: a
failpoint sleep inside the coordinator is a fault the deadline does not
promise to bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from txmgr._protocol import CANCEL_GRACE
from txmgr.torture._records import Attempt

__all__ = ["SLACK", "WaitSummary", "judge_waits", "wait_bound"]

SLACK = CANCEL_GRACE + 1.0  # seconds; see the module docstring


def wait_bound(deadline: float, detector_interval: float) -> float:
    """The longest an attempt may wait, start to decision."""
    return deadline + detector_interval + SLACK


@dataclass
class WaitSummary:
    bound: float  # seconds an attempt may wait
    attempts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "committed" or error -> attempts
    longest: float = 0.0  # longest judged wait, seconds
    longest_faulted: float = 0.0  # longest wait of an attempt a failpoint hit (not judged)

    @property
    def victims(self) -> int:
        return self.outcomes["DeadlockDetected"]

    @property
    def timeouts(self) -> int:
        return self.outcomes["TransactionTimeout"]

    def text(self) -> str:
        return (f"hot attempts: {self.attempts} deadlock victims={self.victims} "
                f"timeouts={self.timeouts} longest wait={self.longest:.2f}s "
                f"(bound {self.bound:.2f}s; faulted, not judged: "
                f"{self.longest_faulted:.2f}s) outcomes: "
                + " ".join(f"{k}={n}" for k, n in self.outcomes.most_common()))


def judge_waits(attempts: list[Attempt], bound: float
                ) -> tuple[WaitSummary, list[tuple[str, str]]]:
    """The summary, and a ("wait", detail) problem per attempt over ``bound``."""
    summary = WaitSummary(bound)
    problems: list[tuple[str, str]] = []
    for a in attempts:
        summary.attempts += 1
        summary.outcomes[a.outcome] += 1
        if a.faulted:
            summary.longest_faulted = max(summary.longest_faulted, a.waited)
            continue
        summary.longest = max(summary.longest, a.waited)
        if a.waited > bound:
            problems.append(("wait", f"transfer {a.transfer_id} attempt {a.attempt} waited "
                                     f"{a.waited:.2f}s > {bound:.2f}s ({a.outcome})"))
    return summary, problems

"""What the nemesis asks the fault proxies to do: statement patterns, drop
actions, and the wait for a rule to fire."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Literal

from txmgr.testing.proxy import Rule

__all__ = [
    "ACCEPT_PATTERN",
    "ACCEPT_STATEMENT",
    "ANY_STATEMENT",
    "DROP_ACTIONS",
    "PATTERNS",
    "RULE_PATIENCE",
    "DropAction",
    "wait_for_hit",
]

DropAction = Literal["drop_before", "drop_after_forward", "drop_after_reply"]
DROP_ACTIONS: tuple[DropAction, ...] = ("drop_before", "drop_after_forward", "drop_after_reply")

# The statements of the single-log protocol.
PATTERNS = {
    "drop_prepare": r"^PREPARE TRANSACTION",
    "drop_commit_prepared": r"^COMMIT PREPARED",
    "drop_log_commit": r"^COMMIT\s*;?\s*$",
    "partition": r"^(PREPARE TRANSACTION|COMMIT PREPARED|COMMIT\s*;?\s*$)",
}

#: The acceptor statements of Paxos phase 2 — the coordinator's ballot-0 commit
#: (alone, or combined with concurrent ones: ``…_many``) and recovery's accept —
#: executed by name (``tests/test_torture.py`` checks that txmgr's acceptor
#: still calls them that). Registration is never aimed at: how and when a
#: coordinator registers is txmgr's business.
ACCEPT_STATEMENT = "txmgr_paxos_accept"
ACCEPT_PATTERN = rf'\bEXECUTE\s+"?{ACCEPT_STATEMENT}(_many)?"?\s*\('
#: Every statement (a log database cut off from its clients).
ANY_STATEMENT = r"\S"

RULE_PATIENCE = 10.0  # seconds a rule may wait for its statement before it is removed


def wait_for_hit(rules: Sequence[Rule], stop: threading.Event,
                 patience: float = RULE_PATIENCE) -> bool:
    """Wait until one of ``rules`` fired; False after ``patience`` seconds or on ``stop``."""
    deadline = time.monotonic() + patience
    while not any(rule.hits for rule in rules):
        if time.monotonic() >= deadline or stop.wait(0.02):
            return False
    return True

"""Fault rules of the proxy: which queries to disturb, how, and how often.

Rules are added and removed by the test's thread and matched on the proxy's
event-loop thread; one lock guards the list and every rule's hit count.
"""

from __future__ import annotations

import re
import threading
from typing import Literal, get_args

__all__ = ["ACTIONS", "Action", "Rule", "RuleSet"]

Action = Literal["drop_before", "drop_after_forward", "drop_after_reply", "delay", "blackhole"]
ACTIONS: tuple[str, ...] = get_args(Action)


class Rule:
    """What the proxy does with frontend queries whose SQL matches ``pattern``.

    Made by :meth:`FaultProxy.add_rule`. ``hits`` counts how often it fired; it
    fires at most ``times`` times (``None``: without limit), then no longer matches.
    """

    __slots__ = ("_hits", "_lock", "action", "delay", "pattern", "times")

    def __init__(
        self,
        pattern: str,
        action: Action,
        *,
        times: int | None,
        delay: float,
        lock: threading.Lock,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(
                f"unknown fault proxy action {action!r}: use one of {', '.join(ACTIONS)}"
            )
        if times is not None and (isinstance(times, bool) or times < 1):
            raise ValueError(f"times={times!r}: give a count of at least 1, or None for always")
        if delay < 0 or (delay and action != "delay"):
            raise ValueError(
                f"delay={delay!r} with action {action!r}: a delay (seconds, >= 0) belongs "
                "to the action 'delay' only"
            )
        self.pattern = re.compile(pattern, re.IGNORECASE)  # re.error on a bad pattern
        self.action: Action = action
        self.times = times
        self.delay = delay
        self._lock = lock
        self._hits = 0

    @property
    def hits(self) -> int:
        """How many times the rule fired so far."""
        with self._lock:
            return self._hits

    def __repr__(self) -> str:
        return (
            f"<Rule {self.pattern.pattern!r} {self.action} hits={self.hits}/"
            f"{'unlimited' if self.times is None else self.times}>"
        )

    def _fire(self, sql: str) -> bool:
        """Count a hit when the rule has hits left and matches ``sql`` (lock held)."""
        if self.times is not None and self._hits >= self.times:
            return False
        if self.pattern.search(sql) is None:
            return False
        self._hits += 1
        return True


class RuleSet:
    """The ordered rules of one proxy; the first that matches fires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []

    def add(self, pattern: str, action: Action, times: int | None, delay: float) -> Rule:
        rule = Rule(pattern, action, times=times, delay=delay, lock=self._lock)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def match(self, sql: str) -> Rule | None:
        """The first rule that fires for ``sql`` (its hit is counted), or None."""
        with self._lock:
            for rule in self._rules:
                if rule._fire(sql):
                    return rule
        return None

"""Failpoints: named places in the commit protocol where a test makes the
coordinator crash, raise or stall.

Off by default: every point costs one check of an empty dict. Switch them on
in a test process with the API, or for a whole process (a client the test
starts) with an environment variable read at import::

    from txmgr import failpoints
    failpoints.enable("after_decision", "crash")          # os._exit(CRASH_EXIT)
    failpoints.enable("before_decision", "sleep(0.5)")
    failpoints.enable("after_prepare", "raise@0.1")       # one time in ten

    TXMGR_FAILPOINTS="after_prepare=crash@0.05,before_decision=sleep(0.2)"
    TXMGR_FAILPOINTS_SEED=7      # makes the "@p" draws reproducible

Actions: ``crash`` ends the process at once with ``os._exit`` (no cleanup, no
flush: like a SIGKILL, the servers see the connections drop), ``raise``
raises :class:`FailpointError`, ``sleep(SECONDS)`` stalls the committing
thread (with asyncio, the whole event loop). ``@P`` fires with probability
P. What an exception does depends on where the point is, exactly as for
:class:`txmgr.hooks.Hooks`: before the decision it aborts the transaction;
after it, it is logged and the transaction stays committed (a
``before_commit_prepared`` failure leaves that branch to recovery).

The points, in protocol order (:data:`POINTS`):

- ``before_vote``: ``commit()`` was called, nothing sent yet;
- ``before_one_phase``: at most one branch wrote; its COMMIT is next;
- ``before_prepare``: the decision transaction is open, no PREPARE sent;
- ``after_prepare``: once per prepared branch, after the PREPARE round;
- ``before_decision``: every branch prepared, the decision not committed;
- ``after_decision``: the decision is durable, no branch committed;
- ``before_commit_prepared``: once per branch, just before its COMMIT
  PREPARED is sent (the second firing falls between two COMMIT PREPAREDs);
- ``after_commit_prepared``: once per committed branch;
- ``before_cleanup``: every branch committed, the decision row not yet
  queued for deletion.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from txmgr.errors import ConfigError, TxmgrError

__all__ = [
    "CRASH_EXIT",
    "ENV",
    "POINTS",
    "FailpointError",
    "active",
    "clear",
    "disable",
    "enable",
    "fire",
    "hits",
]

ENV = "TXMGR_FAILPOINTS"
SEED_ENV = "TXMGR_FAILPOINTS_SEED"
#: exit status of a process ended by a ``crash`` failpoint
CRASH_EXIT = 77

POINTS = (
    "before_vote",
    "before_one_phase",
    "before_prepare",
    "after_prepare",
    "before_decision",
    "after_decision",
    "before_commit_prepared",
    "after_commit_prepared",
    "before_cleanup",
)


class FailpointError(TxmgrError):
    """Raised by a failpoint whose action is ``raise``."""


@dataclass(frozen=True)
class _Action:
    kind: str  # "crash" | "raise" | "sleep"
    seconds: float = 0.0
    probability: float = 1.0


_ACTION = re.compile(r"^(crash|raise|sleep\((\d+(?:\.\d*)?)\))(?:@(0(?:\.\d+)?|1(?:\.0*)?))?$")

# name -> action. Empty means "all off": fire() then costs one truth test.
_active: dict[str, _Action] = {}
_hits: dict[str, int] = {}
_lock = threading.Lock()
_rng = random.Random()


def _parse(name: str, spec: str) -> _Action:
    if name not in POINTS:
        raise ConfigError(
            f"unknown failpoint {name!r}: use one of {', '.join(POINTS)}"
        )
    m = _ACTION.match(spec.strip())
    if m is None:
        raise ConfigError(
            f"failpoint {name}: bad action {spec!r}: use crash, raise or sleep(SECONDS), "
            "optionally followed by @PROBABILITY (e.g. crash@0.05)"
        )
    kind = m.group(1).split("(")[0]
    seconds = float(m.group(2)) if m.group(2) else 0.0
    probability = float(m.group(3)) if m.group(3) else 1.0
    return _Action(kind, seconds, probability)


def enable(name: str, action: str) -> None:
    """Switch failpoint ``name`` on with ``action`` (see the module docstring)."""
    parsed = _parse(name, action)
    with _lock:
        _active[name] = parsed


def disable(name: str) -> None:
    """Switch failpoint ``name`` off (no error if it was off)."""
    with _lock:
        _active.pop(name, None)


def clear() -> None:
    """Switch every failpoint off and reset the hit counts."""
    with _lock:
        _active.clear()
        _hits.clear()


def active() -> Mapping[str, str]:
    """The failpoints switched on: name -> action kind."""
    return {name: a.kind for name, a in _active.items()}


def hits(name: str) -> int:
    """How many times failpoint ``name`` fired (its action ran) in this process."""
    return _hits.get(name, 0)


def seed(value: int) -> None:
    """Seed the draws of ``@P`` actions, to reproduce a run."""
    _rng.seed(value)


def load(spec: str) -> None:
    """Enable the failpoints of a ``name=action,name=action`` string (the env format)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep:
            raise ConfigError(
                f"{ENV}: {item!r} is not name=action (e.g. after_decision=crash)"
            )
        enable(name.strip(), action)


def fire(name: str) -> None:
    """Run failpoint ``name``'s action, if it is on. Called by the protocol."""
    if not _active:  # the common case: one dict truth test
        return
    action = _active.get(name)
    if action is None:
        return
    if action.probability < 1.0:
        with _lock:
            if _rng.random() >= action.probability:
                return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
    if action.kind == "crash":
        os._exit(CRASH_EXIT)
    if action.kind == "raise":
        raise FailpointError(f"failpoint {name} fired")
    time.sleep(action.seconds)


def _from_env() -> None:
    spec = os.environ.get(ENV)
    if spec:
        load(spec)
    s = os.environ.get(SEED_ENV)
    if s:
        seed(int(s))


_from_env()

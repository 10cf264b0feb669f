"""The hot-account workload: few accounts, legs in random order, a deadline, retries.

Every transfer moves money between the first :data:`HOT_ACCOUNTS` accounts of
two participants and touches them in a random order, so two transfers can
lock a then b and b then a: a distributed deadlock only the daemons'
detector can break. Each attempt runs under ``tm.transaction(timeout=deadline)``
and is retried as :func:`txmgr.run_transaction` with ``retry_timeouts=True``
would (its own retry rule and backoff; the loop is ours only to see each
attempt). Every attempt writes a ``W`` line
(see :mod:`txmgr.torture._records`): how long it waited up to its decision
(the coordinator's ``before_decision`` hook, else its error) and its outcome.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import psycopg

from txmgr._retry import INITIAL_DELAY, MAX_DELAY, backoff_delay, is_retryable
from txmgr.errors import OutcomeUnknown
from txmgr.manager import TransactionManager
from txmgr.torture._records import RecordWriter
from txmgr.torture._workload import Transfer

__all__ = ["HOT_ACCOUNTS", "MAX_ATTEMPTS", "plan_hot_transfer", "run_hot_transfer"]

HOT_ACCOUNTS = 2  # per participant: few enough that transfers collide all the time
MAX_ATTEMPTS = 5  # then the transfer is recorded aborted with its last error


def plan_hot_transfer(rng: random.Random, transfer_id: str, participants: list[str]) -> Transfer:
    """A transfer between hot accounts of two different participants."""
    src, dst = rng.sample(participants, 2)
    return Transfer(transfer_id, src, rng.randint(1, HOT_ACCOUNTS),
                    dst, rng.randint(1, HOT_ACCOUNTS), rng.randint(1, 50))


def _body(tm: TransactionManager, t: Transfer, deadline: float, order: list[str]) -> str:
    """One attempt; returns the txid (committed on return)."""
    legs = {t.src: (t.src_account, -t.amount), t.dst: (t.dst_account, t.amount)}
    with tm.transaction(timeout=deadline) as tx:
        for name in order:  # random order: deadlocks across participants happen
            conn: psycopg.Connection[Any] = tx.connection(name)
            account, delta = legs[name]
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                         (delta, account))
            conn.execute("INSERT INTO ledger (transfer_id, account, delta) VALUES (%s, %s, %s)",
                         (t.transfer_id, account, delta))
        return tx.txid


def run_hot_transfer(
    tm: TransactionManager, t: Transfer, out: RecordWriter, rng: random.Random,
    deadline: float, decided: Callable[[], float | None], faulted: Callable[[], bool],
    pause: Callable[[float], object],
) -> str:
    """Run ``t`` with retries; record each attempt (``W``) and the outcome letter.

    ``decided()`` is the monotonic time this thread's last decision began (None
    before one); ``faulted()`` says whether a failpoint fired since the last call;
    ``pause(seconds)`` waits between attempts (the client's stop event).
    """
    tid = t.transfer_id
    out.write("A", tid, "-")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        order = rng.sample([t.src, t.dst], 2)
        start = time.monotonic()
        error: BaseException | None = None
        try:
            _body(tm, t, deadline, order)
        except Exception as e:  # judged below
            error = e
        end = time.monotonic()
        at = decided()
        waited = (at if at is not None and start <= at <= end else end) - start
        outcome = "committed" if error is None else type(error).__name__
        out.write("W", tid, str(attempt), f"{waited:.3f}", outcome,
                  *(["faulted=1"] if faulted() else []))
        if error is None:
            out.write("K", tid)
            return "K"
        if isinstance(error, OutcomeUnknown):
            out.write("U", tid, outcome)
            return "U"
        # Not retried (e.g. a participant down): recorded aborted; nothing was
        # committed, the checker holds it to that.
        if not is_retryable(error, timeouts=True) or attempt == MAX_ATTEMPTS:
            break
        pause(backoff_delay(attempt, initial=INITIAL_DELAY, maximum=MAX_DELAY,
                            random=rng.random))
    out.write("X", tid, outcome)
    return "X"

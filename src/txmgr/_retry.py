"""Rerun a global transaction after the errors that are safe to retry.

``run_transaction(tm, fn)`` runs ``fn(tx)`` inside ``tm.transaction()`` and,
when the transaction aborted for a reason a rerun may not meet again (a branch
was a serialization-failure or deadlock victim, 40001/40P01, or an error whose
class says ``retryable``), runs it again after a capped exponential backoff
with full jitter (a random wait from 0 up to the cap, so that the victims of
one conflict do not collide again in step). What it never reruns: an
:class:`~txmgr.errors.OutcomeUnknown` (the transaction may have committed),
an error that is not an abort (fix the cause), anything not an ``Exception``.

``fn`` must be safe to run more than once: everything it does in ``tx`` is
rolled back before a rerun, anything it does elsewhere is not.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from txmgr.errors import (
    RETRYABLE_SQLSTATES,
    ConfigError,
    OutcomeUnknown,
    TransactionAborted,
    TxmgrError,
    _sqlstates,
    is_timeout,
)

if TYPE_CHECKING:
    from txmgr._aio_manager import AsyncTransactionManager
    from txmgr._aio_transaction import AsyncTransaction
    from txmgr.manager import TransactionManager
    from txmgr.transaction import Transaction

__all__ = ["arun_transaction", "backoff_delay", "is_retryable", "run_transaction"]

T = TypeVar("T")
logger = logging.getLogger("txmgr.retry")

MAX_ATTEMPTS = 10
INITIAL_DELAY = 0.05  # seconds: the first retry's cap
MAX_DELAY = 2.0  # seconds: no wait between attempts is longer


def is_retryable(error: BaseException, *, timeouts: bool = False) -> bool:
    """Whether rerunning the transaction that raised ``error`` may succeed.

    A txmgr error answers for itself (``.retryable``; with ``timeouts``, an
    aborted transaction that timed out too). Any other error (a psycopg error
    raised by a statement inside the block, after which the block rolled
    back) is retryable when its SQLSTATE, or its cause's, is 40001 or 40P01
    (or a statement/lock timeout, with ``timeouts``).
    """
    if not isinstance(error, Exception) or isinstance(error, OutcomeUnknown):
        return False
    if isinstance(error, TxmgrError):
        if error.retryable:
            return True
        return timeouts and isinstance(error, TransactionAborted) and is_timeout(error)
    return bool(_sqlstates(error) & RETRYABLE_SQLSTATES) or (timeouts and is_timeout(error))


def backoff_delay(attempt: int, *, initial: float, maximum: float,
                  random: Callable[[], float]) -> float:
    """The wait after failed attempt ``attempt`` (1, 2, …): uniform in
    [0, min(maximum, initial * 2**(attempt-1))) ("full jitter")."""
    cap = min(maximum, initial * 2.0 ** min(attempt - 1, 64))
    return cap * random()


@dataclass(frozen=True, slots=True)
class _Policy:
    max_attempts: int
    retry_timeouts: bool
    initial_delay: float
    max_delay: float
    random: Callable[[], float]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ConfigError(
                "the retry delays must satisfy 0 <= initial_delay <= max_delay, got "
                f"initial_delay={self.initial_delay}, max_delay={self.max_delay}"
            )

    def delay_after(self, error: Exception, attempt: int) -> float:
        """How long to wait before attempt ``attempt + 1``; re-raises ``error``
        when it is not retryable or this was the last attempt."""
        if not is_retryable(error, timeouts=self.retry_timeouts):
            raise error
        if attempt >= self.max_attempts:
            error.add_note(f"txmgr.run_transaction: gave up after {attempt} attempts")
            raise error
        delay = backoff_delay(attempt, initial=self.initial_delay, maximum=self.max_delay,
                              random=self.random)
        logger.info(
            "transaction attempt %d of %d aborted (%s), retrying in %.3fs",
            attempt, self.max_attempts, type(error).__name__, delay,
            extra={"event": "transaction_retry", "attempt": attempt,
                   "txid": getattr(error, "txid", None)},
        )
        return delay


def run_transaction(
    tm: TransactionManager,
    fn: Callable[[Transaction], T],
    *,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
    retry_timeouts: bool = False,
    initial_delay: float = INITIAL_DELAY,
    max_delay: float = MAX_DELAY,
    sleep: Callable[[float], None] = time.sleep,
    random: Callable[[], float] = _random.random,
) -> T:
    """Run ``fn(tx)`` in a global transaction of ``tm``, committed when it returns;
    rerun it (in a new transaction) after a retryable error, at most
    ``max_attempts`` times in all; return what the committed run returned.
    ``timeout`` is each attempt's deadline (``tm.transaction(timeout=…)``; None:
    the manager's default); with ``retry_timeouts`` an attempt that ran out of
    time is rerun too.

    The last error is raised as is (with a note saying how many attempts were
    made). ``sleep`` and ``random`` are for tests.
    """
    policy = _Policy(max_attempts, retry_timeouts, initial_delay, max_delay, random)
    attempt = 1
    while True:
        try:
            with tm.transaction(timeout=timeout) as tx:
                return fn(tx)
        except Exception as e:
            delay = policy.delay_after(e, attempt)
        sleep(delay)
        attempt += 1


async def arun_transaction(
    tm: AsyncTransactionManager,
    fn: Callable[[AsyncTransaction], Awaitable[T]],
    *,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
    retry_timeouts: bool = False,
    initial_delay: float = INITIAL_DELAY,
    max_delay: float = MAX_DELAY,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    random: Callable[[], float] = _random.random,
) -> T:
    """:func:`run_transaction` for the asyncio manager: ``await fn(tx)``."""
    policy = _Policy(max_attempts, retry_timeouts, initial_delay, max_delay, random)
    attempt = 1
    while True:
        try:
            async with tm.transaction(timeout=timeout) as tx:
                return await fn(tx)
        except Exception as e:
            delay = policy.delay_after(e, attempt)
        await sleep(delay)
        attempt += 1

"""What the sync and the async transaction manager share.

Configuration, hooks, the participants by name, the decision log's id, the
finished decisions waiting to be deleted, and the blocking helpers that both
use for rare work: reading the log's id, deleting finished decisions with a
connection of their own, asking the log what became of a decision whose
COMMIT reply was lost. (The async manager runs those on a worker thread, so
the checks of :mod:`txmgr.log` and :mod:`txmgr.participant` exist once.)
Pools and waiting are the front ends' business: :mod:`txmgr.manager` and
:mod:`txmgr._aio_manager`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Generic, Self, TypeVar

import psycopg

from txmgr import _verdict
from txmgr import log as decision_log
from txmgr._dsn import mask
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD, inspect, prepare_threshold
from txmgr.config import Config
from txmgr.errors import ConfigError, TransactionStateError, UnknownParticipant
from txmgr.hooks import Hooks
from txmgr.participant import (
    ParticipantBase,
    check_server,
    connect,
    network_defaults,
    unreachable_reason,
)
from txmgr.paxos._log import PaxosLog

__all__ = ["FORGET_BATCH", "ManagerBase"]

#: Finished decision rows are deleted by the next decision transaction; past
#: this many waiting, they are deleted at once so the list stays bounded.
FORGET_BATCH = 512

P = TypeVar("P", bound=ParticipantBase)


class ManagerBase(Generic[P]):
    """The state of a transaction manager, without its pools."""

    def __init__(
        self,
        participants: Mapping[str, str],
        log: str | PaxosLog,
        *,
        log_idle_timeout: float = 60.0,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        connect_timeout: float = 10.0,
        step_timeout: float | None = None,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
        transaction_timeout: float | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        config = Config(
            participants=dict(participants),
            log=log,
            log_idle_timeout=log_idle_timeout,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            connect_timeout=connect_timeout,
            step_timeout=step_timeout,
            prepare_threshold=prepare_threshold,
            transaction_timeout=transaction_timeout,
        )
        self._init(config, hooks)

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str] | Config, *, hooks: Hooks | None = None
    ) -> Self:
        """A manager from a TOML file (see :mod:`txmgr.config`) or a :class:`Config`."""
        config = path if isinstance(path, Config) else Config.from_file(path)
        self = cls.__new__(cls)
        self._init(config, hooks)
        return self

    def _init(self, config: Config, hooks: Hooks | None) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self._participants = {
            name: self._new_participant(name, dsn) for name, dsn in config.participants.items()
        }
        self._logid: str | None = None  # read (and schema checked) before the first transaction
        self._log_pooled = True  # the log reached through a pooler? (until _read_logid looks)
        self._forget: list[str] = []  # txids whose branches are all committed
        self._forget_lock = threading.Lock()
        self._closed = False
        log = config.paxos_log
        if log is not None:
            # Recovery gives a registered transaction log_idle_timeout seconds
            # from its registration (its default paxos_grace): a txid registered
            # ahead must reach its commit well within that.
            log.ahead_max_age = min(log.ahead_max_age, config.log_idle_timeout / 4)

    def _new_participant(self, name: str, dsn: str) -> P:
        raise NotImplementedError

    def __repr__(self) -> str:
        log = self.config.log
        shown = repr(log) if isinstance(log, PaxosLog) else repr(mask(log))
        return f"{type(self).__name__}(participants={sorted(self._participants)}, log={shown})"

    def paxos(self) -> PaxosLog:
        """The Paxos decision log (ConfigError in the default mode)."""
        log = self.config.paxos_log
        if log is None:
            raise ConfigError("this manager has a single decision log, not a Paxos log")
        return log

    def participant(self, name: str) -> P:
        """The participant ``name``; UnknownParticipant names the configured ones."""
        try:
            return self._participants[name]
        except KeyError:
            raise UnknownParticipant(
                f"unknown participant {name!r}: configured participants are "
                f"{sorted(self._participants)}; add it to [participants] (or participants=)"
            ) from None

    @property
    def log_participant(self) -> str | None:
        """The participant holding the decision log, or None for a dedicated log."""
        return self.config.log_participant

    def known_logid(self) -> str:
        """The log's id, read before the first transaction began."""
        assert self._logid is not None, "the log's id is read before any transaction"
        return self._logid

    def _require_open(self, call: str) -> None:
        if self._closed:
            raise TransactionStateError(
                f"'{call}' on a closed {type(self).__name__}: create a new one"
            )

    # -- finished decisions ---------------------------------------------------

    def take_forget(self) -> list[str]:
        """Finished txids to delete inside the next decision transaction."""
        with self._forget_lock:
            batch, self._forget = self._forget, []
        return batch

    def forget_later(self, txids: list[str]) -> None:
        """Put txids back (their deletion did not happen): first in line."""
        with self._forget_lock:
            self._forget[:0] = txids

    def _queue_forget(self, txids: Iterable[str]) -> bool:
        """Mark decision rows as finished; True when so many wait that they should
        be deleted now rather than by the next decision."""
        with self._forget_lock:
            self._forget.extend(txids)
            return len(self._forget) >= FORGET_BATCH

    # -- blocking helpers -------------------------------------------------------

    def _read_logid(self) -> str:
        name = self.log_participant or "log"
        with connect(
            self.config.log_dsn, name, connect_timeout=self.config.connect_timeout
        ) as conn:
            self._log_pooled = inspect(conn, name)
            # A dedicated log needs no prepared transactions; a participant does
            # and is checked when first used.
            check_server(conn, name, needs_prepare=False)
            return decision_log.read_logid(conn, self.config.log_dsn)

    def _delete_decisions(self, txids: list[str]) -> None:
        """Delete finished decision rows over a connection of their own."""
        with connect(
            self.config.log_dsn, self.log_participant or "log",
            connect_timeout=self.config.connect_timeout,
        ) as conn:
            decision_log.delete_decisions(conn, txids)

    def confirm_connection(self) -> psycopg.Connection[Any]:
        """A fresh autocommit connection to the log, to learn a decision's fate."""
        return connect(
            self.config.log_dsn, "log", connect_timeout=self.config.connect_timeout,
            autocommit=True,
        )

    def read_decision(self, lxid: int, txid: str) -> tuple[decision_log.XactStatus, bool]:
        """What the log says of one decision (see :func:`txmgr.log.read_decisions`)."""
        with self.confirm_connection() as conn:
            statuses, committed = decision_log.read_decisions(conn, [(lxid, txid)])
        return statuses.get(lxid), txid in committed

    def take_verdict(self, txid: str) -> _verdict.Verdict | None:
        """The deadlock detector's verdict on ``txid``, taken from the log (blocking)."""
        return _verdict.take_any(
            _verdict.log_dsns(self.config), txid, connect_timeout=self.config.connect_timeout
        )

    def _log_pool_options(self) -> dict[str, Any]:
        """Settings of the dedicated log database's pool."""
        return {
            "min_size": self.config.pool_min_size,
            "max_size": self.config.pool_max_size,
            # autocommit: the decision query sends its own BEGIN in the same
            # round trip as the decision row.
            "kwargs": {
                **network_defaults(self.config.log_dsn),
                "connect_timeout": max(1, round(self.config.connect_timeout)),
                "autocommit": True,
                # No libpq options: what L needs it sets inside L (a pooler
                # refuses or drops startup parameters, see txmgr.log).
                "prepare_threshold": prepare_threshold(
                    self.config.prepare_threshold, pooled=self._log_pooled
                ),
            },
            "name": "txmgr-log",
        }

    def _log_unavailable(self) -> str:
        """The log pool had no connection in time: say why (blocking: connects once)."""
        why = unreachable_reason(
            self.config.log_dsn, "log", connect_timeout=self.config.connect_timeout
        )
        return (
            f"no connection to the decision log at {mask(self.config.log_dsn)} within "
            f"{self.config.connect_timeout:g}s: "
            + (why or f"the pool (max_size={self.config.pool_max_size}) is exhausted")
        )

"""The coordinator: ``TransactionManager`` owns the pools and the decision log.

One manager is shared by every thread of an application; each
:meth:`TransactionManager.transaction` is independent. Nothing connects
until it is needed; the first ``transaction()`` checks the decision log's
schema, the first use of a participant checks its server.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
import psycopg_pool

from txmgr import log as decision_log
from txmgr._dsn import mask
from txmgr.config import Config
from txmgr.errors import ParticipantUnavailable, TransactionStateError, UnknownParticipant
from txmgr.hooks import Hooks
from txmgr.participant import Participant, check_server, connect, network_defaults
from txmgr.transaction import Transaction

__all__ = ["TransactionManager"]

logger = logging.getLogger("txmgr")

#: Finished decision rows are deleted by the next decision transaction; past
#: this many waiting, they are deleted at once so the list stays bounded.
FORGET_BATCH = 512


class TransactionManager:
    """Runs global transactions over the configured participants.

    >>> tm = TransactionManager({"orders": dsn1, "billing": dsn2}, log=log_dsn)
    >>> with tm.transaction() as tx:
    ...     tx.connection("orders").execute("INSERT …")
    ...     tx.connection("billing").execute("UPDATE …")
    >>> tm.close()
    """

    def __init__(
        self,
        participants: Mapping[str, str],
        log: str,
        *,
        log_idle_timeout: float = 60.0,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        connect_timeout: float = 10.0,
        hooks: Hooks | None = None,
    ) -> None:
        config = Config(
            participants=dict(participants),
            log=log,
            log_idle_timeout=log_idle_timeout,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            connect_timeout=connect_timeout,
        )
        self._init(config, hooks)

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str] | Config, *, hooks: Hooks | None = None
    ) -> TransactionManager:
        """A manager from a TOML file (see :mod:`txmgr.config`) or a :class:`Config`."""
        config = path if isinstance(path, Config) else Config.from_file(path)
        self = cls.__new__(cls)
        self._init(config, hooks)
        return self

    def _init(self, config: Config, hooks: Hooks | None) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self._participants = {
            name: Participant(
                name,
                dsn,
                min_size=config.pool_min_size,
                max_size=config.pool_max_size,
                connect_timeout=config.connect_timeout,
            )
            for name, dsn in config.participants.items()
        }
        self._lock = threading.Lock()
        self._log_pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._logid: str | None = None  # read (and schema checked) on first transaction()
        self._forget: list[str] = []  # txids whose branches are all committed
        self._forget_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"TransactionManager(participants={sorted(self._participants)}, "
            f"log={mask(self.config.log)!r})"
        )

    # -- public API ---------------------------------------------------------

    def transaction(self) -> Transaction:
        """A new global transaction; use it as a context manager."""
        if self._closed:
            raise TransactionStateError(
                "'transaction()' on a closed TransactionManager: create a new one"
            )
        self.logid()  # fail before any work when the log is unusable
        return Transaction(self)

    def logid(self) -> str:
        """The decision log's id (connects and checks the log schema on first call)."""
        logid = self._logid
        if logid is None:
            with self._lock:
                if self._logid is None:
                    self._logid = self._read_logid()
                logid = self._logid
        return logid

    def check(self) -> None:
        """Connect to every participant and the log now, raising the first problem."""
        self.logid()
        for p in self._participants.values():
            p.pool()

    def close(self) -> None:
        """Delete finished decision rows and close every pool."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_forget()
        except Exception as e:  # closing must not fail; the daemon cleans up
            logger.warning("could not delete finished decision rows on close: %s", e)
        for p in self._participants.values():
            p.close()
        if self._log_pool is not None:
            self._log_pool.close()

    def __enter__(self) -> TransactionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by Transaction ------------------------------------------------

    def participant(self, name: str) -> Participant:
        try:
            return self._participants[name]
        except KeyError:
            raise UnknownParticipant(
                f"unknown participant {name!r}: configured participants are "
                f"{sorted(self._participants)}; add it to [participants] (or participants=)"
            ) from None

    @property
    def log_participant(self) -> str | None:
        return self.config.log_participant

    def log_connection(self, *, wait: bool = True) -> psycopg.Connection[Any]:
        """A connection to the dedicated log database (for the decision transaction).

        With ``wait=False`` only an idle pooled connection will do (else
        ParticipantUnavailable at once): the decision is then opened later.
        """
        pool = self._log_pool
        if pool is None:
            with self._lock:
                if self._log_pool is None:
                    self._log_pool = psycopg_pool.ConnectionPool(
                        self.config.log_dsn,
                        min_size=self.config.pool_min_size,
                        max_size=self.config.pool_max_size,
                        # autocommit: the decision query sends its own BEGIN in the
                        # same round trip as the decision row.
                        kwargs={
                            **network_defaults(self.config.log_dsn),
                            "connect_timeout": max(1, round(self.config.connect_timeout)),
                            "autocommit": True,
                            "options": decision_log.log_session_options(
                                self.config.log_dsn, self.config.log_idle_timeout
                            ),
                        },
                        name="txmgr-log",
                        open=True,
                    )
                pool = self._log_pool
        try:
            return pool.getconn(timeout=self.config.connect_timeout if wait else 0.001)
        except psycopg_pool.PoolTimeout as e:
            raise ParticipantUnavailable(
                f"no connection to the decision log at {mask(self.config.log_dsn)} within "
                f"{self.config.connect_timeout:g}s",
                participant="log",
            ) from e

    def release_log_connection(self, conn: psycopg.Connection[Any]) -> None:
        assert self._log_pool is not None
        self._log_pool.putconn(conn)

    def confirm_connection(self) -> psycopg.Connection[Any]:
        """A fresh autocommit connection to the log, to learn a decision's fate."""
        return connect(
            self.config.log_dsn, "log", connect_timeout=self.config.connect_timeout,
            autocommit=True,
        )

    def take_forget(self) -> list[str]:
        """Finished txids to delete inside the next decision transaction."""
        with self._forget_lock:
            batch, self._forget = self._forget, []
        return batch

    def forget(self, txids: Iterable[str]) -> None:
        """Mark decision rows as finished (deleted by the next decision, or now if many)."""
        with self._forget_lock:
            self._forget.extend(txids)
            flush = len(self._forget) >= FORGET_BATCH
        if flush:
            try:
                self._flush_forget()
            except Exception as e:
                logger.warning("could not delete finished decision rows: %s", e)

    # -- internals ------------------------------------------------------------

    def _flush_forget(self) -> None:
        batch = self.take_forget()
        if not batch:
            return
        try:
            if self.log_participant is None:
                conn = self.log_connection()
                try:
                    decision_log.delete_decisions(conn, batch)
                finally:
                    self.release_log_connection(conn)
            else:
                with connect(self.config.log_dsn, self.log_participant) as c:
                    decision_log.delete_decisions(c, batch)
        except BaseException:
            self.forget_later(batch)
            raise

    def forget_later(self, txids: list[str]) -> None:
        with self._forget_lock:
            self._forget[:0] = txids

    def _read_logid(self) -> str:
        name = self.log_participant or "log"
        with connect(
            self.config.log_dsn, name, connect_timeout=self.config.connect_timeout
        ) as conn:
            # A dedicated log needs no prepared transactions; a participant does
            # and is checked when first used.
            check_server(conn, name, needs_prepare=False)
            return decision_log.read_logid(conn, self.config.log_dsn)


"""Long-lived autocommit connections for recovery and inspection, one per server role.

Recovery passes and status looks run again and again (the daemon): they keep
one connection per participant and one to the log, open a new one when the
old one broke, and drop one after an error so the next use reconnects. Their
statements on the log wait at most :data:`txmgr.log.LOCK_TIMEOUT` for a lock
(set inside each statement's transaction, see :mod:`txmgr.log`, not as a
session option a pooler would refuse or drop). A new connection is inspected
once (:func:`txmgr._pooler.inspect`): through a pooler it prepares nothing,
and statement pooling is refused. A new connection that reaches a hot standby
is refused (NotPrimary): recovery, status and the daemon never read a decision
or list prepared transactions there.
"""

from __future__ import annotations

from typing import Any

import psycopg

from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD, prepare_threshold, probe
from txmgr._primary import require_primary
from txmgr.log import LOCK_TIMEOUT
from txmgr.participant import connect

__all__ = ["LOCK_TIMEOUT", "LOG_KEY", "ConnectionCache"]

LOG_KEY = "\0log"  # cannot clash with a participant name


class ConnectionCache:
    """Autocommit connections by key (a participant name, or :data:`LOG_KEY`)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        application_name: str | None = None,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._prepare_threshold = prepare_threshold
        self._conns: dict[str, psycopg.Connection[Any]] = {}

    def get(self, key: str, dsn: str, name: str | None = None) -> psycopg.Connection[Any]:
        """The connection for ``key``, (re)connecting to ``dsn`` when needed."""
        conn = self._conns.get(key)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        extra = {"application_name": self._application_name} if self._application_name else {}
        conn = connect(
            dsn,
            name or key,
            connect_timeout=self._connect_timeout,
            autocommit=True,
            **extra,
        )
        # A new session may land on a standby (a multi-host DSN after a failover):
        # refuse it before anything uses it. The statements that read decisions
        # or list prepared transactions check again on every use (txmgr._primary).
        try:
            pooled, in_recovery = probe(conn, name or key)
            what = "the decision log" if key == LOG_KEY else f"participant {name or key!r}"
            require_primary(in_recovery, what, name or key, dsn)
        except BaseException:
            conn.close()
            raise
        conn.prepare_threshold = prepare_threshold(self._prepare_threshold, pooled=pooled)
        self._conns[key] = conn
        return conn

    def drop(self, key: str) -> None:
        """Close the connection for ``key`` (after an error): the next get() reconnects."""
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

"""Which of several daemons sharing one decision log is active: an advisory lock
held by an open transaction.

The active daemon holds ``pg_try_advisory_xact_lock(key)`` in a transaction it
keeps open on a connection of its own to the log database; ``key`` is derived
from the logid, so daemons that reach the same log through different DSNs
still compete for one lock. Each pass proves the transaction (and so the lock)
still exists with a ``SELECT 1`` inside it.

Why a transaction and not the session: through a pooler in transaction mode
(PgBouncer) a session advisory lock belongs to whichever server session ran the
statement. Two daemons were active at once (the second one's try ran on the
session that already held the lock, which is re-entrant), and the lock
outlived every daemon on a pooled server session. A transaction, by contrast,
stays on one server session for as long as it is open, in every pool mode;
when the daemon dies (SIGKILL, lost network), its server session ends (direct)
or is closed by the pooler (a client gone mid-transaction), and the lock with
it. Its settings are ``SET LOCAL``: nothing leaks into the pooled session
another client gets next. ``idle_in_transaction_session_timeout`` inside it
is ``dead_peer_after``: a daemon that stops coming back (frozen, or a pass far
longer than its interval) loses the lock and a standby takes over; the
server's TCP keepalives (on a direct connection) end the session of a daemon
that vanished from the network. The transaction has no xid and, between its
statements, no snapshot (it is READ COMMITTED whatever the database's default
isolation): it holds back no vacuum.

Safety never depends on this lock (recovery is idempotent); it only keeps
several daemons from doing the same work at once.

In Paxos mode there is no single log database: the lock is taken on the first
of the log databases, in the configured order, that answers (recovery is safe
with several proposers, so this is only an optimisation). Daemons that see the
same first database compete for one lock; a daemon that could not reach it
locks the next one and may run passes alongside another, which costs duplicate
work, never correctness. A daemon keeps the database it locked until that
session fails, then starts again from the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from txmgr import log as decision_log
from txmgr._dsn import mask, redact
from txmgr._primary import IN_RECOVERY, require_primary
from txmgr.errors import TxmgrError
from txmgr.participant import connect

__all__ = ["LeaderLock", "LeaderState", "lock_key"]

logger = logging.getLogger("txmgr.daemon")

LeaderState = Literal["active", "standby", "unreachable"]


def lock_key(logid: str) -> int:
    """The 64-bit advisory lock key of the log ``logid`` (signed, as PostgreSQL's bigint)."""
    digest = hashlib.sha256(f"txmgr:{logid}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LeaderLock:
    """The leadership lock on the log database; call :meth:`ensure` once per pass.

    ``dsn`` may be a sequence of DSNs (Paxos mode): the lock is then taken on
    the first that answers, in that order (see the module docstring).
    """

    def __init__(
        self,
        dsn: str | Sequence[str],
        *,
        name: str = "log",
        connect_timeout: float = 10.0,
        application_name: str = "txmgr-daemon",
        dead_peer_after: float = 30.0,
    ) -> None:
        self._dsns: tuple[str, ...] = (dsn,) if isinstance(dsn, str) else tuple(dsn)
        if not self._dsns:
            raise ValueError("LeaderLock needs at least one DSN")
        self._dsn = self._dsns[0]  # the database of the current (or last tried) session
        self._name = name
        self._connect_timeout = connect_timeout
        self._application_name = application_name[:63]
        # Seconds after which either side gives up on a silent peer: the server
        # then ends the session (releasing the lock for a standby) and we stop
        # believing we are active.
        self._dead_peer_after = max(3.0, dead_peer_after)
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False
        self.logid: str | None = None
        self.last_error: str | None = None
        #: How many times the lock was taken; a change means "newly active",
        #: even when it was lost and taken back within one call of ensure().
        self.acquisitions = 0

    @property
    def held(self) -> bool:
        return self._held

    def ensure(self) -> LeaderState:
        """Keep or try to take the lock: ``active``, ``standby`` or ``unreachable``."""
        conn = self._conn
        if conn is not None:
            try:
                # A cheap round trip proves the transaction (and so the lock) still
                # exists; for a standby, that the connection works.
                conn.execute("SELECT 1")
                if self._held:
                    return "active"
            except psycopg.Error as e:
                if self._held:
                    logger.warning(
                        "lost the connection holding the recovery lock (%s): no longer active",
                        redact(str(e)).strip(),
                        extra={"event": "lost_leadership"},
                    )
                self._close()
        taken = False
        errors: list[str] = []
        # A kept session stays on its database; a new one starts from the first.
        for dsn in (self._dsn,) if self._conn is not None else self._dsns:
            try:
                self._dsn = dsn
                conn = self._conn or self._connect()
                self.logid = decision_log.read_logid(conn, dsn)
                taken = self._try_lock(conn, lock_key(self.logid))
                break
            except (psycopg.Error, TxmgrError) as e:
                prefix = f"{mask(dsn)}: " if len(self._dsns) > 1 else ""
                errors.append(prefix + redact(str(e)).strip())
                self._close()
        else:
            self.last_error = "; ".join(errors)
            return "unreachable"
        self.last_error = None
        self._held = taken
        if self._held:
            self.acquisitions += 1
        return "active" if self._held else "standby"

    def _try_lock(self, conn: psycopg.Connection[Any], key: int) -> bool:
        """Open the leader's transaction and try the lock in it, one round trip; a
        transaction that did not get the lock is ended at once. The same statement
        selects :data:`~txmgr._primary.IN_RECOVERY`: on a hot standby (which grants
        advisory locks too) the transaction is ended and :class:`NotPrimary` raised.

        READ COMMITTED whatever ``default_transaction_isolation`` says: then the
        transaction holds no snapshot between its statements, so staying open
        for as long as the daemon leads holds back no vacuum.
        """
        idle = self._keepalive_idle()
        cur = psycopg.ClientCursor(conn)
        cur.execute(sql.SQL(
            "BEGIN ISOLATION LEVEL READ COMMITTED; "
            "SET LOCAL idle_in_transaction_session_timeout = {}; "
            "SET LOCAL tcp_keepalives_idle = {}; SET LOCAL tcp_keepalives_interval = {}; "
            "SET LOCAL tcp_keepalives_count = 2; "
            "SELECT pg_try_advisory_xact_lock({}::bigint), " + IN_RECOVERY
        ).format(sql.Literal(int(self._dead_peer_after * 1000)), sql.Literal(idle),
                 sql.Literal(idle), sql.Literal(key)))
        while cur.nextset():
            pass
        row = cur.fetchone()
        taken, in_recovery = row if row is not None else (False, None)
        if not taken or in_recovery is not False:
            conn.execute("ROLLBACK")  # a lock taken on a standby is given up at once
        # A hot standby grants the lock too: there a daemon would believe it leads.
        require_primary(in_recovery, "the decision log", "log", self._dsn)
        return bool(taken)

    def release(self) -> None:
        """Give the lock up (closing the session, or the pooler, releases it in any case)."""
        conn = self._conn
        if conn is not None and self._held:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")  # ends the transaction, and with it the lock
        self._close()

    def _keepalive_idle(self) -> int:
        return max(1, round(self._dead_peer_after / 3))

    def _connect(self) -> psycopg.Connection[Any]:
        idle = self._keepalive_idle()
        # autocommit: the leader's transaction is opened by an explicit BEGIN,
        # together with its settings and the lock (see _try_lock).
        conn = connect(
            self._dsn,
            self._name,
            connect_timeout=self._connect_timeout,
            autocommit=True,
            application_name=self._application_name,
            # Client side: notice a dead server instead of hanging in the check.
            keepalives=1,
            keepalives_idle=idle,
            keepalives_interval=idle,
            keepalives_count=2,
            tcp_user_timeout=int(self._dead_peer_after * 1000),
        )
        self._conn = conn
        return conn

    def _close(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

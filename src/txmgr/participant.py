"""One participant database: its connection pool and the two-phase commands.

The contract, in call order, for one branch of a global transaction:

1. ``checkout()`` a connection; the application works on it (transaction open).
2. ``vote(conn)``: does the branch hold writes? (``pg_current_xact_id_if_assigned``)
3. ``prepare(conn, gid)``: ``PREPARE TRANSACTION``; may fail (the vote "no").
4. ``commit_prepared(conn, gid)`` or ``rollback_prepared(conn, gid)``: should
   never fail; when they do, recovery finishes the branch.
5. ``release(conn)`` returns the connection to the pool.

The functions on plain connections (``list_prepared``, ``finish_prepared``)
are shared with recovery. Nothing here knows about the decision log.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
import psycopg_pool
from psycopg import sql

from txmgr._branch import BranchConnection
from txmgr._dsn import mask, redact
from txmgr._hints import connect_failure_hint
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD, inspect, prepare_threshold
from txmgr._primary import IN_RECOVERY, require_primary, standby_error
from txmgr.errors import (
    ParticipantReadOnly,
    ParticipantUnavailable,
    PreparedTransactionsDisabled,
    UnsupportedServer,
)

__all__ = [
    "MIN_SERVER_VERSION",
    "NETWORK_DEFAULTS",
    "FinishResult",
    "Participant",
    "ParticipantBase",
    "PreparedBranch",
    "check_server",
    "connect",
    "finish_prepared",
    "list_prepared",
    "network_defaults",
    "unreachable_reason",
]

MIN_SERVER_VERSION = 130000  # pg_current_xact_id() / pg_xact_status(xid8) appeared in 13
FinishResult = Literal["done", "missing", "busy"]


#: TCP settings for every txmgr connection unless its DSN sets them: a server
#: that vanishes from the network (no FIN, no RST) is noticed within about 30 s
#: instead of the operating system's default of hours.
NETWORK_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def network_defaults(dsn: str) -> dict[str, int]:
    """The :data:`NETWORK_DEFAULTS` that ``dsn`` does not set itself."""
    try:
        own = psycopg.conninfo.conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, psycopg.OperationalError):
        return {}  # connecting will report the bad DSN
    return {k: v for k, v in NETWORK_DEFAULTS.items() if k not in own}


def connect(
    dsn: str, name: str, *, connect_timeout: float = 10.0, **kwargs: Any
) -> psycopg.Connection[Any]:
    """A direct connection, with any failure turned into ParticipantUnavailable.

    No server-side prepared statements unless the caller passes ``prepare_threshold``
    (after :func:`txmgr._pooler.inspect` said there is no pooler in between).
    """
    kwargs = {**network_defaults(dsn), "prepare_threshold": None, **kwargs}
    try:
        return psycopg.connect(dsn, connect_timeout=max(1, round(connect_timeout)), **kwargs)
    except psycopg.ProgrammingError:
        # libpq quotes the offending part of a bad DSN, which may be the
        # password: never show its text.
        raise ParticipantUnavailable(
            f"invalid connection string for {name!r}: {mask(dsn)}; check its syntax "
            "(in a URL, percent-encode special characters of the password, e.g. % as %25)",
            participant=name,
        ) from None
    except psycopg.OperationalError as e:
        raise ParticipantUnavailable(
            f"cannot connect to {name!r} at {mask(dsn)}: {redact(str(e)).strip()} "
            f"({connect_failure_hint(e)})",
            participant=name,
        ) from None


def unreachable_reason(dsn: str, name: str, *, connect_timeout: float) -> str:
    """Why a pool found no connection: what one fresh attempt answers (the server's
    or a pooler's own message, e.g. PgBouncer's "unsupported startup parameter",
    password masked), or "" when a connection can be made (the pool is exhausted).

    A pool only logs its failed attempts; without this the user would see a
    timeout instead of the reason.
    """
    try:
        connect(dsn, name, connect_timeout=connect_timeout).close()
    except ParticipantUnavailable as e:
        return str(e)
    return ""


def check_server(conn: psycopg.Connection[Any], name: str, *, needs_prepare: bool = True) -> None:
    """Raise a typed error when the server cannot host branches of a global transaction."""
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise UnsupportedServer(
            f"participant {name!r} runs PostgreSQL {version // 10000}; txmgr needs "
            "PostgreSQL 13 or newer (for pg_current_xact_id and pg_xact_status)",
            participant=name,
        )
    # Branches and the decision are writes: a server in recovery (a hot
    # standby) or sessions that are read-only by default could only fail later,
    # at the first write or at PREPARE, with a less helpful message.
    row = conn.execute(
        "SELECT current_setting('max_prepared_transactions')::int, pg_is_in_recovery(), "
        "current_setting('transaction_read_only')"
    ).fetchone()
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    assert row is not None
    what = "the decision log" if name == "log" else f"participant {name!r}"
    if row[1]:
        raise standby_error(what, name, conn.info.dsn)
    if row[2] == "on":
        raise ParticipantReadOnly(
            f"{what} is read-only: its sessions start with default_transaction_read_only "
            "= on (set in its DSN options, ALTER ROLE/DATABASE … SET, or postgresql.conf); "
            "txmgr needs to write there: turn it off for this role or database",
            participant=name,
        )
    if needs_prepare and row[0] <= 0:
        raise PreparedTransactionsDisabled(
            f"participant {name!r} has max_prepared_transactions = 0, so it cannot "
            "prepare transactions: set max_prepared_transactions to at least "
            "max_connections in its postgresql.conf (ALTER SYSTEM SET "
            "max_prepared_transactions = 100) and restart that server",
            participant=name,
        )


@dataclass(frozen=True, slots=True)
class PreparedBranch:
    """A row of pg_prepared_xacts in the participant's own database."""

    gid: str
    prepared: datetime
    owner: str


def list_prepared(conn: psycopg.Connection[Any], prefix: str, *, name: str
                  ) -> list[PreparedBranch]:
    """Prepared transactions of this database whose gid starts with ``prefix``.

    Raises NotPrimary on a standby (its empty list would read as "every branch
    finished"), checked in the same statement: the one row of ``one`` is
    there even when nothing is prepared.
    """
    # COMMIT PREPARED only works from the database that prepared the branch, and
    # gids are server-wide: filter on current_database().
    rows = conn.execute(
        "SELECT " + IN_RECOVERY + ", p.gid, p.prepared, p.owner FROM (SELECT 1) AS one "
        "LEFT JOIN pg_prepared_xacts p "
        "ON p.database = current_database() AND starts_with(p.gid, %s) ORDER BY p.prepared",
        (prefix,),
    ).fetchall()
    require_primary(rows[0][0], f"participant {name!r}", name, conn.info.dsn)
    return [PreparedBranch(r[1], r[2], r[3]) for r in rows if r[1] is not None]


def finish_prepared(conn: psycopg.Connection[Any], gid: str, *, commit: bool) -> FinishResult:
    """COMMIT or ROLLBACK PREPARED ``gid`` on an autocommit connection.

    Idempotent: "does not exist" means somebody else finished it ("missing");
    "is busy" means another session is finishing it right now ("busy").
    """
    verb = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
    try:
        conn.execute(sql.SQL(verb).format(sql.Literal(gid)))
    except psycopg.errors.UndefinedObject:  # 42704
        return "missing"
    except psycopg.errors.ObjectNotInPrerequisiteState:  # 55000: in use by another backend
        return "busy"
    return "done"


class ParticipantBase:
    """A named participant's settings, and what its sync and async pools share."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._prepare_threshold = prepare_threshold
        self.pooled = True  # through a pooler? Until check() looked, assume so (safe)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {mask(self.dsn)!r})"

    def check(self) -> None:
        """Connect once and check the server (blocking; run before opening a pool)."""
        with connect(self.dsn, self.name, connect_timeout=self._connect_timeout) as c:
            self.pooled = inspect(c, self.name)
            check_server(c, self.name)

    def _pool_options(self) -> dict[str, Any]:
        return {
            "min_size": self._min_size,
            "max_size": self._max_size,
            # autocommit: txmgr sends BEGIN itself, together with the branch
            # marker in one round trip, and COMMIT PREPARED needs no mode
            # switch. Inside the branch the server is in a transaction block
            # all the same.
            "kwargs": {
                **network_defaults(self.dsn),
                "connect_timeout": max(1, round(self._connect_timeout)),
                "autocommit": True,
                "prepare_threshold": prepare_threshold(self._prepare_threshold,
                                                       pooled=self.pooled),
            },
            "name": f"txmgr-{self.name}",
        }

    def _closed_error(self) -> ParticipantUnavailable:
        return ParticipantUnavailable(
            f"participant {self.name!r}: the transaction manager is closed",
            participant=self.name,
        )

    def _timeout_error(self) -> ParticipantUnavailable:
        """The pool had no connection in time: say why (blocking: it connects once)."""
        why = unreachable_reason(self.dsn, self.name, connect_timeout=self._connect_timeout)
        return ParticipantUnavailable(
            f"no connection to {self.name!r} at {mask(self.dsn)} within "
            f"{self._connect_timeout:g}s: "
            + (why or f"the pool (max_size={self._max_size}) is exhausted"),
            participant=self.name,
        )


class Participant(ParticipantBase):
    """A named participant: its DSN, its pool and the server check on first use."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    ) -> None:
        super().__init__(
            name, dsn, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout,
            prepare_threshold=prepare_threshold,
        )
        self._lock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool[BranchConnection] | None = None  # opened lazily
        self._closed = False

    def pool(self) -> psycopg_pool.ConnectionPool[BranchConnection]:
        """The pool, opened on first use after checking the server once."""
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._pool is None:
                self.check()
                self._pool = psycopg_pool.ConnectionPool(
                    self.dsn, connection_class=BranchConnection, open=True,
                    **self._pool_options(),
                )
            return self._pool

    def checkout(self) -> BranchConnection:
        """A connection from the pool (autocommit, not in a transaction)."""
        pool = self.pool()
        try:
            return pool.getconn(timeout=self._connect_timeout)
        except psycopg_pool.PoolTimeout as e:
            raise self._timeout_error() from e

    def release(self, conn: BranchConnection) -> None:
        """Give a connection back; the pool rolls back anything left open."""
        conn._txmgr_branch = None
        pool = self._pool
        if pool is None:
            conn.close()
        else:
            pool.putconn(conn)

    def close(self) -> None:
        """Close the pool; the participant opens no connection afterwards."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

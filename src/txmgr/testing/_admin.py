"""Database administration shared by harness-started and external servers."""

from __future__ import annotations

import secrets
import time
from contextlib import suppress
from typing import Any, LiteralString, Protocol, TypeAlias, runtime_checkable

import psycopg
from psycopg import sql
from psycopg.abc import Params

__all__ = ["DatabaseAdmin", "Query", "Server"]

# psycopg's own Query alias varies between versions (3.3 adds t-string templates, which
# take no params); this subset is accepted by all supported versions.
Query: TypeAlias = LiteralString | bytes | sql.SQL | sql.Composed

_CONNECT_TIMEOUT = 10


@runtime_checkable
class Server(Protocol):
    """What tests may rely on, whether the harness started the server or not."""

    @property
    def admin_dsn(self) -> str:
        """A superuser DSN of the ``postgres`` database."""

    @property
    def password(self) -> str | None:
        """The superuser's password, if it has one."""

    @property
    def can_crash(self) -> bool:
        """Whether ``crash()``, ``restart()`` and ``stop()`` work (servers the harness started)."""

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """A DSN of ``dbname`` for ``user`` (the superuser by default)."""

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (a random name by default), a copy of ``template`` if
        given, and return its DSN."""

    def drop_database(self, name: str) -> None:
        """Drop a database, rolling back its prepared transactions first."""

    def execute_admin(
        self, query: Query, params: Params | None = None, *, dbname: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); its rows, if any."""


class DatabaseAdmin:
    """Implements the database-level operations of :class:`Server` on top of ``dsn()``."""

    # PostgreSQL 15's default copy (WAL_LOG) writes every block of the template into
    # the WAL: cheap for the server's other sessions, but several times the CPU of a
    # file copy for the small databases tests make by the hundred. FILE_COPY
    # checkpoints instead, which costs little where fsync is off (the harness's own
    # servers) and is left alone on servers the harness does not own.
    _copy_by_file = False

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        raise NotImplementedError

    @property
    def admin_dsn(self) -> str:
        return self.dsn()

    def _connect(self, dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
        # Autocommit: CREATE/DROP DATABASE and ROLLBACK PREPARED refuse transaction blocks.
        return psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT)

    def execute_admin(
        self, query: Query, params: Params | None = None, *, dbname: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the admin user (autocommit); return its rows, if any."""
        dsn = self.admin_dsn if dbname is None else self.dsn(dbname)
        with self._connect(dsn) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (random ``t_<hex>`` name by default), a copy of ``template``
        if given, and return its DSN."""
        name = name or f"t_{secrets.token_hex(6)}"
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
        with self._connect(self.admin_dsn) as conn:
            if self._copy_by_file and conn.info.server_version >= 150000:
                create = sql.SQL("{} STRATEGY FILE_COPY").format(create)
            conn.execute(create)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, first rolling back its prepared transactions.

        Prepared transactions outlive their sessions and block DROP DATABASE (even
        WITH (FORCE)), so a test that leaves one behind would otherwise leak the database.
        One connection does it all unless some are prepared: every test drops its
        databases, so this is on the path of the whole suite.
        """
        with self._connect(self.admin_dsn) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            if conn.info.server_version >= 130000:
                drop = sql.SQL("{} WITH (FORCE)").format(drop)
            for attempt in range(3):
                row = conn.execute(
                    "SELECT EXISTS (SELECT FROM pg_database WHERE datname = %s), "
                    "EXISTS (SELECT FROM pg_prepared_xacts WHERE database = %s)",
                    [name, name],
                ).fetchone()
                assert row is not None
                exists, prepared = row
                if not exists:
                    return
                if prepared:  # pg_prepared_xacts lists every database's
                    self._rollback_prepared(name)
                try:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        [name],
                    )
                    conn.execute(drop)
                    return
                except psycopg.errors.ObjectInUse:
                    # A transaction was prepared, or a session connected, in the meantime.
                    if attempt == 2:
                        raise
                    time.sleep(0.2)

    def _rollback_prepared(self, name: str) -> None:
        # ROLLBACK PREPARED only works from a session in the transaction's own database.
        with self._connect(self.dsn(name)) as conn:
            gids = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
            for (gid,) in gids:
                # UndefinedObject: finished concurrently (e.g. by a recovery process): fine.
                with suppress(psycopg.errors.UndefinedObject):
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))

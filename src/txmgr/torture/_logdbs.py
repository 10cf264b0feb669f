"""The log databases of a Paxos-mode bench, as the nemesis and the checker see them.

Each :class:`LogDatabase` is one acceptor: a database on a PostgreSQL server
of its own, behind a fault proxy of its own. The clients and daemons reach it
through the proxy; the harness reads it directly, as the bench's role, and
administers it as the server's superuser — to drop and re-create it empty
(:meth:`LogDatabase.recreate`): a wiped acceptor comes back with a new
incarnation and none of its old rows, never restored from anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from txmgr._migrate import migrate
from txmgr.paxos import PAXOS_GID_PREFIX, PaxosGid
from txmgr.testing import PgServer
from txmgr.testing.proxy import FaultProxy

__all__ = ["LogDatabase", "in_doubt"]

_TIMEOUT = 5  # connect_timeout of the harness's direct connections


@dataclass
class LogDatabase:
    """One Paxos log database of the bench."""

    index: int
    server: PgServer
    proxy: FaultProxy
    dbname: str
    role: str
    direct: str  # as the bench's role, no proxy

    def _query(self, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct, autocommit=True, connect_timeout=_TIMEOUT) as conn:
            return conn.execute(query.encode()).fetchall()

    def incarnation(self) -> str:
        """The acceptor's incarnation (raises psycopg.Error while it is down)."""
        rows = self._query("SELECT incarnation FROM txmgr_paxos_acceptor")
        return str(rows[0][0])

    def slot_count(self) -> int:
        """How many transaction slots the acceptor holds now."""
        return int(self._query("SELECT count(*) FROM txmgr_paxos")[0][0])

    def terminate_sessions(self) -> int:
        """End every session of the bench's role in this database; how many there were."""
        rows = self.server.execute_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND usename = %s AND pid <> pg_backend_pid()",
            [self.dbname, self.role],
        )
        return len(rows)

    def recreate(self) -> None:
        """Drop the database (ending its sessions), create it empty and migrate it."""
        self.server.drop_database(self.dbname)  # WITH (FORCE): its sessions end
        self.server.execute_admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(self.dbname), sql.Identifier(self.role)))
        migrate(self.direct)


def in_doubt(participant_dsns: Sequence[str]) -> dict[str, PaxosGid]:
    """The Paxos-mode branches prepared on the participants now, by txid (one gid each)."""
    found: dict[str, PaxosGid] = {}
    for dsn in participant_dsns:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=_TIMEOUT) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE starts_with(gid, %s)",
                (PAXOS_GID_PREFIX,),
            ).fetchall()
        for (gid,) in rows:
            parsed = PaxosGid.parse(str(gid))
            if parsed is not None:
                found.setdefault(parsed.txid, parsed)
    return found

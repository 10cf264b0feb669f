"""The SQLAlchemy dialect for txmgr branches: psycopg's, minus ending or closing connections.

Every DBAPI connection this dialect sees is a txmgr branch connection that
txmgr opened, pools and ends. SQLAlchemy reaches the connection's lifecycle
only through the dialect's ``do_*`` methods, so this is the one place that
guarantees, whatever the application or SQLAlchemy's internals do:

- ``do_close`` / ``do_terminate`` never close it (the connection goes back to
  txmgr's pool, not SQLAlchemy's);
- ``do_commit`` never commits one branch alone: it raises;
- ``do_rollback`` never rolls one branch back alone: it raises, unless it runs
  while an exception propagates (SQLAlchemy's own cleanup after a failed
  flush, which must not hide that failure);
- after either, SQLAlchemy's view of the branch no longer matches the server,
  so the branch is marked rolled back and the whole global transaction rolls
  back when its block ends, even if the application swallowed the error;
- the isolation level and two-phase methods are refused.

Savepoints go through unchanged (``begin_nested()``).
"""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import PoolProxiedConnection

from txmgr.errors import TransactionStateError
from txmgr.sqlalchemy._state import INFO_KEY, BranchState, refuse

__all__ = ["DRIVER_NAME", "BranchDialect", "branch_state"]

#: URL drivername of engines on txmgr branches (``postgresql+txmgr://``).
DRIVER_NAME = "postgresql+txmgr"


def branch_state(conn: PoolProxiedConnection) -> BranchState | None:
    """The branch of a pooled connection (None while SQLAlchemy initializes the dialect)."""
    info = conn.record_info  # (``info`` is not available during initialization)
    state = info.get(INFO_KEY) if info is not None else None
    return state if isinstance(state, BranchState) else None


class BranchDialect(PGDialect_psycopg):
    """PostgreSQL over psycopg 3, on connections owned by txmgr."""

    # SQLAlchemy only caches compiled SQL for dialects that say so themselves.
    supports_statement_cache = True

    def on_connect(self) -> None:
        # SQLAlchemy would add a notice handler each time it "connects", i.e.
        # once per transaction, to a connection that lives on in txmgr's pool.
        return None

    def do_close(self, dbapi_connection: DBAPIConnection) -> None:
        """txmgr releases the connection itself when the transaction ends."""

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        """As do_close: a broken branch is txmgr's to discard."""

    def do_commit(self, dbapi_connection: PoolProxiedConnection) -> None:
        state = branch_state(dbapi_connection)
        name = state.participant if state is not None else "?"
        if state is not None and state.open:
            # SQLAlchemy keeps a transaction whose commit failed until it is
            # rolled back: this Connection is unusable for the rest of the block.
            state.mark_rolled_back(
                "Connection.commit() was refused, and SQLAlchemy needs a rollback before "
                "using that Connection again", None,
            )
        raise refuse(
            "Connection.commit()", name,
            "the whole transaction will roll back when the block ends; call flush() to "
            "write pending ORM changes now, or use begin_nested() for a savepoint",
        )

    def do_rollback(self, dbapi_connection: PoolProxiedConnection) -> None:
        state = branch_state(dbapi_connection)
        if state is None or not state.open:
            return  # dialect initialization, or txmgr's own cleanup: nothing to undo
        in_flight = sys.exception()
        state.mark_rolled_back(
            "SQLAlchemy rolled back its transaction on this branch (Connection.rollback(), "
            "closing the Connection, or cleaning up after a failed flush)",
            in_flight,
        )
        if in_flight is None:
            raise refuse(
                "rolling back (Connection.rollback() or closing the Connection)",
                state.participant,
                "the whole transaction will roll back when the block ends; raise an "
                "exception to roll back now, or use begin_nested() for a savepoint",
            )

    def set_isolation_level(self, dbapi_connection: DBAPIConnection, level: str) -> None:
        raise TransactionStateError(
            f"cannot set isolation level {level!r} on a txmgr branch: its transaction is "
            "already running; set default_transaction_isolation on the participant's role "
            "or database instead"
        )

    # SQLAlchemy's own two-phase commit (Connection.begin_twophase(),
    # Session(twophase=True)) would end the branch behind txmgr's back.
    def do_begin_twophase(self, connection: Any, xid: Any) -> None:
        raise _refuse_twophase(connection)

    def do_prepare_twophase(self, connection: Any, xid: Any) -> None:
        raise _refuse_twophase(connection)

    def do_commit_twophase(self, connection: Any, xid: Any, *args: Any, **kw: Any) -> None:
        raise _refuse_twophase(connection)

    def do_rollback_twophase(self, connection: Any, xid: Any, *args: Any, **kw: Any) -> None:
        raise _refuse_twophase(connection)


def _refuse_twophase(connection: Any) -> Exception:
    state = branch_state(connection.connection)  # a Connection: its pooled connection
    name = state.participant if state is not None else "?"
    return refuse("SQLAlchemy's two-phase commit", name, "txmgr runs the two-phase commit")


registry.register(DRIVER_NAME.replace("+", "."), __name__, "BranchDialect")

"""The SQLAlchemy dialect for txmgr branches: psycopg's, with txmgr owning the transactions.

Every DBAPI connection this dialect sees is a txmgr branch connection that
txmgr opened, pools and ends. SQLAlchemy reaches the connection's lifecycle
only through the dialect's ``do_*`` methods, so this is the one place that
guarantees, whatever the application or SQLAlchemy's internals do:

- ``do_close`` / ``do_terminate`` never close it (the connection goes back to
  txmgr's pool, not SQLAlchemy's);
- nothing commits one branch alone;
- once txmgr ended the branch, no statement reaches the connection (it may
  already serve another transaction);
- the isolation level cannot change under a running branch.

What SQLAlchemy's commit and rollback mean depends on who drives the branch
(:class:`~txmgr.sqlalchemy._state.BranchState`):

- a transaction block (``owner`` is None): ``do_commit`` raises;
  ``do_rollback`` raises too, unless it runs while an exception propagates
  (SQLAlchemy's own cleanup after a failed flush, which must not hide that
  failure); after either the branch is marked rolled back, and the whole
  global transaction rolls back when its block ends. SQLAlchemy's two-phase
  methods are refused.
- a :class:`~txmgr.sqlalchemy.TwoPhaseSession` (``owner`` set): the session
  runs with ``twophase=True``, so its commit prepares every Connection, then
  commits each with ``is_prepared=True``: the first such commit runs txmgr's
  commit of the whole global transaction, the others find it done. A
  Connection committed by hand (``is_prepared=False``) is refused, and any
  rollback rolls back every branch. The "prepare" step itself does nothing:
  txmgr prepares inside its commit, under its decision log.

Savepoints go through unchanged (``begin_nested()``).
"""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine.default import DefaultDialect, DefaultExecutionContext
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
from sqlalchemy.pool import PoolProxiedConnection

from txmgr.errors import TransactionStateError
from txmgr.sqlalchemy._state import INFO_KEY, BranchState, branch_closed, refuse

__all__ = ["DRIVER_NAME", "BranchDialect", "BranchLifecycle", "branch_state"]

#: URL drivername of engines on txmgr branches (``postgresql+txmgr://``).
DRIVER_NAME = "postgresql+txmgr"

_BLOCK_HINT = (
    "the whole transaction will roll back when the block ends; call flush() to write "
    "pending ORM changes now, or use begin_nested() for a savepoint"
)
_SESSION_HINT = (
    "commit or roll back the session (session.commit(), session.rollback()), which ends "
    "every participant's branch together"
)
_ROLLED_BACK = "; the global transaction was rolled back, call session.rollback() to go on"
_SESSION_ROLLBACK = (
    "SQLAlchemy rolled back the transaction of this participant's Connection "
    "(session.rollback(), Connection.rollback(), closing, or a failed flush)"
)


def branch_state(conn: PoolProxiedConnection | None) -> BranchState | None:
    """The branch of a pooled connection (None while SQLAlchemy initializes the dialect)."""
    info = conn.record_info if conn is not None else None  # (None during initialization)
    state = info.get(INFO_KEY) if info is not None else None
    return state if isinstance(state, BranchState) else None


def _context_state(context: ExecutionContext | None) -> BranchState | None:
    if not isinstance(context, DefaultExecutionContext):
        return None
    return branch_state(context.root_connection.connection)


class BranchLifecycle(DefaultDialect):
    """The transaction rules of txmgr branches, over any DBAPI dialect.

    A mixin (put it before the DBAPI dialect's class) so that an asyncio
    dialect can reuse the same rules.
    """

    # -- statements: never on a branch txmgr already ended ---------------------

    def do_execute(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        _check_open(_context_state(context))
        super().do_execute(cursor, statement, parameters, context)  # type: ignore[no-untyped-call]

    def do_executemany(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        _check_open(_context_state(context))
        super().do_executemany(cursor, statement, parameters, context)  # type: ignore[no-untyped-call]

    def do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext | None = None
    ) -> None:
        _check_open(_context_state(context))
        super().do_execute_no_params(cursor, statement, context)  # type: ignore[no-untyped-call]

    def do_rollback_to_savepoint(self, connection: Any, name: str) -> None:
        state = branch_state(connection.connection)
        if state is not None and not state.open:
            return  # the whole branch is rolled back already
        super().do_rollback_to_savepoint(connection, name)  # type: ignore[no-untyped-call]

    # -- the connection's lifecycle belongs to txmgr ---------------------------

    def do_close(self, dbapi_connection: DBAPIConnection) -> None:
        """txmgr releases the connection itself when the transaction ends."""

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        """As do_close: a broken branch is txmgr's to discard."""

    def do_begin(self, dbapi_connection: PoolProxiedConnection) -> None:
        state = branch_state(dbapi_connection)
        if state is not None:
            _check_open(state)
            if state.owner is not None:
                # The session begins its Connections with begin_twophase(); a
                # plain begin is SQL on a Connection whose transaction was ended
                # by hand, or on a Connection the session does not know.
                raise TransactionStateError(
                    f"this Connection to participant {state.participant!r} belongs to a "
                    "TwoPhaseSession and runs only inside the session's transaction: use "
                    "session.connection() or session.execute(), and do not end its "
                    "transaction by hand"
                )
        super().do_begin(dbapi_connection)  # type: ignore[no-untyped-call]

    def do_commit(self, dbapi_connection: PoolProxiedConnection) -> None:
        state = branch_state(dbapi_connection)
        name = state.participant if state is not None else "?"
        if state is not None and state.owner is not None:
            state.owner.rollback_all("Connection.commit() was refused", None)
            raise refuse("Connection.commit()", name, _SESSION_HINT + _ROLLED_BACK)
        if state is not None and state.open:
            # SQLAlchemy keeps a transaction whose commit failed until it is
            # rolled back: this Connection is unusable for the rest of the block.
            state.mark_rolled_back(
                "Connection.commit() was refused, and SQLAlchemy needs a rollback before "
                "using that Connection again", None,
            )
        raise refuse("Connection.commit()", name, _BLOCK_HINT)

    def do_rollback(self, dbapi_connection: PoolProxiedConnection) -> None:
        state = branch_state(dbapi_connection)
        if state is None or not state.open:
            return  # dialect initialization, or txmgr's own cleanup: nothing to undo
        in_flight = sys.exception()
        if state.owner is not None:
            state.owner.rollback_all(_SESSION_ROLLBACK, in_flight)
            return
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

    # -- SQLAlchemy's two-phase commit: the session's commit, or refused --------

    def do_begin_twophase(self, connection: Any, xid: Any) -> None:
        state = _session_state(connection, "SQLAlchemy's two-phase commit")
        _check_open(state)  # txmgr began the branch already

    def do_prepare_twophase(self, connection: Any, xid: Any) -> None:
        state = _session_state(connection, "SQLAlchemy's two-phase commit")
        _check_open(state)  # txmgr prepares inside the commit, under its decision log

    def do_commit_twophase(
        self, connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False
    ) -> None:
        state = _session_state(connection, "SQLAlchemy's two-phase commit")
        assert state.owner is not None
        if recover:  # Connection.commit_prepared(): not a transaction of this session
            raise refuse("Connection.commit_prepared()", state.participant, _SESSION_HINT)
        if not is_prepared:
            # Connection.commit() by hand: the session always prepares first.
            # SQLAlchemy now considers that Connection's transaction over.
            state.owner.rollback_all("Connection.commit() was refused", None)
            raise refuse("Connection.commit()", state.participant, _SESSION_HINT + _ROLLED_BACK)
        state.owner.commit_all()

    def do_rollback_twophase(
        self, connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False
    ) -> None:
        state = _session_state(connection, "SQLAlchemy's two-phase rollback")
        assert state.owner is not None
        if recover:
            raise refuse("Connection.rollback_prepared()", state.participant, _SESSION_HINT)
        state.owner.rollback_all(_SESSION_ROLLBACK, sys.exception())


def _check_open(state: BranchState | None) -> None:
    if state is not None and not state.open:
        raise branch_closed(state)


def _session_state(connection: Any, what: str) -> BranchState:
    """The state of a session-driven branch; anything else refuses SQLAlchemy's 2PC
    (Connection.begin_twophase() would end the branch behind txmgr's back)."""
    state = branch_state(connection.connection)  # a Connection: its pooled connection
    if state is None or state.owner is None:
        name = state.participant if state is not None else "?"
        raise refuse(what, name, "txmgr runs the two-phase commit")
    return state


class BranchDialect(BranchLifecycle, PGDialect_psycopg):
    """PostgreSQL over psycopg 3, on connections owned by txmgr."""

    # SQLAlchemy only caches compiled SQL for dialects that say so themselves.
    supports_statement_cache = True

    def on_connect(self) -> None:
        # SQLAlchemy would add a notice handler each time it "connects", i.e.
        # once per transaction, to a connection that lives on in txmgr's pool.
        return None


registry.register(DRIVER_NAME.replace("+", "."), __name__, "BranchDialect")

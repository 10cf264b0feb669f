"""One Engine per participant, whose pool hands out the current branch connection.

Dialect initialization (server version, schema, type checks) costs round trips,
so an Engine lives as long as its :class:`~txmgr.sqlalchemy.SQLAlchemy` and
serves every transaction and session. Its ``NullPool`` never keeps a
connection: each ``connect()`` takes the psycopg connection that the caller
put in a context variable (:func:`attach`), and its "close" is the dialect's
no-op: the connection stays in its branch, then goes back to txmgr's pool when
txmgr ends the transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, cast

import psycopg
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from txmgr.errors import TransactionStateError
from txmgr.sqlalchemy._aio_dialect import ASYNC_DRIVER_NAME
from txmgr.sqlalchemy._dialect import DRIVER_NAME
from txmgr.sqlalchemy._state import INFO_KEY, BranchState

__all__ = ["ENGINE_OPTIONS", "attach", "connect_branch", "create_branch_engine"]

#: create_engine() options that make sense for connections txmgr owns. Pool,
#: connect and isolation options do not (txmgr made and pools the connections),
#: nor do psycopg adapter options (SQLAlchemy applies them when it connects).
ENGINE_OPTIONS = frozenset({
    "echo", "echo_pool", "enable_from_linting", "execution_options", "hide_parameters",
    "insertmanyvalues_page_size", "label_length", "logging_name", "pool_logging_name",
    "query_cache_size", "use_insertmanyvalues",
})

#: A branch's psycopg connection: sync, or async under an asyncio session.
AnyConnection = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]

# The branch connection being wrapped by attach(), in this thread (or greenlet).
_handout: ContextVar[AnyConnection | None] = ContextVar("txmgr_sqlalchemy_handout", default=None)


def _handed_out() -> AnyConnection:
    conn = _handout.get()
    if conn is None:
        raise TransactionStateError(
            "this Engine only runs inside txmgr transactions: use tx.connection(name) or "
            "tx.session(name) of a txmgr.sqlalchemy transaction, or a TwoPhaseSession"
        )
    return conn


def _creator() -> DBAPIConnection:
    return cast(DBAPIConnection, _handed_out())


def _async_creator() -> Awaitable[AnyConnection]:
    # SQLAlchemy's async psycopg DBAPI awaits what this returns (inside its
    # greenlet) and wraps it in its adapter; the connection is taken here, in
    # the greenlet that called attach(), not later on the event loop.
    conn = _handed_out()

    async def ready() -> AnyConnection:
        return conn

    return ready()


def _on_invalidate(
    dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, error: BaseException | None
) -> None:
    # SQLAlchemy drops an invalidated connection and its transaction with it
    # (and skips the rollback it would otherwise send through the dialect).
    info = record.record_info
    state = info.get(INFO_KEY) if info is not None else None
    if not isinstance(state, BranchState) or not state.open:
        return
    why = (
        "SQLAlchemy invalidated the connection (Session.invalidate(), "
        "Connection.invalidate() or a lost connection)"
    )
    if state.owner is not None:
        state.owner.rollback_all(why, error)
    else:
        state.mark_rolled_back(why, error)


def create_branch_engine(
    options: Mapping[str, Any], url: URL | None = None, *, is_async: bool = False
) -> Engine:
    """An Engine for one participant. ``options`` are create_engine() options that
    were checked by the caller; ``url`` (without password: see
    ``_binding.display_url``) only names the database in logs and ``repr()``, its
    driver is replaced: txmgr makes the connections.

    ``is_async``: the sync face (``AsyncEngine.sync_engine``) of an asyncio
    Engine, whose connections are async branch connections (the dialect of
    :mod:`txmgr.sqlalchemy._aio_dialect`), for SQLAlchemy's AsyncSession.
    """
    driver = ASYNC_DRIVER_NAME if is_async else DRIVER_NAME
    common: dict[str, Any] = {
        "poolclass": NullPool,
        "pool_reset_on_return": None,  # txmgr ends the transaction, not a checkin
        # Native hstore registers its adapter on the first connection only (the
        # others would get it as connect() arguments, which txmgr's pool never
        # sees), so results would differ between connections.
        "use_native_hstore": False,
    }
    target = url.set(drivername=driver) if url is not None else f"{driver}://"
    if is_async:
        # Imported here: SQLAlchemy's asyncio needs greenlet, the sync side does not.
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(
            target, async_creator=_async_creator, **common, **options
        ).sync_engine
    else:
        engine = create_engine(target, creator=_creator, **common, **options)
    event.listen(engine, "invalidate", _on_invalidate)
    return engine


def attach(
    connect: Callable[[], Connection], conn: AnyConnection, state: BranchState
) -> Connection:
    """A SQLAlchemy Connection made by ``connect()`` (an Engine's) on the branch
    connection ``conn``, tagged with ``state`` for the dialect."""
    token = _handout.set(conn)
    try:
        sa_conn = connect()
    finally:
        _handout.reset(token)
    # The pool entry lives as long as this checkout (NullPool), and the dialect
    # receives it with every call: that is how it finds the branch.
    record_info = sa_conn.connection.record_info
    assert record_info is not None  # not detached
    record_info[INFO_KEY] = state
    return sa_conn


def connect_branch(engine: Engine, conn: psycopg.Connection[Any], state: BranchState) -> Connection:
    """A SQLAlchemy Connection on ``conn``, inside an SQLAlchemy transaction standing for the
    branch (so that sessions join it instead of beginning their own)."""
    sa_conn = attach(engine.connect, conn, state)
    try:
        sa_conn.begin()  # no round trip: psycopg's do_begin is a no-op
    except BaseException:
        state.open = False
        sa_conn.close()
        raise
    return sa_conn

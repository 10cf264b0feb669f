"""The psycopg connection classes handed to applications inside a branch.

:class:`BranchConnection` (sync) and :class:`AsyncBranchConnection` are
ordinary psycopg connections except that, while it belongs to a
global transaction, it refuses to end that transaction by itself: ``commit()``,
``rollback()``, setting ``autocommit``, the ``tpc_*`` methods and SQL
``COMMIT``/``ROLLBACK``/``END``/``ABORT``/``PREPARE TRANSACTION`` raise
:class:`~txmgr.errors.ManualTransactionControl` *before* anything reaches the
server, so a branch can never be half-committed by hand. Savepoints
(``conn.transaction()``, ``SAVEPOINT``/``ROLLBACK TO``) keep working.

Pooled connections are in psycopg's autocommit mode and txmgr opens the
branch with an explicit ``BEGIN``: the server is inside a transaction block
for the whole branch, psycopg never begins or ends one on its own.

The guard is one piece of logic (:class:`_Guard` and :func:`_check_statement`)
that the sync and the async classes call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeAlias

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from txmgr._sqlscan import role_change_statement, transaction_control_statement
from txmgr.errors import ManualTransactionControl, RoleChangeInBranch, TransactionTimeout

__all__ = [
    "AnyBranchConnection",
    "AsyncBranchConnection",
    "AsyncBranchCursor",
    "BranchConnection",
    "BranchCursor",
]


def _refuse(what: str, participant: str | None) -> ManualTransactionControl:
    return ManualTransactionControl(
        f"{what} on the branch connection of participant {participant!r} is not allowed: "
        "txmgr commits or rolls back every branch together when the transaction block "
        "ends; raise an exception inside the block to roll back, or use savepoints "
        "(conn.transaction()) for partial rollback"
    )


class _Guard:
    """The branch marker of a connection, and the refusal while it is set."""

    # The participant whose branch this connection carries, or None while it
    # sits in the pool or is driven by txmgr itself (then nothing is refused).
    _txmgr_branch: str | None = None
    # (time.monotonic() deadline, txid, timeout) of the branch's transaction, if
    # it has one: past it, no statement is sent any more.
    _txmgr_deadline: tuple[float, str, float] | None = None

    def _txmgr_guard(self, what: str) -> None:
        if self._txmgr_branch is not None:
            raise _refuse(what, self._txmgr_branch)


def _check_statement(conn: psycopg.BaseConnection[Any], query: Any) -> None:
    """Refuse ``query`` when it ends the transaction of ``conn``'s branch."""
    branch = getattr(conn, "_txmgr_branch", None)
    if branch is None:
        return
    deadline = getattr(conn, "_txmgr_deadline", None)
    if deadline is not None and time.monotonic() >= deadline[0]:
        raise TransactionTimeout(
            f"transaction {deadline[1]}: its deadline of {deadline[2]:g}s has passed, so no "
            f"more statements are sent to {branch!r}; the transaction is rolled back",
            txid=deadline[1], timeout=deadline[2],
        )
    if isinstance(query, sql.Composable):
        text = query.as_string(conn)
    elif isinstance(query, bytes | bytearray | memoryview):
        text = bytes(query).decode("utf-8", "replace")
    elif isinstance(query, str):
        text = query
    else:  # a template string: its literal parts decide
        text = " ".join(s for s in getattr(query, "strings", ()) if isinstance(s, str))
    standard = conn.info.parameter_status("standard_conforming_strings") != "off"
    stmt = transaction_control_statement(text, standard_strings=standard)
    if stmt is not None:
        raise _refuse(f"SQL {stmt}", branch)
    stmt = role_change_statement(text, standard_strings=standard)
    if stmt is not None:
        # The branch would be prepared as that role, and only it (or a
        # superuser) could commit it: neither this session nor recovery.
        raise RoleChangeInBranch(
            f"SQL {stmt} on the branch connection of participant {branch!r} is not allowed: "
            "PostgreSQL lets only the role that prepared a branch finish it, so txmgr and "
            "recovery could not commit it; connect as that role instead (the user in "
            f"{branch!r}'s DSN), or use a participant of its own for it"
        )


class BranchConnection(_Guard, psycopg.Connection[TupleRow]):
    """A pooled participant connection; guarded while it belongs to a branch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = BranchCursor

    def commit(self) -> None:
        self._txmgr_guard("commit()")
        super().commit()

    def rollback(self) -> None:
        self._txmgr_guard("rollback()")
        super().rollback()

    def set_autocommit(self, value: bool) -> None:
        self._txmgr_guard("setting autocommit")
        super().set_autocommit(value)

    def tpc_begin(self, xid: Any) -> None:
        self._txmgr_guard("tpc_begin()")
        super().tpc_begin(xid)

    def tpc_prepare(self) -> None:
        self._txmgr_guard("tpc_prepare()")
        super().tpc_prepare()


class BranchCursor(psycopg.Cursor[Any]):
    """A cursor that refuses transaction-ending SQL inside a branch."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _check_statement(self.connection, query)
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        _check_statement(self.connection, query)
        super().executemany(query, params_seq, **kwargs)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        _check_statement(self.connection, query)
        return super().stream(query, params, **kwargs)


class AsyncBranchConnection(_Guard, psycopg.AsyncConnection[TupleRow]):
    """The async twin of :class:`BranchConnection`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = AsyncBranchCursor

    async def commit(self) -> None:
        self._txmgr_guard("commit()")
        await super().commit()

    async def rollback(self) -> None:
        self._txmgr_guard("rollback()")
        await super().rollback()

    async def set_autocommit(self, value: bool) -> None:
        self._txmgr_guard("setting autocommit")
        await super().set_autocommit(value)

    async def tpc_begin(self, xid: Any) -> None:
        self._txmgr_guard("tpc_begin()")
        await super().tpc_begin(xid)

    async def tpc_prepare(self) -> None:
        self._txmgr_guard("tpc_prepare()")
        await super().tpc_prepare()


class AsyncBranchCursor(psycopg.AsyncCursor[Any]):
    """The async twin of :class:`BranchCursor`."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _check_statement(self.connection, query)
        return await super().execute(query, params, **kwargs)

    async def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        _check_statement(self.connection, query)
        await super().executemany(query, params_seq, **kwargs)

    async def stream(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        _check_statement(self.connection, query)
        async for row in super().stream(query, params, **kwargs):
            yield row


#: The branch connection of either front end (what the protocol drives).
AnyBranchConnection: TypeAlias = BranchConnection | AsyncBranchConnection

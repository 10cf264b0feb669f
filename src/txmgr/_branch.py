"""The psycopg connection class handed to applications inside a branch.

It is an ordinary ``psycopg.Connection`` except that, while it belongs to a
global transaction, it refuses to end that transaction by itself: ``commit()``,
``rollback()``, setting ``autocommit``, the ``tpc_*`` methods and SQL
``COMMIT``/``ROLLBACK``/``END``/``ABORT``/``PREPARE TRANSACTION`` raise
:class:`~txmgr.errors.ManualTransactionControl` *before* anything reaches the
server, so a branch can never be half-committed by hand. Savepoints
(``conn.transaction()``, ``SAVEPOINT``/``ROLLBACK TO``) keep working.

Pooled connections are in psycopg's autocommit mode and txmgr opens the
branch with an explicit ``BEGIN``: the server is inside a transaction block
for the whole branch, psycopg never begins or ends one on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from txmgr._sqlscan import transaction_control_statement
from txmgr.errors import ManualTransactionControl

__all__ = ["BranchConnection", "BranchCursor"]


def _refuse(what: str, participant: str | None) -> ManualTransactionControl:
    return ManualTransactionControl(
        f"{what} on the branch connection of participant {participant!r} is not allowed: "
        "txmgr commits or rolls back every branch together when the transaction block "
        "ends; raise an exception inside the block to roll back, or use savepoints "
        "(conn.transaction()) for partial rollback"
    )


class BranchConnection(psycopg.Connection[TupleRow]):
    """A pooled participant connection; guarded while it belongs to a branch."""

    # The participant whose branch this connection carries, or None while it
    # sits in the pool or is driven by txmgr itself (then nothing is refused).
    _txmgr_branch: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = BranchCursor

    def commit(self) -> None:
        if self._txmgr_branch is not None:
            raise _refuse("commit()", self._txmgr_branch)
        super().commit()

    def rollback(self) -> None:
        if self._txmgr_branch is not None:
            raise _refuse("rollback()", self._txmgr_branch)
        super().rollback()

    def set_autocommit(self, value: bool) -> None:
        if self._txmgr_branch is not None:
            raise _refuse("setting autocommit", self._txmgr_branch)
        super().set_autocommit(value)

    def tpc_begin(self, xid: Any) -> None:
        if self._txmgr_branch is not None:
            raise _refuse("tpc_begin()", self._txmgr_branch)
        super().tpc_begin(xid)

    def tpc_prepare(self) -> None:
        if self._txmgr_branch is not None:
            raise _refuse("tpc_prepare()", self._txmgr_branch)
        super().tpc_prepare()


class BranchCursor(psycopg.Cursor[Any]):
    """A cursor that refuses transaction-ending SQL inside a branch."""

    def _txmgr_check(self, query: Any) -> None:
        conn = self.connection
        branch = getattr(conn, "_txmgr_branch", None)
        if branch is None:
            return
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

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        self._txmgr_check(query)
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        self._txmgr_check(query)
        super().executemany(query, params_seq, **kwargs)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        self._txmgr_check(query)
        return super().stream(query, params, **kwargs)

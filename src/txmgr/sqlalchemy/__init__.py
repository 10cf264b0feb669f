"""SQLAlchemy 2 (Core and ORM) inside txmgr global transactions.

::

    from sqlalchemy import update
    from txmgr.sqlalchemy import SQLAlchemy

    db = SQLAlchemy(tm)                        # once, next to the TransactionManager
    with db.transaction() as tx:
        tx.session("orders").add(Order(id=7, total=40))
        tx.connection("billing").execute(
            update(accounts).where(accounts.c.id == 3).values(balance=accounts.c.balance - 40)
        )
    # leaving the block flushes the sessions, then commits both branches atomically

``tx.connection(name)`` and ``tx.session(name)`` run on the branch's own
psycopg connection (``tx.raw_connection(name)``), so everything they do is
part of the prepared branch. See the README, section "SQLAlchemy", for the rules.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Engine

from txmgr.errors import ConfigError
from txmgr.manager import TransactionManager
from txmgr.sqlalchemy._engine import ENGINE_OPTIONS, create_branch_engine
from txmgr.sqlalchemy._session import BranchSession
from txmgr.sqlalchemy._transaction import SQLAlchemyTransaction

__all__ = ["ENGINE_OPTIONS", "BranchSession", "SQLAlchemy", "SQLAlchemyTransaction"]

# Session options txmgr sets itself: the session is bound to the branch, joins
# its transaction, and must begin on its own (begin() is refused).
_RESERVED_SESSION_OPTIONS = frozenset({
    "autobegin", "bind", "binds", "join_transaction_mode", "twophase",
})


class SQLAlchemy:
    """SQLAlchemy access to a :class:`~txmgr.TransactionManager`'s participants.

    Create one per manager and share it between threads. It keeps one
    :class:`~sqlalchemy.engine.Engine` per participant, made on first use and
    reused by every transaction. ``engine_options`` go to ``create_engine()``
    (only those in :data:`ENGINE_OPTIONS`, e.g. ``echo=True``);
    ``session_options`` to every :class:`BranchSession` (e.g.
    ``{"autoflush": False}``).
    """

    def __init__(
        self,
        tm: TransactionManager,
        *,
        session_options: Mapping[str, Any] | None = None,
        **engine_options: Any,
    ) -> None:
        session_options = dict(session_options or {})
        reserved = sorted(_RESERVED_SESSION_OPTIONS & set(session_options))
        if reserved:
            raise ConfigError(
                f"session option(s) {reserved} are set by txmgr: sessions are bound to "
                "their branch and join its transaction"
            )
        unknown = sorted(set(engine_options) - ENGINE_OPTIONS)
        if unknown:
            raise ConfigError(
                f"create_engine() option(s) {unknown} cannot be used with txmgr branches: "
                "txmgr makes, pools and configures their connections (set connection "
                "parameters in the participant's DSN); allowed: "
                + ", ".join(sorted(ENGINE_OPTIONS))
            )
        self._tm = tm
        self._session_options = session_options
        self._engine_options = engine_options
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLAlchemy({self._tm!r})"

    def engine(self, name: str) -> Engine:
        """Participant ``name``'s Engine. It only connects inside :meth:`transaction`."""
        engine = self._engines.get(name)
        if engine is None:
            self._tm.participant(name)  # UnknownParticipant before building anything
            with self._lock:
                engine = self._engines.get(name)
                if engine is None:
                    engine = self._engines[name] = create_branch_engine(self._engine_options)
        return engine

    def transaction(self) -> SQLAlchemyTransaction:
        """A new global transaction with SQLAlchemy access; use it as a context manager."""
        return SQLAlchemyTransaction(self._tm.transaction(), self.engine, self._session_options)

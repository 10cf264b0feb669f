"""``SQLAlchemy(tm)``: the participants' Engines, shared by transaction blocks and sessions."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import orm
from sqlalchemy.engine import URL, Engine

from txmgr.errors import ConfigError
from txmgr.manager import TransactionManager
from txmgr.sqlalchemy._binding import branch_url, engine_settings, participant_binds
from txmgr.sqlalchemy._engine import ENGINE_OPTIONS, create_branch_engine
from txmgr.sqlalchemy._transaction import SQLAlchemyTransaction
from txmgr.sqlalchemy._twophase import TwoPhaseSession

__all__ = ["SQLAlchemy", "sessionmaker"]

# Session options txmgr sets itself for transaction blocks: the session is
# bound to the branch, joins its transaction, and must begin on its own.
_RESERVED_SESSION_OPTIONS = frozenset({
    "autobegin", "bind", "binds", "join_transaction_mode", "twophase",
})


class SQLAlchemy:
    """SQLAlchemy access to a :class:`~txmgr.TransactionManager`'s participants.

    Create one per manager and share it between threads. It keeps one
    :class:`~sqlalchemy.engine.Engine` per participant, made on first use and
    reused by every transaction and session.

    ``engines`` maps participant names to the application's own Engines
    (``create_engine("postgresql+psycopg://…")``): each must point at the
    participant's database (same host, port, database and user as its DSN),
    and its options (``echo``, ``execution_options``, …) carry over to the
    participant's Engine — txmgr still makes the connections. ``engine_options``
    go to ``create_engine()`` for every participant (only those in
    :data:`ENGINE_OPTIONS`, e.g. ``echo=True``), over those of ``engines``;
    ``session_options`` to every :class:`BranchSession` of :meth:`transaction`.
    """

    def __init__(
        self,
        tm: TransactionManager,
        *,
        engines: Mapping[str, Engine] | None = None,
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
        dsns = tm.config.participants
        self._participants = frozenset(dsns)
        # Checked now, so that a wrong engine fails at startup, not at first use.
        self._settings: dict[str, tuple[dict[str, Any], URL | None]] = {}
        for name, engine in (engines or {}).items():
            if name not in dsns:
                tm.participant(name)  # raises UnknownParticipant
            self._settings[name] = engine_settings(name, engine, dsns[name])
        self._session_options = session_options
        self._engine_options = engine_options
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLAlchemy({self._tm!r})"

    @property
    def manager(self) -> TransactionManager:
        """The TransactionManager whose participants this serves."""
        return self._tm

    @property
    def participants(self) -> frozenset[str]:
        """The participant names."""
        return self._participants

    def engine(self, name: str) -> Engine:
        """Participant ``name``'s Engine. It connects only for txmgr's transactions and sessions."""
        engine = self._engines.get(name)
        if engine is None:
            self._tm.participant(name)  # UnknownParticipant before building anything
            with self._lock:
                engine = self._engines.get(name)
                if engine is None:
                    engine = self._engines[name] = self._create_engine(name)
        return engine

    def transaction(self, *, timeout: float | None = None) -> SQLAlchemyTransaction:
        """A new global transaction with SQLAlchemy access; use it as a context manager.
        ``timeout``: as :meth:`txmgr.TransactionManager.transaction`."""
        return SQLAlchemyTransaction(
            self._tm.transaction(timeout=timeout), self.engine, self._session_options
        )

    def sessionmaker(
        self,
        *,
        binds: Mapping[Any, str] | None = None,
        bind: str | None = None,
        class_: type[TwoPhaseSession] = TwoPhaseSession,
        **session_options: Any,
    ) -> orm.sessionmaker[TwoPhaseSession]:
        """A ``sqlalchemy.orm.sessionmaker`` of :class:`TwoPhaseSession` on these participants.

        ``binds`` maps mapped classes or tables to participant names, ``bind``
        names the default participant; ``session_options`` are SQLAlchemy's.
        """
        participant_binds(binds, bind, self._participants)  # fail now, not at first Session()
        kw: dict[str, Any] = {"db": self, "binds": dict(binds or {}), "bind": bind}
        return orm.sessionmaker(class_=class_, **kw, **session_options)

    def _create_engine(self, name: str) -> Engine:
        options, url = self._settings.get(name, ({}, None))
        if url is None:
            url = branch_url(self._tm.config.participants[name])
        return create_branch_engine({**options, **self._engine_options}, url)


def sessionmaker(
    tm: TransactionManager,
    *,
    engines: Mapping[str, Engine] | None = None,
    binds: Mapping[Any, str] | None = None,
    bind: str | None = None,
    class_: type[TwoPhaseSession] = TwoPhaseSession,
    **session_options: Any,
) -> orm.sessionmaker[TwoPhaseSession]:
    """A ``sqlalchemy.orm.sessionmaker`` whose sessions commit through ``tm``::

        Session = txmgr.sqlalchemy.sessionmaker(
            tm,
            engines={"orders": orders_engine, "billing": billing_engine},  # optional
            binds={Order: "orders", Invoice: "billing"},
        )
        with Session.begin() as session:
            session.add_all([Order(...), Invoice(...)])
        # committed on both databases atomically, or on neither

    Same as ``SQLAlchemy(tm, engines=engines).sessionmaker(binds=…, bind=…, …)``.
    """
    return SQLAlchemy(tm, engines=engines).sessionmaker(
        binds=binds, bind=bind, class_=class_, **session_options
    )

"""SQLAlchemy's asyncio ORM session over an :class:`~txmgr.AsyncTransactionManager`.

SQLAlchemy's :class:`~sqlalchemy.ext.asyncio.AsyncSession` runs a sync
Session inside a greenlet and awaits the driver's coroutines from there
(``await_()``). So the asyncio session is the sync
:class:`~txmgr.sqlalchemy.TwoPhaseSession`, unchanged, with two differences:

- its Engines are the sync faces of asyncio Engines (dialect
  ``postgresql+txmgr_async``, :mod:`txmgr.sqlalchemy._aio_dialect`) whose
  connections are the async branch connections of an
  :class:`~txmgr.AsyncTransaction`;
- its global transaction drives that AsyncTransaction through
  :class:`_AwaitedTransaction`, which awaits each call in SQLAlchemy's
  greenlet: txmgr's protocol, decision log and errors are the asyncio front
  end's, the session's rules (binds, refusals, rollback of every branch) are
  the sync session's.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import await_only

from txmgr._aio_manager import AsyncTransactionManager
from txmgr._aio_transaction import AsyncTransaction
from txmgr.errors import ConfigError
from txmgr.sqlalchemy._binding import branch_url, engine_settings, participant_binds
from txmgr.sqlalchemy._engine import create_branch_engine
from txmgr.sqlalchemy._twophase import TwoPhaseSession
from txmgr.transaction import TransactionState

__all__ = ["AsyncSQLAlchemy", "AsyncTwoPhaseSession", "async_sessionmaker"]


# Session options txmgr sets itself (the AsyncSession's sync session and its binds).
_RESERVED = frozenset({"sync_session_class", "txmgr_bind", "txmgr_binds"})


class _AwaitedTransaction:
    """An AsyncTransaction as the session's GlobalTransaction uses it: each call
    awaited in SQLAlchemy's greenlet (so only from inside the AsyncSession)."""

    __slots__ = ("inner",)

    def __init__(self, inner: AsyncTransaction) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return repr(self.inner)

    @property
    def txid(self) -> str:
        return self.inner.txid

    @property
    def state(self) -> TransactionState:
        return self.inner.state

    def connection(self, name: str) -> Any:
        return await_only(self.inner.connection(name))

    def commit(self) -> None:
        await_only(self.inner.commit())

    def rollback(self) -> None:
        await_only(self.inner.rollback())


class _AwaitedManager:
    """The AsyncTransactionManager as a source of awaited transactions."""

    __slots__ = ("_atm",)

    def __init__(self, atm: AsyncTransactionManager) -> None:
        self._atm = atm

    def transaction(self) -> _AwaitedTransaction:
        return _AwaitedTransaction(self._atm.transaction())


class AsyncSQLAlchemy:
    """The participants' asyncio Engines of an :class:`~txmgr.AsyncTransactionManager`,
    shared by every session of :func:`async_sessionmaker` (one per manager).

    ``engines`` maps participant names to the application's own
    ``create_async_engine("postgresql+psycopg://…")`` Engines, checked as for
    :class:`~txmgr.sqlalchemy.SQLAlchemy`: same server, database and user as
    the participant's DSN; their options carry over, txmgr makes the connections.
    """

    def __init__(
        self, atm: AsyncTransactionManager, *, engines: Mapping[str, AsyncEngine] | None = None
    ) -> None:
        self._atm = atm
        self._manager = _AwaitedManager(atm)
        dsns = atm.config.participants
        self._participants = frozenset(dsns)
        self._settings: dict[str, tuple[dict[str, Any], URL | None]] = {}
        for name, engine in (engines or {}).items():
            if name not in dsns:
                atm.participant(name)  # raises UnknownParticipant
            if not isinstance(engine, AsyncEngine):
                raise ConfigError(
                    f"engines[{name!r}] must be a sqlalchemy AsyncEngine "
                    f"(create_async_engine('postgresql+psycopg://…')), not "
                    f"{type(engine).__name__}: asyncio sessions run on asyncio engines"
                )
            self._settings[name] = engine_settings(name, engine.sync_engine, dsns[name])
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AsyncSQLAlchemy({self._atm!r})"

    @property
    def manager(self) -> _AwaitedManager:
        """Where the sessions' global transactions come from (awaited in SQLAlchemy's greenlet)."""
        return self._manager

    @property
    def participants(self) -> frozenset[str]:
        """The participant names."""
        return self._participants

    def engine(self, name: str) -> Engine:
        """Participant ``name``'s Engine: the ``sync_engine`` of an asyncio Engine on
        its async branch connections (what a sync Session inside AsyncSession uses)."""
        engine = self._engines.get(name)
        if engine is None:
            self._atm.participant(name)  # UnknownParticipant before building anything
            with self._lock:
                engine = self._engines.get(name)
                if engine is None:
                    options, url = self._settings.get(name, ({}, None))
                    if url is None:
                        url = branch_url(self._atm.config.participants[name])
                    engine = create_branch_engine(options, url, is_async=True)
                    self._engines[name] = engine
        return engine

    def sessionmaker(
        self,
        *,
        binds: Mapping[Any, str] | None = None,
        bind: str | None = None,
        class_: type[AsyncTwoPhaseSession] | None = None,
        **session_options: Any,
    ) -> sa_asyncio.async_sessionmaker[AsyncTwoPhaseSession]:
        """A ``sqlalchemy.ext.asyncio.async_sessionmaker`` of :class:`AsyncTwoPhaseSession`
        on these participants: ``binds``/``bind`` name participants, other options
        are SQLAlchemy's Session options (``expire_on_commit``, …)."""
        reserved = sorted(_RESERVED & set(session_options))
        if reserved:
            raise ConfigError(
                f"session option(s) {reserved} are set by txmgr: its asyncio sessions run a "
                "TwoPhaseSession over participant names (binds={Model: 'name'})"
            )
        participant_binds(binds, bind, self._participants)  # fail now, not at first Session()
        return sa_asyncio.async_sessionmaker(
            class_=class_ or AsyncTwoPhaseSession, db=self, txmgr_binds=dict(binds or {}),
            txmgr_bind=bind, **session_options,
        )


class _GreenletTwoPhaseSession(TwoPhaseSession):
    """The TwoPhaseSession inside an :class:`AsyncTwoPhaseSession` (its ``sync_session``).

    AsyncSession converts its own ``bind``/``binds`` to engines before
    creating this class, so participant names arrive as ``txmgr_bind`` and
    ``txmgr_binds``.
    """

    def __init__(
        self,
        db: AsyncSQLAlchemy,
        *,
        bind: None = None,
        binds: None = None,
        txmgr_bind: str | None = None,
        txmgr_binds: Mapping[Any, str] | None = None,
        **options: Any,
    ) -> None:
        if bind is not None or binds is not None:
            raise ConfigError(
                "bind/binds of an asyncio txmgr session name participants: pass them to "
                "txmgr.sqlalchemy.async_sessionmaker(atm, binds={Model: 'name'})"
            )
        super().__init__(db, bind=txmgr_bind, binds=txmgr_binds, **options)


class AsyncTwoPhaseSession(AsyncSession):
    """SQLAlchemy's :class:`~sqlalchemy.ext.asyncio.AsyncSession` whose commit is
    txmgr's atomic commit over an :class:`~txmgr.AsyncTransactionManager`.

    Everything :class:`~txmgr.sqlalchemy.TwoPhaseSession` says holds, awaited:
    ``await session.commit()`` commits the participants the transaction touched
    (two-phase when two or more wrote) or raises :class:`~txmgr.TransactionAborted`
    / :class:`~txmgr.OutcomeUnknown`; ``await session.rollback()``, ``close()``
    and a failed flush roll every branch back; committing a Connection by hand
    is refused. Made by :func:`txmgr.sqlalchemy.async_sessionmaker`.
    """

    sync_session_class = _GreenletTwoPhaseSession

    @property
    def txmgr_transaction(self) -> AsyncTransaction | None:
        """The txmgr transaction of the session's current transaction (its ``txid`` and
        ``state``), or None while the session has not used any participant in it."""
        tx = self.sync_session.txmgr_transaction if isinstance(
            self.sync_session, TwoPhaseSession) else None
        return tx.inner if isinstance(tx, _AwaitedTransaction) else None


def async_sessionmaker(
    atm: AsyncTransactionManager,
    *,
    engines: Mapping[str, AsyncEngine] | None = None,
    binds: Mapping[Any, str] | None = None,
    bind: str | None = None,
    class_: type[AsyncTwoPhaseSession] | None = None,
    **session_options: Any,
) -> sa_asyncio.async_sessionmaker[AsyncTwoPhaseSession]:
    """A ``sqlalchemy.ext.asyncio.async_sessionmaker`` whose sessions commit through ``atm``::

        Session = txmgr.sqlalchemy.async_sessionmaker(
            atm,
            engines={"orders": create_async_engine("postgresql+psycopg://…")},  # optional
            binds={Order: "orders", Invoice: "billing"},
        )
        async with Session() as session:
            session.add_all([Order(...), Invoice(...)])
            await session.commit()   # both databases, or neither

    Same as ``AsyncSQLAlchemy(atm, engines=engines).sessionmaker(binds=…, bind=…, …)``.
    """
    return AsyncSQLAlchemy(atm, engines=engines).sessionmaker(
        binds=binds, bind=bind, class_=class_, **session_options
    )

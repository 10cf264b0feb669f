"""TwoPhaseSession: one ORM Session over several participants, committed by txmgr.

Mapped classes and tables are bound to participants by name, as SQLAlchemy
binds them to engines (``binds={Order: "orders", Invoice: "billing"}``). Each
session gets, per participant, a light Engine (:class:`ParticipantEngine`, an
``OptionEngine`` of the participant's shared Engine) whose ``connect()`` opens
that participant's branch in the session's current global transaction
(:class:`~txmgr.sqlalchemy._global.GlobalTransaction`). The session runs with
``twophase=True``; the dialect turns its commit into txmgr's commit and any
rollback into a rollback of every branch (see :mod:`txmgr.sqlalchemy._dialect`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.orm import Session, SessionTransaction

from txmgr.errors import ConfigError, TransactionStateError
from txmgr.sqlalchemy._binding import participant_binds
from txmgr.sqlalchemy._global import GlobalTransaction, SessionTransactionSource, TxmgrTransaction

__all__ = ["EngineSource", "ParticipantEngine", "TwoPhaseSession"]

# Session options txmgr sets itself.
RESERVED_OPTIONS = frozenset({"twophase"})


class EngineSource(Protocol):
    """Where a TwoPhaseSession gets its manager and participant Engines
    (a :class:`~txmgr.sqlalchemy.SQLAlchemy`)."""

    @property
    def manager(self) -> SessionTransactionSource: ...

    @property
    def participants(self) -> frozenset[str]: ...

    def engine(self, name: str) -> Engine: ...


class ParticipantEngine(OptionEngine):
    """Participant ``participant``'s Engine as one TwoPhaseSession sees it.

    It shares the participant's Engine (dialect, compiled cache, events,
    options); connecting opens the participant's branch in the session's
    current global transaction, so it connects only while the session is in a
    transaction: SQLAlchemy calls it when the session first needs that
    participant.
    """

    def __init__(self, base: Engine, session: TwoPhaseSession, participant: str) -> None:
        super().__init__(base, {})
        self.participant = participant
        self.session = session

    def connect(self) -> Connection:
        """A Connection on the participant's branch of the session's global transaction
        (SQLAlchemy calls it when the session first needs this participant)."""
        return self.session._txmgr_connect(self.participant, super().connect)


class TwoPhaseSession(Session):
    """An ORM :class:`~sqlalchemy.orm.Session` whose commit is txmgr's atomic commit.

    ``binds`` maps mapped classes, mappers or tables to participant names and
    ``bind`` names the default participant, exactly as SQLAlchemy's own
    ``binds``/``bind`` map them to engines. Other keyword arguments are
    SQLAlchemy's Session options (``autoflush``, ``expire_on_commit``, …).
    Usually made by :func:`txmgr.sqlalchemy.sessionmaker`.

    Each transaction of the session (begun lazily, or by ``begin()``) is one
    txmgr global transaction over the participants it touches:
    ``commit()`` commits them atomically (two-phase when two or more wrote,
    one-phase otherwise) and raises :class:`~txmgr.TransactionAborted` or
    :class:`~txmgr.OutcomeUnknown` like ``Transaction.commit()``;
    ``rollback()``, ``close()`` and a failed flush roll every branch back.
    Committing one participant's Connection by hand is refused
    (:class:`~txmgr.ManualTransactionControl`).
    """

    _txmgr_source: EngineSource
    _txmgr_engines: dict[str, ParticipantEngine]
    _txmgr_global: GlobalTransaction | None  # the current transaction's, once it connected
    _txmgr_foreign: str | None  # a bind that is not a participant, seen in this transaction

    def __init__(
        self,
        db: EngineSource,
        *,
        bind: str | None = None,
        binds: Mapping[Any, str] | None = None,
        **options: Any,
    ) -> None:
        reserved = sorted(RESERVED_OPTIONS & set(options))
        if reserved:
            raise ConfigError(
                f"session option(s) {reserved} are set by txmgr: its sessions always commit "
                "through txmgr's two-phase commit"
            )
        names, default = participant_binds(binds, bind, db.participants)
        self._txmgr_source = db
        self._txmgr_engines = {}
        self._txmgr_global = None
        self._txmgr_foreign = None
        super().__init__(
            bind=self.participant_engine(default) if default is not None else None,
            binds={key: self.participant_engine(name) for key, name in names.items()},
            twophase=True,
            **options,
        )

    @property
    def txmgr_transaction(self) -> TxmgrTransaction | None:
        """The txmgr transaction of the session's current transaction (its ``txid`` and
        ``state``: a :class:`~txmgr.Transaction`), or None while the session has not used
        any participant in it."""
        g = self._txmgr_global
        return g.transaction if g is not None else None

    def participant_engine(self, name: str) -> ParticipantEngine:
        """This session's Engine for participant ``name`` (what ``get_bind()`` returns)."""
        engine = self._txmgr_engines.get(name)
        if engine is None:
            base = self._txmgr_source.engine(name)  # UnknownParticipant
            engine = self._txmgr_engines[name] = ParticipantEngine(base, self, name)
        return engine

    def get_bind(
        self, mapper: Any = None, *, participant: str | None = None, **kw: Any
    ) -> Engine | Connection:
        """SQLAlchemy's ``get_bind()``; ``bind_arguments={"participant": name}`` (in
        ``execute()``, ``connection()``, …) chooses a participant by name."""
        if participant is not None:
            return self.participant_engine(participant)
        bind = super().get_bind(mapper, **kw)
        if not self._txmgr_owns(bind):
            raise ConfigError(
                f"{bind!r} is not a txmgr participant of this session: a TwoPhaseSession "
                "runs only on its participants (bind_arguments={'participant': name}), so "
                "that txmgr commits everything it does"
            )
        return bind

    def prepare(self) -> NoReturn:
        """Refused: txmgr prepares every branch inside ``commit()``."""
        raise TransactionStateError(
            "TwoPhaseSession.prepare() is not supported: txmgr prepares the branches inside "
            "commit(), under its decision log, so a prepared state you could act on never "
            "exists; call commit()"
        )

    # -- internals -------------------------------------------------------------

    def _txmgr_owns(self, bind: object) -> bool:
        engine = bind.engine if isinstance(bind, Connection) else bind
        return isinstance(engine, ParticipantEngine) and engine.session is self

    def _txmgr_connect(self, name: str, connect: Callable[[], Connection]) -> Connection:
        """Open ``name``'s branch in the current transaction's global transaction."""
        root = self.get_transaction()
        if root is None:
            raise TransactionStateError(
                f"the Engine of participant {name!r} connects only for its TwoPhaseSession, "
                "inside the session's transaction: use session.connection() or "
                "session.execute()"
            )
        g = self._txmgr_global
        if g is None or g.root is not root:
            if g is not None:  # an earlier transaction's: its end was missed
                g.end()
            g = self._txmgr_global = self._txmgr_new_global(root)
        return g.connect(name, connect)

    def _txmgr_new_global(self, root: SessionTransaction) -> GlobalTransaction:
        # The one place that knows the manager is synchronous: an asyncio
        # variant overrides it (its global transaction awaits txmgr's commit).
        return GlobalTransaction(self._txmgr_source.manager, root)

    def _txmgr_transaction_ended(self, root: SessionTransaction) -> None:
        self._txmgr_foreign = None
        g = self._txmgr_global
        if g is not None and g.root is root:
            self._txmgr_global = None
            g.end()

    def _txmgr_check_commit(self) -> None:
        if self._txmgr_foreign is not None:
            raise ConfigError(
                f"this transaction used {self._txmgr_foreign}, which is not a txmgr "
                "participant of the session; roll it back (session.rollback())"
            )
        g = self._txmgr_global
        if g is not None and g.rolled_back_early():
            raise g.aborted()

    def _txmgr_check_connection(self, connection: Connection) -> None:
        if not self._txmgr_owns(connection):
            self._txmgr_foreign = repr(connection.engine)
            raise ConfigError(
                f"{connection.engine!r} is not a txmgr participant of this session: a "
                "TwoPhaseSession runs only on its participants (bind_arguments="
                "{'participant': name}); roll this transaction back"
            )


# Class-level listeners: they apply to every TwoPhaseSession (and subclass).


@event.listens_for(TwoPhaseSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, TwoPhaseSession):
        session._txmgr_transaction_ended(transaction)


@event.listens_for(TwoPhaseSession, "before_commit")
def _before_commit(session: Session) -> None:
    # Before the flush: a transaction whose branches SQLAlchemy already rolled
    # back (Connection.rollback() or .commit() by hand, an invalidated
    # connection) cannot commit.
    if isinstance(session, TwoPhaseSession):
        session._txmgr_check_commit()


@event.listens_for(TwoPhaseSession, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    # A bind passed explicitly (Session.connection(bind_arguments={"bind": …}))
    # skips get_bind(): SQLAlchemy's own two-phase commit would then prepare
    # and commit that database outside txmgr's log.
    if isinstance(session, TwoPhaseSession):
        session._txmgr_check_connection(connection)

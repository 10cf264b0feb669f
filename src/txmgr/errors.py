"""Errors raised by txmgr.

Every error names what went wrong and how to fix it. No message ever contains
a password: DSNs are shown through :func:`txmgr._dsn.mask`.

The tree::

    TxmgrError
    ├── ConfigError                  bad settings: fix the configuration
    │   ├── InvalidParticipantName   a name outside [a-z][a-z0-9_]{0,31}
    │   └── UnknownParticipant       tx.connection("name") for a name not configured
    ├── ParticipantError             a participant's server cannot be used
    │   ├── ParticipantUnavailable   cannot connect (host down, wrong password, …)
    │   ├── PreparedTransactionsDisabled   max_prepared_transactions = 0
    │   ├── ParticipantReadOnly      a hot standby, or read-only sessions by default
    │   │   └── NotPrimary           a hot standby reached where a decision is read or a
    │   │                            prepared transaction listed or finished
    │   ├── UnsupportedServer        PostgreSQL older than 13
    │   └── UnsupportedPoolMode      a pooler that cannot keep a transaction on one server
    ├── LogSchemaError               decision log schema missing or out of date
    ├── LogIdentityError             the log database's identity does not fit
    │   └── LogCopied                a copy (dump, TEMPLATE clone) of another log database
    ├── LogQuorumUnavailable         fewer than a majority of the Paxos log databases answered
    ├── TransactionStateError        the API was used in the wrong order
    │   ├── ManualTransactionControl COMMIT/ROLLBACK issued by hand inside a branch
    │   └── RoleChangeInBranch       SET ROLE / SET SESSION AUTHORIZATION inside a branch
    ├── TransactionAborted           the transaction rolled back; nothing committed
    │   ├── DeadlockDetected         chosen as the victim of a wait-for cycle across servers
    │   └── TransactionTimeout       the transaction's deadline passed before its decision
    ├── OutcomeUnknown               the decision could not be confirmed; recovery finishes it
    ├── HeuristicMixed               committed, but another session rolled a branch back
    └── ResolveError                 `txmgr resolve` did not finish a branch
        ├── BranchNotFound           no participant has that gid prepared
        ├── AmbiguousBranch          several participants have it: pass --participant
        └── ResolveRefused           contradicts the log, coordinator busy, or needs --force
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AmbiguousBranch",
    "BranchNotFound",
    "ConfigError",
    "DeadlockDetected",
    "HeuristicMixed",
    "InvalidParticipantName",
    "LogCopied",
    "LogIdentityError",
    "LogQuorumUnavailable",
    "LogSchemaError",
    "ManualTransactionControl",
    "NotPrimary",
    "OutcomeUnknown",
    "ParticipantError",
    "ParticipantReadOnly",
    "ParticipantUnavailable",
    "PreparedTransactionsDisabled",
    "ResolveError",
    "ResolveRefused",
    "RoleChangeInBranch",
    "TransactionAborted",
    "TransactionStateError",
    "TransactionTimeout",
    "TxmgrError",
    "UnknownParticipant",
    "UnsupportedPoolMode",
    "UnsupportedServer",
]

#: SQLSTATEs after which rerunning the whole transaction may succeed: the
#: server chose this transaction as a victim (serialization_failure,
#: deadlock_detected); nothing it did was kept.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
#: A statement or lock wait was cut short (query_canceled: statement_timeout or
#: a cancel; lock_not_available: lock_timeout). Retried only when asked: a
#: timeout may mean overload, where retrying adds load.
TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it (``__cause__``, else an unsuppressed
    ``__context__``), first to last; a cycle is walked once."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain


def _sqlstates(error: BaseException) -> set[str]:
    # psycopg errors carry .sqlstate; read it without importing psycopg here.
    return {s for e in _causes(error) if isinstance(s := getattr(e, "sqlstate", None), str)}


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a timeout: a TxmgrError that says so (``timeout``), or
    one caused by a server-side statement or lock timeout (:data:`TIMEOUT_SQLSTATES`)."""
    if isinstance(error, TxmgrError) and type(error).timeout_class:
        return True
    if isinstance(error, OutcomeUnknown):
        return False
    return bool(_sqlstates(error) & TIMEOUT_SQLSTATES)


class TxmgrError(Exception):
    """Base class of every error txmgr raises on purpose.

    ``retryable``: whether running the whole transaction again may succeed
    (:func:`txmgr.run_transaction` reruns exactly these). Only an aborted
    transaction can be: everything else needs a fix first, and an
    OutcomeUnknown may have committed. A subclass sets ``retryable_class``
    (a deadlock victim) or ``timeout_class`` (retried only when asked).
    """

    #: Every error of this class is retryable (overrides the SQLSTATE rule).
    retryable_class: ClassVar[bool] = False
    #: Every error of this class is a timeout (see :func:`is_timeout`).
    timeout_class: ClassVar[bool] = False

    @property
    def retryable(self) -> bool:
        """Whether running the whole transaction again may succeed."""
        return type(self).retryable_class


class ConfigError(TxmgrError):
    """The configuration is invalid; the message says which setting and how to fix it."""


class InvalidParticipantName(ConfigError):
    """A participant name does not match ``[a-z][a-z0-9_]{0,31}``."""


class UnknownParticipant(ConfigError):
    """A transaction asked for a participant that is not configured."""


class ParticipantError(TxmgrError):
    """A participant (or the log database) cannot take part in transactions."""

    def __init__(self, message: str, *, participant: str) -> None:
        super().__init__(message)
        self.participant = participant


class ParticipantUnavailable(ParticipantError):
    """Connecting failed: server down, wrong credentials, unknown database."""


class PreparedTransactionsDisabled(ParticipantError):
    """The server has ``max_prepared_transactions = 0`` and cannot prepare branches."""


class ParticipantReadOnly(ParticipantError):
    """The server cannot write: a hot standby (in recovery), or its sessions start
    with ``default_transaction_read_only = on``. Point the DSN at the primary."""


class NotPrimary(ParticipantReadOnly):
    """The server is a hot standby (``pg_is_in_recovery()``), reached by a connection
    that reads a decision or lists or finishes prepared transactions.

    A standby may lag behind its primary: a decision not replayed yet reads as
    "not committed", and its ``pg_prepared_xacts`` lists nothing. Acting on
    either could roll back a committed transaction's branch, so txmgr refuses
    the connection on every use. Point the DSN at the primary, or list every
    host with ``target_session_attrs=read-write``. ``dsn`` is the masked DSN.
    """

    def __init__(self, message: str, *, participant: str, dsn: str) -> None:
        super().__init__(message, participant=participant)
        self.dsn = dsn


class UnsupportedServer(ParticipantError):
    """The server is older than PostgreSQL 13 (txmgr needs ``pg_xact_status(xid8)``)."""


class UnsupportedPoolMode(ParticipantError):
    """The connection goes through a pooler that hands out a server per statement
    (PgBouncer's ``pool_mode = statement``): no branch, no decision transaction
    can span two statements there. Use ``pool_mode = transaction`` or ``session``."""


class LogSchemaError(TxmgrError):
    """The decision log tables are missing or at another schema revision."""


class LogIdentityError(TxmgrError):
    """The log database's identity (its log id bound to a cluster and a database)
    does not allow what was asked (see :mod:`txmgr._identity`)."""


class LogCopied(LogIdentityError):
    """The log database is a copy of another one (a restored dump, a
    ``CREATE DATABASE … TEMPLATE`` clone, a re-initialized or upgraded cluster):
    it carries the original's log id, so its recovery would take the original's
    transactions as its own. Nothing reads or writes decisions there until it is
    adopted (``txmgr migrate --adopt``). ``logid``: the id it carries."""

    def __init__(self, message: str, *, logid: str) -> None:
        super().__init__(message)
        self.logid = logid


class LogQuorumUnavailable(TxmgrError):
    """Fewer than a majority of the Paxos log databases answered.

    Raised before anything was prepared, so nothing is committed anywhere;
    ``answered`` and ``needed`` count log databases, ``problems`` says what
    each unreachable one answered (DSNs masked).
    """

    def __init__(self, message: str, *, answered: int, needed: int,
                 problems: list[str]) -> None:
        super().__init__(message)
        self.answered = answered
        self.needed = needed
        self.problems = problems


class TransactionStateError(TxmgrError):
    """A transaction method was called in a state that does not allow it."""


class ManualTransactionControl(TransactionStateError):
    """COMMIT, ROLLBACK or PREPARE was issued by hand on a branch connection.

    txmgr ends every branch itself; ending one by hand would break atomicity.
    """


class RoleChangeInBranch(TransactionStateError):
    """``SET ROLE``, ``RESET ROLE``, ``SET SESSION AUTHORIZATION`` (or ``set_config('role',
    …)``) was issued on a branch connection.

    PostgreSQL lets only the role that prepared a branch, or a superuser, finish
    it; a branch prepared under another role could be committed neither by the
    coordinator's session nor by recovery. Connect as that role instead (the
    user in the participant's DSN).
    """


class TransactionAborted(TxmgrError):
    """The global transaction rolled back: no branch committed.

    Raised when a participant could not prepare (it "voted no"), when the
    coordinator lost its decision transaction before committing it, or when a
    branch was unusable at commit time. ``__cause__`` holds the first error.
    """

    def __init__(self, message: str, *, txid: str | None = None) -> None:
        super().__init__(message)
        self.txid = txid

    @property
    def retryable(self) -> bool:
        """True when a branch was a server's serialization or deadlock victim
        (SQLSTATE 40001 or 40P01 anywhere in ``__cause__``), or the class says so."""
        return type(self).retryable_class or bool(_sqlstates(self) & RETRYABLE_SQLSTATES)


class DeadlockDetected(TransactionAborted):
    """The deadlock detector chose this transaction as the victim of a wait-for cycle.

    Each server saw only a wait; together the waits formed a cycle that no server
    could break. The detector cancelled this transaction's waiting statement (it
    was the youngest of the cycle); every branch was rolled back and the others
    of the cycle go on. ``others`` are the txids (or ``pid N on participant``
    for sessions that are not txmgr's) it waited for, ``relations`` the tables
    involved. Running the transaction again is safe.
    """

    retryable_class = True

    def __init__(
        self,
        message: str,
        *,
        txid: str | None = None,
        others: tuple[str, ...] = (),
        relations: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, txid=txid)
        self.others = others
        self.relations = relations


class TransactionTimeout(TransactionAborted):
    """The transaction's deadline (``tm.transaction(timeout=…)``, or ``[transaction]
    timeout``) passed before its decision: every branch was rolled back.
    Retried by :func:`txmgr.run_transaction` only with ``retry_timeouts=True``."""

    timeout_class = True

    def __init__(self, message: str, *, txid: str | None = None, timeout: float) -> None:
        super().__init__(message, txid=txid)
        self.timeout = timeout


class OutcomeUnknown(TxmgrError):
    """The decision could not be confirmed because the log database was unreachable.

    The transaction is either committed on every participant or on none, and
    recovery (``txmgr recover`` or the daemon) will finish it; look it up by
    ``txid`` with ``txmgr status``. Never retryable: it may have committed.
    """

    def __init__(self, message: str, *, txid: str | None = None) -> None:
        super().__init__(message)
        self.txid = txid


class HeuristicMixed(TxmgrError):
    """The decision was commit, but some branch was rolled back by someone else.

    In the spirit of JTA's ``HeuristicMixedException``: the coordinator found a
    branch's gid gone at ``COMMIT PREPARED`` and the participant says that
    prepared transaction was rolled back (``ROLLBACK PREPARED`` by an operator
    or another tool): ``committed`` lists the participants whose branch
    committed, ``rolled_back`` those whose branch did not. Atomicity is broken
    for this transaction and only the application can repair its data.
    """

    def __init__(self, message: str, *, txid: str, committed: list[str],
                 rolled_back: list[str]) -> None:
        super().__init__(message)
        self.txid = txid
        self.committed = committed
        self.rolled_back = rolled_back


class ResolveError(TxmgrError):
    """``txmgr resolve`` did not finish the branch; the message says why and what to do."""


class BranchNotFound(ResolveError):
    """No configured participant has the gid prepared in its own database."""


class AmbiguousBranch(ResolveError):
    """Several participants (on different servers) have a branch with this gid."""


class ResolveRefused(ResolveError):
    """The request contradicts the decision log, or needs ``--force``."""

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
    │   └── UnsupportedServer        PostgreSQL older than 13
    ├── LogSchemaError               decision log schema missing or out of date
    ├── LogQuorumUnavailable         fewer than a majority of the Paxos log databases answered
    ├── TransactionStateError        the API was used in the wrong order
    │   ├── ManualTransactionControl COMMIT/ROLLBACK issued by hand inside a branch
    │   └── RoleChangeInBranch       SET ROLE / SET SESSION AUTHORIZATION inside a branch
    ├── TransactionAborted           the transaction rolled back; nothing committed
    │   ├── DeadlockDetected         chosen as the victim of a wait-for cycle across servers
    │   └── TransactionTimeout       the transaction's deadline passed before its decision
    ├── OutcomeUnknown               the decision could not be confirmed; recovery finishes it
    └── ResolveError                 `txmgr resolve` did not finish a branch
        ├── BranchNotFound           no participant has that gid prepared
        ├── AmbiguousBranch          several participants have it: pass --participant
        └── ResolveRefused           contradicts the log, coordinator busy, or needs --force
"""

from __future__ import annotations

__all__ = [
    "AmbiguousBranch",
    "BranchNotFound",
    "ConfigError",
    "DeadlockDetected",
    "InvalidParticipantName",
    "LogQuorumUnavailable",
    "LogSchemaError",
    "ManualTransactionControl",
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
    "UnsupportedServer",
]


class TxmgrError(Exception):
    """Base class of every error txmgr raises on purpose."""


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


class UnsupportedServer(ParticipantError):
    """The server is older than PostgreSQL 13 (txmgr needs ``pg_xact_status(xid8)``)."""


class LogSchemaError(TxmgrError):
    """The decision log tables are missing or at another schema revision."""


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


class DeadlockDetected(TransactionAborted):
    """The deadlock detector chose this transaction as the victim of a wait-for cycle.

    Each server saw only a wait; together the waits formed a cycle that no server
    could break. The detector cancelled this transaction's waiting statement (it
    was the youngest of the cycle); every branch was rolled back and the others
    of the cycle go on. ``others`` are the txids (or ``pid N on participant``
    for sessions that are not txmgr's) it waited for, ``relations`` the tables
    involved. Running the transaction again is safe.
    """

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
    timeout``) passed before its decision: every branch was rolled back."""

    def __init__(self, message: str, *, txid: str | None = None, timeout: float) -> None:
        super().__init__(message, txid=txid)
        self.timeout = timeout


class OutcomeUnknown(TxmgrError):
    """The decision could not be confirmed because the log database was unreachable.

    The transaction is either committed on every participant or on none, and
    recovery (``txmgr recover`` or the daemon) will finish it; look it up by
    ``txid`` with ``txmgr status``.
    """

    def __init__(self, message: str, *, txid: str | None = None) -> None:
        super().__init__(message)
        self.txid = txid


class ResolveError(TxmgrError):
    """``txmgr resolve`` did not finish the branch; the message says why and what to do."""


class BranchNotFound(ResolveError):
    """No configured participant has the gid prepared in its own database."""


class AmbiguousBranch(ResolveError):
    """Several participants (on different servers) have a branch with this gid."""


class ResolveRefused(ResolveError):
    """The request contradicts the decision log, or needs ``--force``."""

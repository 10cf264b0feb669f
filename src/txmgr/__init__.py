"""txmgr: atomic commits across several PostgreSQL databases.

Two-phase commit over psycopg 3 with a durable decision log in PostgreSQL and
a recovery that finishes whatever a crash leaves prepared::

    import txmgr

    tm = txmgr.TransactionManager(
        participants={"orders": "postgresql://…/orders", "billing": "postgresql://…/billing"},
        log="postgresql://…/txlog",
    )
    with tm.transaction() as tx:
        tx.connection("orders").execute("INSERT …")
        tx.connection("billing").execute("UPDATE …")
    tm.close()

With asyncio, ``AsyncTransactionManager`` takes the same arguments::

    async with txmgr.AsyncTransactionManager(participants, log) as tm:
        async with tm.transaction() as tx:
            await (await tx.connection("orders")).execute("INSERT …")
"""

from txmgr._adopt import adopt_log
from txmgr._aio_manager import AsyncTransactionManager
from txmgr._aio_transaction import AsyncTransaction
from txmgr._migrate import migrate
from txmgr._retry import arun_transaction, run_transaction
from txmgr.config import Config
from txmgr.errors import (
    AmbiguousBranch,
    BranchNotFound,
    ConfigError,
    DeadlockDetected,
    HeuristicMixed,
    InvalidParticipantName,
    LogCopied,
    LogIdentityError,
    LogQuorumUnavailable,
    LogSchemaError,
    ManualTransactionControl,
    NotPrimary,
    OutcomeUnknown,
    ParticipantError,
    ParticipantReadOnly,
    ParticipantUnavailable,
    PreparedTransactionsDisabled,
    ResolveError,
    ResolveRefused,
    RoleChangeInBranch,
    TransactionAborted,
    TransactionStateError,
    TransactionTimeout,
    TxmgrError,
    UnknownParticipant,
    UnsupportedPoolMode,
    UnsupportedServer,
)
from txmgr.hooks import Hooks
from txmgr.manager import TransactionManager
from txmgr.paxos import PaxosLog
from txmgr.recovery import Recoverer, RecoveryReport, Resolution, recover
from txmgr.transaction import Transaction, TransactionState

__version__ = "0.1.0"

__all__ = [
    "AmbiguousBranch",
    "AsyncTransaction",
    "AsyncTransactionManager",
    "BranchNotFound",
    "Config",
    "ConfigError",
    "DeadlockDetected",
    "HeuristicMixed",
    "Hooks",
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
    "PaxosLog",
    "PreparedTransactionsDisabled",
    "Recoverer",
    "RecoveryReport",
    "Resolution",
    "ResolveError",
    "ResolveRefused",
    "RoleChangeInBranch",
    "Transaction",
    "TransactionAborted",
    "TransactionManager",
    "TransactionState",
    "TransactionStateError",
    "TransactionTimeout",
    "TxmgrError",
    "UnknownParticipant",
    "UnsupportedPoolMode",
    "UnsupportedServer",
    "adopt_log",
    "arun_transaction",
    "migrate",
    "recover",
    "run_transaction",
]

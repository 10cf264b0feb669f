"""What to do about a server error: the "how to fix it" half of txmgr's messages.

PostgreSQL's message says what went wrong; these functions add what the
application or the operator should do about it. They are pure functions of the
error (its SQLSTATE and text), so the sync and the async coordinator share
them and unit tests need no server.

- :func:`prepare_failure_hint`: ``PREPARE TRANSACTION`` failed (the branch
  "voted no"), or the only writer's one-phase ``COMMIT`` did — both run the
  branch's deferred triggers and constraints.
- :data:`FAILED_BRANCH_HINT`: a statement failed inside a branch, the error
  was caught, and the block was left normally.
- :func:`connect_failure_hint`: connecting to a participant or the log failed.
- :func:`with_hint`: a message with the hint for its error appended.
"""

from __future__ import annotations

import psycopg

__all__ = ["FAILED_BRANCH_HINT", "connect_failure_hint", "prepare_failure_hint", "with_hint"]

FAILED_BRANCH_HINT = (
    "a statement that fails aborts its branch's transaction even when the error is "
    "caught: run statements that may fail inside a savepoint (with conn.transaction(): "
    "…) to carry on after them, or let the exception leave the transaction block"
)

_CANNOT_PREPARE = "PostgreSQL cannot prepare a transaction that "
# Each FeatureNotSupported (0A000) refusal of PREPARE, by a fragment of the
# server's message (PostgreSQL 13-17 spell them the same way).
_UNPREPARABLE = (
    (
        "temporary objects",
        "used temporary tables (or other temporary objects): use an ordinary or UNLOGGED "
        "table, or do the temporary work on a connection of your own, outside the global "
        "transaction",
    ),
    (
        "LISTEN, UNLISTEN, or NOTIFY",
        "ran LISTEN, UNLISTEN or NOTIFY: LISTEN on a connection of your own; send NOTIFY "
        "(or pg_notify()) from a participant whose branch writes nothing — txmgr commits "
        "those branches after the decision, so the notification goes out only if the "
        "transaction commits — or after the transaction",
    ),
    (
        "cursor WITH HOLD",
        "created a cursor WITH HOLD: CLOSE it before the transaction block ends, or "
        "declare it without WITH HOLD",
    ),
    (
        "exported its snapshot",
        "exported its snapshot (pg_export_snapshot()): export snapshots outside the global "
        "transaction",
    ),
)

_RETRY = "retry the whole global transaction"


def prepare_failure_hint(error: BaseException) -> str | None:
    """How to fix ``error``, raised by ``PREPARE TRANSACTION`` or a one-phase ``COMMIT``.

    None when there is nothing better to say than the error itself.
    """
    state = getattr(error, "sqlstate", None) or ""
    text = str(error)
    if state == "0A000":  # feature_not_supported
        for fragment, hint in _UNPREPARABLE:
            if fragment in text:
                return _CANNOT_PREPARE + hint
        return (
            "PostgreSQL cannot prepare what this branch did: keep that work outside the "
            "global transaction"
        )
    if state == "53200" and "prepared transactions" in text:  # out_of_memory
        return (
            "every prepared-transaction slot of this participant is taken: finish old "
            "prepared transactions (`txmgr status` lists them, `txmgr recover` or the "
            "daemon finishes txmgr's, `txmgr resolve` the others), or raise "
            "max_prepared_transactions on that server (needs a restart)"
        )
    if state == "42710":  # duplicate_object: the gid is taken
        return (
            "another prepared transaction already has this branch's gid: retry the "
            "transaction (its txid is random); if it happens again, something else "
            "prepares transactions with txmgr's gids — `txmgr status` shows them"
        )
    if state == "57014":  # query_canceled
        # (PostgreSQL 13-16 disarm statement_timeout before the commit work of
        # COMMIT and PREPARE TRANSACTION; a deferred trigger may still hit it
        # through a statement of its own, or a later release may arm it.)
        if "statement timeout" in text:
            return (
                "the branch's work took longer than this participant's statement_timeout: "
                "raise statement_timeout for it (options in its DSN, or ALTER ROLE … SET "
                "statement_timeout) or make the work faster, then " + _RETRY
            )
        return "the statement was canceled (pg_cancel_backend or a shutdown): " + _RETRY
    if state == "55P03":  # lock_not_available
        return (
            "PREPARE TRANSACTION (or COMMIT) runs the branch's deferred triggers and "
            "constraints, and one of them waited for a lock longer than this participant's "
            "lock_timeout: " + _RETRY + ", or raise lock_timeout for it (options in its DSN, "
            "or ALTER ROLE … SET lock_timeout)"
        )
    if state in ("40001", "40P01"):  # serialization_failure, deadlock_detected
        return "it conflicted with a concurrent transaction: " + _RETRY
    if state.startswith("23"):  # integrity_constraint_violation, checked at commit time
        return (
            "a deferred constraint (DEFERRABLE INITIALLY DEFERRED, or SET CONSTRAINTS … "
            "DEFERRED) failed when the branch was prepared: fix the data the transaction "
            "writes"
        )
    lost = not state or state.startswith(("08", "57P"))  # connection_exception, shutdown
    if isinstance(error, psycopg.OperationalError) and lost:
        return (
            "the connection to the participant was lost: nothing was committed, and a branch "
            "that got prepared anyway is rolled back by recovery (`txmgr recover` or the "
            "daemon); " + _RETRY + " once the participant is back"
        )
    return None


def with_hint(message: str, error: BaseException | None) -> str:
    """``message``, followed by :func:`prepare_failure_hint` of ``error`` if there is one."""
    hint = prepare_failure_hint(error) if error is not None else None
    return f"{message.rstrip()}; {hint}" if hint else message


# libpq's connection failures carry no SQLSTATE: match fragments of its text.
_CONNECT_HINTS = (
    (
        ("password authentication failed", "no password supplied", "password is required"),
        "the server refused the password for this user: fix it in the DSN, ~/.pgpass "
        "(passfile=) or PGPASSWORD",
    ),
    (
        ("no pg_hba.conf entry",),
        "the server does not accept this user/database from this host: add a line for it "
        "to the server's pg_hba.conf (and reload), or connect as another user",
    ),
    (
        ("does not exist",),
        "check the database and user names in the DSN (create the database, or the role, "
        "if it is new)",
    ),
    (
        ("Connection refused", "No such file or directory"),
        "nothing listens there: check that the server is running and the DSN's host and "
        "port (and the server's listen_addresses)",
    ),
    (
        ("could not translate host name", "Name or service not known"),
        "the host name does not resolve: check the DSN's host",
    ),
    (
        ("timeout expired", "timed out"),
        "the server did not answer within connect_timeout: check that the host is up and "
        "reachable (firewall, network)",
    ),
    (
        ("too many clients", "remaining connection slots"),
        "the server has no free connection: raise its max_connections or lower "
        "[pool] max_size of the applications using it",
    ),
    (
        # target_session_attrs=read-write / primary, when no listed server qualifies
        ("session is read-only", "server is in hot standby mode"),
        "target_session_attrs found no primary among the servers the DSN lists (only hot "
        "standbys, or sessions read-only by default): list the current primary's host and "
        "port in the DSN (host=h1,h2 port=p1,p2), or wait until the failover has promoted a "
        "standby; if the server is a primary, turn default_transaction_read_only off for "
        "this role or database",
    ),
    (
        ("the database system is starting up", "the database system is shutting down",
         "the database system is in recovery mode"),
        "the server is starting or stopping: try again when it is up",
    ),
)

_GENERIC_CONNECT_HINT = "check host, port, database name, user and password"


def connect_failure_hint(error: BaseException) -> str:
    """What to check when connecting failed with ``error`` (never quotes a password)."""
    text = str(error)
    for fragments, hint in _CONNECT_HINTS:
        if any(f in text for f in fragments):
            return hint
    return _GENERIC_CONNECT_HINT

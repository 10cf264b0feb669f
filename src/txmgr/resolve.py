"""Finishing one prepared branch by hand: ``txmgr resolve GID --commit|--rollback``.

For branches recovery cannot decide: prepared transactions that are not
txmgr's, gids of another (lost or replaced) decision log, or xids the log
cannot tell about. The rules, in order:

1. the log says ``in progress``: refused — a coordinator is inside the commit
   protocol and will finish the branch itself (``--force`` does not help);
2. the log has a decision that contradicts the request: refused — doing it
   would break atomicity (``--force`` does not help);
3. the log has a decision that agrees: done, no ``--force`` needed;
4. the log cannot decide (``not ours``, ``unknown``): done only with ``--force``.

Every resolution writes a row to ``txmgr_resolution_audit`` in the log
database first (who, from where, what, why), then sends ``COMMIT PREPARED`` /
``ROLLBACK PREPARED``. The two cannot be one atomic transaction (different
databases, and ``*PREPARED`` refuses to run inside a transaction block), so
the row records the intent: if the command dies in between, the row exists
and the branch is still prepared; ``txmgr status`` shows it.

The error tree (all are :class:`~txmgr.errors.TxmgrError`, CLI exit code 1)::

    ResolveError
    ├── BranchNotFound     no participant has the gid prepared in its database
    ├── AmbiguousBranch    several participants have it: pass --participant
    └── ResolveRefused     the log contradicts the request, or --force is needed
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from typing import Any

import psycopg

from txmgr import log as decision_log
from txmgr._dsn import redact
from txmgr._gid import Gid
from txmgr.config import Config
from txmgr.errors import (
    AmbiguousBranch,
    BranchNotFound,
    ConfigError,
    ResolveError,
    ResolveRefused,
    TxmgrError,
    UnknownParticipant,
)
from txmgr.participant import FinishResult, connect, finish_prepared
from txmgr.status import Decision, classify

__all__ = [
    "AmbiguousBranch",
    "BranchNotFound",
    "ResolveError",
    "ResolveRefused",
    "ResolveResult",
    "resolve",
]


@dataclass(frozen=True, slots=True)
class ResolveResult:
    gid: str
    participant: str
    action: str  # "commit" or "rollback"
    forced: bool  # True when --force overrode an undecidable log
    log_decision: Decision
    outcome: FinishResult  # "done"; "missing": finished meanwhile; "busy": being finished
    audit_id: int


def resolve(
    config: Config,
    gid: str,
    *,
    commit: bool,
    force: bool = False,
    participant: str | None = None,
    reason: str | None = None,
    requested_by: str | None = None,
    client_host: str | None = None,
) -> ResolveResult:
    """Commit (``commit=True``) or roll back the prepared branch ``gid``; see the module doc."""
    action = "commit" if commit else "rollback"
    if config.paxos_log is not None:
        # No single log database holds the audit table, and a branch of a
        # Paxos transaction is finished by recovery once a majority decides.
        raise ConfigError(
            "txmgr resolve does not support Paxos mode yet: run `txmgr recover` (or the "
            "daemon), which decides and finishes txp1_ branches once a majority of the log "
            "databases answers; finish a branch that is not txmgr's with COMMIT PREPARED or "
            "ROLLBACK PREPARED in its database"
        )
    name, owner, pconn = _locate(config, gid, participant)
    try:
        decision, detail, lconn = _log_decision(config, gid)
        try:
            forced = _check_rules(gid, name, action, decision, detail, force)
            _check_privilege(pconn, gid, name, owner)
            audit_id = _audit(
                lconn,
                gid=gid,
                participant=name,
                action=action,
                forced=forced,
                log_decision=decision,
                requested_by=requested_by or _os_user(),
                client_host=client_host or socket.gethostname(),
                reason=reason,
            )
        finally:
            lconn.close()
        try:
            outcome = finish_prepared(pconn, gid, commit=commit)
        except psycopg.errors.InsufficientPrivilege as e:  # raced a role change; rare
            raise ResolveRefused(
                f"{name}: {e}: connect as the role that prepared it ({owner}) or a superuser; "
                f"audit row {audit_id} records the attempt"
            ) from None
        except psycopg.Error as e:
            raise ResolveError(
                f"{name}: {action.upper()} PREPARED failed: {redact(str(e))}; audit row "
                f"{audit_id} records the attempt: run `txmgr status` to see whether {gid!r} "
                "is still prepared, and repeat the command if it is"
            ) from None
        return ResolveResult(gid, name, action, forced, decision, outcome, audit_id)
    finally:
        pconn.close()


def _locate(
    config: Config, gid: str, only: str | None
) -> tuple[str, str, psycopg.Connection[Any]]:
    """(participant, owner, autocommit connection) of the branch ``gid``."""
    if only is not None and only not in config.participants:
        raise UnknownParticipant(
            f"unknown participant {only!r}: configured participants are "
            f"{sorted(config.participants)}"
        )
    names = [only] if only is not None else list(config.participants)
    found: list[tuple[str, str, psycopg.Connection[Any]]] = []
    elsewhere: list[str] = []  # "<participant>: database <db>" where the server has it
    unreachable: list[str] = []
    try:
        for name in names:
            try:
                conn = connect(
                    config.participants[name],
                    name,
                    connect_timeout=config.connect_timeout,
                    autocommit=True,
                    application_name="txmgr-resolve",
                )
            except TxmgrError as e:
                unreachable.append(redact(str(e)))
                continue
            try:
                rows = conn.execute(
                    "SELECT database, owner, database = current_database() "
                    "FROM pg_prepared_xacts WHERE gid = %s",
                    (gid,),
                ).fetchall()
            except psycopg.Error as e:
                conn.close()
                unreachable.append(f"{name}: {redact(str(e))}")
                continue
            mine = [r for r in rows if r[2]]
            if mine:
                found.append((name, str(mine[0][1]), conn))
            else:
                elsewhere.extend(f"{name}'s server, database {r[0]!r}" for r in rows)
                conn.close()
        if len(found) == 1:
            return found.pop()
    finally:
        for _, _, conn in found:
            conn.close()
    if found:
        raise AmbiguousBranch(
            f"gid {gid!r} is prepared on several participants "
            f"({', '.join(n for n, _, _ in found)}): choose one with --participant NAME"
        )
    hints = []
    if elsewhere:
        hints.append(
            f"it is prepared in {'; '.join(elsewhere)}, which is no configured participant "
            "(COMMIT/ROLLBACK PREPARED only work from the database that prepared it)"
        )
    if unreachable:
        hints.append("these could not be searched: " + "; ".join(unreachable))
    where = f"participant {only!r}" if only else f"participants {sorted(config.participants)}"
    raise BranchNotFound(
        f"no prepared transaction {gid!r} on {where}"
        + (": " + "; ".join(hints) if hints else "; `txmgr status` lists what is prepared")
    )


def _log_decision(config: Config, gid: str) -> tuple[Decision, str, psycopg.Connection[Any]]:
    """What the log says about ``gid``, and an open connection for the audit row."""
    try:
        lconn = connect(
            config.log_dsn,
            config.log_participant or "log",
            connect_timeout=config.connect_timeout,
            autocommit=True,
            application_name="txmgr-resolve",
        )
    except TxmgrError as e:
        raise ResolveRefused(
            f"cannot reach the decision log, so its decision cannot be checked and the "
            f"audit row cannot be written: {redact(str(e))}. Bring the log database back; "
            "if it is lost for good, point [log] at a new database (`txmgr migrate`), where "
            "the branch counts as another log's and `--force` applies"
        ) from None
    try:
        logid = decision_log.read_logid(lconn, config.log_dsn)
        statuses: dict[int, decision_log.XactStatus] = {}
        committed: set[str] = set()
        parsed = Gid.parse(gid)
        if parsed is not None and parsed.logid == logid:
            statuses, committed = decision_log.read_decisions(
                lconn, [(parsed.lxid, parsed.txid)]
            )
        decision, _txid, detail = classify(gid, logid, statuses, committed)
    except psycopg.Error as e:
        lconn.close()
        raise ResolveRefused(
            f"could not read the decision log: {redact(str(e))}; nothing was done"
        ) from None
    except BaseException:
        lconn.close()
        raise
    return decision, detail, lconn


def _check_rules(
    gid: str, name: str, action: str, decision: Decision, detail: str, force: bool
) -> bool:
    """Raise ResolveRefused unless ``action`` is allowed; return whether it is forced."""
    if decision == "in progress":
        raise ResolveRefused(
            f"{gid!r} on {name}: the decision log says its transaction is in progress (a "
            "coordinator is inside the commit protocol and will finish it); wait and run "
            "`txmgr status` again — --force cannot override this"
        )
    if (decision, action) in (("commit", "rollback"), ("abort", "commit")):
        logged = "committed" if decision == "commit" else "aborted"
        raise ResolveRefused(
            f"{gid!r} on {name}: the decision log says this transaction {logged}; a {action} "
            f"would break atomicity (its other branches {logged}). Use --"
            f"{'commit' if decision == 'commit' else 'rollback'}, or let recovery do it "
            "(`txmgr recover`) — --force cannot override the log"
        )
    if decision in ("commit", "abort"):
        return False
    if not force:
        raise ResolveRefused(
            f"{gid!r} on {name}: the decision log cannot decide it ({decision}: {detail}); "
            f"if you know its outcome, repeat with --force (and --reason TEXT): the "
            "resolution is recorded in txmgr_resolution_audit"
        )
    return True


def _check_privilege(conn: psycopg.Connection[Any], gid: str, name: str, owner: str) -> None:
    # PostgreSQL lets only the preparing role or a superuser finish it; check
    # before writing the audit row, so that a refused attempt leaves no row.
    try:
        row = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    except psycopg.Error as e:
        raise ResolveError(f"{name}: {redact(str(e))}; nothing was done") from None
    if row is not None and (row[1] or row[0] == owner):
        return
    user = row[0] if row else "?"
    raise ResolveRefused(
        f"{gid!r} on {name} was prepared by role {owner!r}; connected as {user!r}, which "
        f"PostgreSQL does not allow to finish it: use a DSN for role {owner!r} (or a "
        "superuser) for this participant"
    )


def _audit(conn: psycopg.Connection[Any], **values: Any) -> int:
    try:
        # The id comes first, from the sequence: INSERT … RETURNING would need
        # SELECT on the audit table, and the role only needs to append to it.
        row = conn.execute(
            "SELECT nextval(pg_get_serial_sequence('txmgr_resolution_audit', 'id'))"
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO txmgr_resolution_audit (id, gid, participant, action, forced, "
            "log_decision, requested_by, client_host, reason) VALUES (%(id)s, %(gid)s, "
            "%(participant)s, %(action)s, %(forced)s, %(log_decision)s, %(requested_by)s, "
            "%(client_host)s, %(reason)s)",
            {"id": row[0], **values},
        )
    except psycopg.errors.InsufficientPrivilege as e:
        raise ResolveRefused(
            f"cannot write the audit row, so nothing was done: {e}; grant INSERT on "
            "txmgr_resolution_audit and USAGE on txmgr_resolution_audit_id_seq to this role"
        ) from None
    except psycopg.Error as e:
        raise ResolveError(
            f"cannot write the audit row, so nothing was done: {redact(str(e))}"
        ) from None
    return int(row[0])


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid:{os.getuid()}"

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

Paxos mode (:mod:`txmgr.paxos`): an outcome is imposed only by proposing it,
as a recovery process does, so nothing resolve does can contradict what a
majority of the log databases chose. For a ``txp1_`` gid, with its voters
(the log databases that registered the transaction, named in the gid):

1. a majority of the voters holds a chosen value, or so many voters lost the
   transaction that commit can never be chosen (``forgotten``: roll back):
   that is the decision — rules 2 and 3 above apply to it;
2. undecided, and its coordinator alive (its liveness lock held on a voter,
   :mod:`txmgr.paxos._beacon`), or — when the log databases cannot tell —
   registered less than the grace ago (``paxos_grace``, by default the log's
   ``idle_timeout``): refused as ``in progress``; the rule is recovery's
   (:func:`txmgr.paxos._beacon.may_decide`);
3. undecided, ``--rollback``: a recovery round proposes abort. Paxos turns
   it into commit if a commit was accepted at the highest ballot among the
   majority that answers — then the request is refused (rule 2 above);
4. undecided, ``--commit``: refused unless a log database already accepted
   commit — only the coordinator may introduce commit, once every branch is
   prepared, and resolve cannot know that every branch was. If one did, a
   recovery round finishes the decision, which may still be abort (refused);
5. fewer than a majority of the voters answer: nothing can be learned or
   imposed (a rollback could undo a commit the others chose, a commit could
   commit a transaction never fully prepared): refused, ``--force`` does not
   help. Only when its voters can never form a majority again — the log
   databases answer under other incarnations (re-created empty) or are no
   longer configured — does the gid count as another log's (``not ours``),
   finished only with ``--force``, like a gid that is not a Paxos one.

The audit row goes to every log database that answers, and a majority of the
configured ones must take it (like a decision), before the branch is finished.

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
from txmgr._dsn import mask, redact
from txmgr._gid import Gid
from txmgr._primary import IN_RECOVERY, require_primary
from txmgr.config import Config
from txmgr.errors import (
    AmbiguousBranch,
    BranchNotFound,
    NotPrimary,
    ResolveError,
    ResolveRefused,
    TxmgrError,
    UnknownParticipant,
)
from txmgr.participant import FinishResult, connect, finish_prepared
from txmgr.paxos._beacon import coordinator_state, may_decide
from txmgr.paxos._core import Outcome, Reply, Voters, settled
from txmgr.paxos._gid import PaxosGid
from txmgr.paxos._log import AcceptorStatus, PaxosLog
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
    """What :func:`resolve` did with one branch."""

    gid: str
    participant: str
    action: str  # "commit" or "rollback"
    forced: bool  # True when --force overrode an undecidable log
    log_decision: Decision
    outcome: FinishResult  # "done"; "missing": finished meanwhile; "busy": being finished
    audit_id: int  # Paxos mode: the row's id in the first log database that took it
    detail: str = ""  # Paxos mode: how the decision was known (or made by this call)
    #: Paxos mode: (masked DSN, audit row id) for every log database that took the row
    audit_rows: tuple[tuple[str, int], ...] = ()


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
    paxos_grace: float | None = None,
) -> ResolveResult:
    """Commit (``commit=True``) or roll back the prepared branch ``gid``; see the module doc.

    ``paxos_grace`` (Paxos mode): seconds after its registration during which an
    undecided transaction is left to its coordinator (default: the log's
    ``idle_timeout``, the grace recovery gives it).
    """
    action = "commit" if commit else "rollback"
    audit = {
        "requested_by": requested_by or _os_user(),
        "client_host": client_host or socket.gethostname(),
        "reason": reason,
    }
    name, owner, pconn = _locate(config, gid, participant)
    try:
        log = config.paxos_log
        if log is not None:
            grace = config.log_idle_timeout if paxos_grace is None else paxos_grace
            return _resolve_paxos(config, log, gid, name, owner, pconn, action=action,
                                  force=force, grace=grace, audit=audit)
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
                **audit,
            )
        finally:
            lconn.close()
        outcome = _finish(pconn, gid, name, owner, action, f"audit row {audit_id}")
        return ResolveResult(gid, name, action, forced, decision, outcome, audit_id)
    finally:
        pconn.close()


def _finish(
    pconn: psycopg.Connection[Any], gid: str, name: str, owner: str, action: str, rows: str
) -> FinishResult:
    """COMMIT or ROLLBACK PREPARED the branch, once its audit ``rows`` are written."""
    try:
        return finish_prepared(pconn, gid, commit=action == "commit")
    except psycopg.errors.InsufficientPrivilege as e:  # raced a role change; rare
        raise ResolveRefused(
            f"{name}: {e}: connect as the role that prepared it ({owner}) or a superuser; "
            f"the attempt is recorded in {rows}"
        ) from None
    except psycopg.Error as e:
        raise ResolveError(
            f"{name}: {action.upper()} PREPARED failed: {redact(str(e))}; the attempt is "
            f"recorded in {rows}: run `txmgr status` to see whether {gid!r} is still "
            "prepared, and repeat the command if it is"
        ) from None


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
                    "SELECT p.database, p.owner, p.database = current_database(), "
                    + IN_RECOVERY + " FROM (SELECT 1) AS one "
                    "LEFT JOIN pg_prepared_xacts p ON p.gid = %s",
                    (gid,),
                ).fetchall()
                # A standby lists nothing: "not found" there would be a lie.
                require_primary(rows[0][3], f"participant {name!r}", name, conn.info.dsn)
            except psycopg.Error as e:
                conn.close()
                unreachable.append(f"{name}: {redact(str(e))}")
                continue
            except NotPrimary as e:
                conn.close()
                raise ResolveRefused(f"{e}") from e
            rows = [r for r in rows if r[0] is not None]
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
    except NotPrimary as e:  # its decisions may lag behind the primary's
        lconn.close()
        raise ResolveRefused(str(e)) from e
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


# -- Paxos mode ---------------------------------------------------------------------


def _resolve_paxos(
    config: Config, log: PaxosLog, gid: str, name: str, owner: str,
    pconn: psycopg.Connection[Any], *, action: str, force: bool, grace: float,
    audit: dict[str, Any],
) -> ResolveResult:
    """:func:`resolve` in Paxos mode (the rules are in the module docstring)."""
    # Before anything is proposed: a refusal must not leave a decision behind it.
    _check_privilege(pconn, gid, name, owner)
    decision, forced, detail = _paxos_decision(log, gid, name, action, force, grace)
    rows = _paxos_audit(config, log, gid=gid, participant=name, action=action, forced=forced,
                        log_decision=decision, **audit)
    where = ", ".join(f"{i} in {dsn}" for dsn, i in rows)
    outcome = _finish(pconn, gid, name, owner, action, f"audit rows {where}")
    return ResolveResult(gid, name, action, forced, decision, outcome, rows[0][1], detail, rows)


def _paxos_decision(
    log: PaxosLog, gid: str, name: str, action: str, force: bool, grace: float
) -> tuple[Decision, bool, str]:
    """(decision, forced, how it is known) for ``gid``, proposing abort if that is
    what it takes; ResolveRefused when ``action`` may not be done."""
    parsed = PaxosGid.parse(gid)
    if parsed is None:
        why = ("a gid of the single-database log mode; this configuration uses a Paxos log"
               if Gid.parse(gid) is not None else "not a txmgr gid")
        return "not ours", _check_rules(gid, name, action, "not ours", why, force), why
    txid, voters = parsed.txid, parsed.voters
    view = _read_voters(log, txid, voters)
    known = settled(voters, view.replies)
    if known is None and len(view.replies) < voters.quorum:
        if len(view.replies) + view.unreachable < voters.quorum:
            # No majority of its voters can ever answer in this configuration:
            # for it, this Paxos log is another log.
            why = (f"fewer than {voters.quorum} of the {len(voters)} log databases that "
                   f"registered transaction {txid} exist in this configuration (re-created "
                   f"empty, or no longer listed), so it can never be decided here: "
                   f"{view.describe()}")
            return "not ours", _check_rules(gid, name, action, "not ours", why, force), why
        raise ResolveRefused(_no_majority(gid, name, txid, voters, view))
    proposed = False
    if known is None:
        if action == "commit" and not view.commit_seen:
            raise ResolveRefused(
                f"{gid!r} on {name}: nobody decided transaction {txid} yet, and no log "
                f"database that answered accepted commit for it ({view.describe()}). Only its "
                "coordinator may propose commit, once every branch is prepared, and resolve "
                "cannot know that every branch was; --force cannot override this. Use "
                "--rollback (it proposes abort; Paxos keeps a commit if one was accepted "
                "where it counts), or let recovery decide (`txmgr recover`)"
            )
        state = coordinator_state(view.alive, voters.quorum, voters)
        if state == "alive":
            raise ResolveRefused(
                f"{gid!r} on {name}: transaction {txid} is undecided and its coordinator is "
                "alive inside the protocol (its process holds its liveness lock on the log "
                "databases): it decides the transaction itself; wait and try again — "
                "--force cannot override this"
            )
        if not may_decide(state, view.age, grace):
            raise ResolveRefused(
                f"{gid!r} on {name}: transaction {txid} is undecided and was registered "
                f"{view.age:.1f}s ago, within its coordinator's grace ({grace:g}s, the log's "
                "idle_timeout): the coordinator may still be committing it (in progress); "
                "wait and try again, or let `txmgr recover` decide it after the grace — "
                "--force cannot override this"
            )
        try:
            known = log.recover(txid, voters)  # phases 1 and 2, as recovery does
        except TxmgrError as e:
            raise ResolveRefused(
                f"{gid!r} on {name}: could not run a Paxos round for transaction {txid}: "
                f"{redact(str(e))}; nothing was done"
            ) from None
        proposed = True
        if not (known.commits or known.rolls_back):
            raise ResolveRefused(
                f"{gid!r} on {name}: transaction {txid} could not be decided now "
                f"({known.detail}); nothing was done: try again, or run `txmgr recover`"
            )
    decision: Decision = "commit" if known.commits else "abort"
    detail = _outcome_text(known) + (" (decided by this command's Paxos round)"
                                      if proposed else "")
    if (decision, action) in (("commit", "rollback"), ("abort", "commit")):
        logged = "committed" if decision == "commit" else "rolled back"
        raise ResolveRefused(
            f"{gid!r} on {name}: the Paxos log decided {decision} for transaction {txid}: "
            f"{detail}; a {action} would break atomicity (its other branches are {logged}, "
            f"or will be). Use --{'commit' if decision == 'commit' else 'rollback'}, or let "
            "recovery do it (`txmgr recover`) — --force cannot override the log"
        )
    return decision, False, detail


@dataclass(frozen=True, slots=True)
class _VotersView:
    """What the log databases hold of one transaction, counted as Paxos counts it."""

    replies: dict[str, Reply]  # by incarnation: the voters that answered
    unreachable: int  # log databases that did not answer and may be voters
    age: float  # seconds since its registration (oldest slot seen)
    commit_seen: bool  # a voter that answered accepted commit
    lines: tuple[str, ...]  # per log database, for messages
    alive: dict[str, bool]  # by voter: its coordinator's liveness lock is held there

    def describe(self) -> str:
        return "; ".join(self.lines)


def _read_voters(log: PaxosLog, txid: str, voters: Voters) -> _VotersView:
    """Read ``txid``'s slot on every log database (writes nothing)."""
    try:
        statuses: list[AcceptorStatus] = log.slots([txid])
    except TxmgrError as e:
        raise ResolveRefused(
            f"could not read the Paxos log: {redact(str(e))}; nothing was done") from None
    replies: dict[str, Reply] = {}
    unreachable = 0
    age = 0.0
    commit_seen = False
    lines = []
    alive: dict[str, bool] = {}
    for st in statuses:
        if st.error is not None or st.incarnation is None:
            # It may be a voter, unless an earlier answer of the same link showed
            # an incarnation that is not one (the voter it was is gone for good).
            if st.incarnation is None or st.incarnation in voters:
                unreachable += 1
            lines.append(f"{st.dsn}: did not answer ({st.error})")
            continue
        slot = st.slots.get(txid)
        if st.incarnation not in voters:
            lines.append(f"{st.dsn}: not one of its voters")
            continue
        replies[st.incarnation] = Reply("gone") if slot is None else Reply("ok", slot)
        if slot is None:
            lines.append(f"{st.dsn}: voter, no longer has it")
            continue
        age = max(age, st.ages.get(txid, 0.0))
        if txid in st.alive:
            alive[st.incarnation] = st.alive[txid]
        commit_seen = commit_seen or slot.holds_commit
        accepted = (f"accepted {slot.accepted_value} at ballot {slot.accepted_ballot}"
                    if slot.accepted_value is not None else "nothing accepted")
        lines.append(f"{st.dsn}: voter, promised ballot {slot.promised}, {accepted}")
    return _VotersView(replies, unreachable, age, commit_seen, tuple(lines), alive)


def _no_majority(gid: str, name: str, txid: str, voters: Voters, view: _VotersView) -> str:
    return (
        f"{gid!r} on {name}: only {len(view.replies)} of the {len(voters)} log databases "
        f"that registered transaction {txid} answered, {voters.quorum} are needed: "
        f"{view.describe()}. Its outcome can be neither learned nor decided, so nothing was "
        "done, and --force cannot override this: a rollback could undo a commit that the "
        "others chose (its other branches may be committed already), a commit could commit "
        "a transaction whose other branches never prepared. Bring those log databases back "
        "and run `txmgr recover` (or this command again). If they are lost for good, "
        "re-create them empty with `txmgr migrate` (never restore one from a backup): the "
        "transaction then counts as another log's, and --force finishes its branches on "
        "your own knowledge of its outcome"
    )


def _outcome_text(known: Outcome) -> str:
    if known.decision == "forgotten":
        return f"forgotten: {known.detail}"
    return f"{known.decision} {known.detail}".strip()


def _paxos_audit(config: Config, log: PaxosLog, **values: Any) -> tuple[tuple[str, int], ...]:
    """Write the audit row to every log database that answers: (masked DSN, id) each.

    A majority must take it, as a decision would; otherwise the branch is not touched.
    """
    rows: list[tuple[str, int]] = []
    problems: list[str] = []
    for dsn in log.dsns:
        try:
            conn = connect(dsn, "log", connect_timeout=config.connect_timeout,
                           autocommit=True, application_name="txmgr-resolve")
        except TxmgrError as e:
            problems.append(redact(str(e)))
            continue
        try:
            rows.append((mask(dsn), _audit(conn, **values)))
        except ResolveError as e:
            problems.append(f"{mask(dsn)}: {e}")
        finally:
            conn.close()
    if len(rows) < log.quorum:
        decided = values["log_decision"]
        after = (f"; the transaction's decision ({decided}) stands, and `txmgr recover` "
                 "finishes the branch as decided" if decided in ("commit", "abort") else "")
        # Like an unreachable log in the default mode: refused, the branch untouched.
        raise ResolveRefused(
            f"the audit row was written on {len(rows)} of {len(log.dsns)} Paxos log databases, "
            f"{log.quorum} are needed, so the branch was not touched{after}: "
            + "; ".join(problems)
        )
    return tuple(rows)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid:{os.getuid()}"

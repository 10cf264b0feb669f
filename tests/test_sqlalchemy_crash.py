"""The same bank transfer, killed between prepare and commit: SQLAlchemy's own
two-phase commit against txmgr's TwoPhaseSession.

A child process moves 40 from account 1 of participant "a" to account 1 of
participant "b" through the ORM and SIGKILLs itself part-way through the
commit; the test then measures what is left on the servers:

- plain ``Session(twophase=True)``: the prepared transactions stay, nothing
  records what was decided, txmgr's recovery does not (cannot) touch them, and
  killed between its COMMIT PREPAREDs the money is out of balance until a
  human guesses which way to finish the rest;
- ``txmgr.sqlalchemy`` at the same points: ``txmgr.recover`` finishes every
  branch as decided and the money adds up.

Run as a script (``python tests/test_sqlalchemy_crash.py SPEC_JSON``) it is the child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event, orm

import txmgr
from orm_models import AccountA, AccountB, BaseA, BaseB
from support import START, Bank, query

pytestmark = pytest.mark.crash

AMOUNT = 40


# -- the child process -------------------------------------------------------------------


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _transfer(session: orm.Session) -> None:
    source, target = session.get(AccountA, 1), session.get(AccountB, 1)
    assert source is not None and target is not None
    source.balance -= AMOUNT
    target.balance += AMOUNT
    session.commit()


def _plain_sqlalchemy(spec: dict[str, Any]) -> None:
    """SQLAlchemy's own two-phase commit over two engines, killed at spec["kill_at"]:
    "after_prepares" (every branch prepared, none committed) or "between_commits"
    (one COMMIT PREPARED done, the other not sent)."""
    engines = {name: sa.create_engine(sa.make_url(dsn).set(drivername="postgresql+psycopg"))
               for name, dsn in spec["participants"].items()}
    commits: list[str] = []

    def prepared(conn: sa.Connection, xid: Any) -> None:
        print("PREPARING", xid, flush=True)

    def committing(conn: sa.Connection, xid: Any, is_prepared: bool) -> None:
        commits.append(xid)  # runs before the COMMIT PREPARED of this connection
        if spec["kill_at"] == "after_prepares" or len(commits) == 2:
            _die()

    for engine in engines.values():
        event.listen(engine, "prepare_twophase", prepared)
        event.listen(engine, "commit_twophase", committing)
    session = orm.Session(binds={AccountA: engines["a"], AccountB: engines["b"]},
                          twophase=True)
    _transfer(session)


def _txmgr_session(spec: dict[str, Any]) -> None:
    """The same transfer through txmgr's TwoPhaseSession, killed by txmgr's hooks."""
    import txmgr.sqlalchemy
    from txmgr.testing.killed_coordinator import KillingHooks

    hooks = KillingHooks(spec["kill_at"], spec["participants"])
    tm = txmgr.TransactionManager(spec["participants"], spec["log"], pool_min_size=0,
                                  hooks=hooks)
    Session = txmgr.sqlalchemy.sessionmaker(tm, binds={BaseA: "a", BaseB: "b"})
    with Session() as session:
        session.get(AccountA, 1)  # opens the global transaction
        tx = session.txmgr_transaction
        assert tx is not None
        print("TXID", tx.txid, flush=True)
        _transfer(session)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec["mode"] == "sqlalchemy":
        _plain_sqlalchemy(spec)
    else:
        _txmgr_session(spec)
    sys.exit(3)  # still alive: the kill point was never reached


# -- the tests ---------------------------------------------------------------------------


def run_child(bank: Bank, mode: str, kill_at: str) -> list[str]:
    """Run a child that SIGKILLs itself; the lines it printed."""
    spec = {"mode": mode, "participants": bank.dsns, "log": bank.log, "kill_at": kill_at}
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def prepared_gids(bank: Bank, name: str) -> list[str]:
    """Every prepared transaction of participant ``name``'s database, txmgr's or not."""
    return [r[0] for r in query(bank.dsns[name], "SELECT gid FROM pg_prepared_xacts "
                                                 "WHERE database = current_database()")]


def locked(bank: Bank, name: str) -> bool:
    """Is account 1 of ``name`` locked by somebody (a prepared transaction)?"""
    try:
        query(bank.dsns[name], "SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE NOWAIT")
    except psycopg.errors.LockNotAvailable:
        return True
    return False


def finish_by_hand(bank: Bank, command: str) -> None:
    for name, dsn in bank.dsns.items():
        for gid in prepared_gids(bank, name):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(psycopg.sql.SQL(command + " {}").format(psycopg.sql.Literal(gid)))


def recover_until_settled(bank: Bank, timeout: float = 30.0) -> txmgr.RecoveryReport:
    """Recovery passes until no branch is "in progress" (a killed coordinator's decision
    transaction ends once the log server notices the closed socket)."""
    deadline = time.monotonic() + timeout
    while True:
        report = txmgr.recover(bank.config())
        if report.in_progress == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_plain_sqlalchemy_killed_between_commits_breaks_atomicity(bank: Bank) -> None:
    lines = run_child(bank, "sqlalchemy", "between_commits")
    xids = sorted(line.split()[1] for line in lines if line.startswith("PREPARING"))
    assert len(xids) == 2 and all(x.startswith("_sa_") for x in xids)
    left = {name: prepared_gids(bank, name) for name in bank.dsns}
    # One branch committed, the other is prepared and stays so: no process will
    # ever finish it, and nothing says whether it should commit.
    assert sorted(len(gids) for gids in left.values()) == [0, 1]
    [in_doubt_name] = [name for name, gids in left.items() if gids]
    [in_doubt_gid] = left[in_doubt_name]
    assert in_doubt_gid in xids
    moved = {"a": START - bank.balance("a"), "b": bank.balance("b") - START}
    committed_name = "b" if in_doubt_name == "a" else "a"
    assert moved == {committed_name: AMOUNT, in_doubt_name: 0}
    assert bank.total() != bank.expected_total  # money was created or destroyed
    assert locked(bank, in_doubt_name)  # and the account is locked meanwhile
    # txmgr's recovery leaves other people's prepared transactions alone.
    report = txmgr.recover(bank.config())
    assert report.ok and report.resolutions == []
    assert prepared_gids(bank, in_doubt_name) == [in_doubt_gid]
    # A human who knows the other branch committed (we wrote the script) commits it.
    finish_by_hand(bank, "COMMIT PREPARED")
    assert bank.total() == bank.expected_total
    assert (bank.balance("a"), bank.balance("b")) == (START - AMOUNT, START + AMOUNT)


def test_plain_sqlalchemy_killed_after_prepares_leaves_locks_forever(bank: Bank) -> None:
    run_child(bank, "sqlalchemy", "after_prepares")
    left = {name: prepared_gids(bank, name) for name in bank.dsns}
    assert all(len(gids) == 1 and gids[0].startswith("_sa_") for gids in left.values())
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    assert locked(bank, "a") and locked(bank, "b")
    report = txmgr.recover(bank.config())
    assert report.ok and report.resolutions == []  # not txmgr's: nobody decides
    assert {name: prepared_gids(bank, name) for name in bank.dsns} == left
    finish_by_hand(bank, "ROLLBACK PREPARED")
    assert not locked(bank, "a") and not locked(bank, "b")


@pytest.mark.parametrize(("kill_at", "in_doubt", "committed"), [
    ("before_decision", 2, False),  # every branch prepared, nothing decided
    ("after_decision", 2, True),  # decided, no branch committed
    ("after_commit_prepared", 1, True),  # between the COMMIT PREPAREDs
])
def test_txmgr_session_killed_mid_commit_is_finished_by_recovery(
    bank: Bank, kill_at: str, in_doubt: int, committed: bool
) -> None:
    lines = run_child(bank, "txmgr", kill_at)
    txid = next(line.split()[1] for line in lines if line.startswith("TXID"))
    left = bank.prepared()
    assert len(left) == in_doubt and all(f"_{txid}_" in gid for gid in left)
    assert bank.decisions() == ([txid] if committed else [])
    report = recover_until_settled(bank)
    assert report.ok, report.errors
    assert (report.committed, report.rolled_back) == ((in_doubt, 0) if committed
                                                      else (0, in_doubt))
    moved = AMOUNT if committed else 0
    assert (bank.balance("a"), bank.balance("b")) == (START - moved, START + moved)
    assert bank.total() == bank.expected_total
    assert bank.prepared() == [] and bank.decisions() == []
    assert not locked(bank, "a") and not locked(bank, "b")


if __name__ == "__main__":
    main(sys.argv[1:])

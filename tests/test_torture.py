"""The bank torture test (txmgr.torture), its nemesis schedule and its checker.

The torture runs are marked ``soak``: a CI version by default (60 s of faults
with a dedicated log, 30 s with the log inside a participant), 10 and 5
minutes with ``TXMGR_SOAK=1``. The seed is random unless
``TXMGR_TORTURE_SEED`` is set; a failure prints it, and the same seed
replays the same fault schedule.

A checker that cannot fail proves nothing: ``test_checker_reports_*`` plant
each kind of violation in real databases and check that it is reported.
"""

from __future__ import annotations

import os
import random
import secrets
from itertools import islice
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import START, MakeBank, query
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase
from txmgr.torture import KINDS, TortureOptions, run_torture, schedule
from txmgr.torture._checker import (
    BankState,
    Leftovers,
    SecretScan,
    check,
    read_bank,
    read_leftovers,
    read_log_text,
    scan_for_secret,
)
from txmgr.torture._records import Records, RecordWriter, read_records
from txmgr.torture._workload import START_BALANCE, create_schema

LONG = os.environ.get("TXMGR_SOAK", "") == "1"


# -- the schedule ------------------------------------------------------------------


def test_a_seed_replays_the_same_schedule() -> None:
    first = list(islice(schedule(7), 100))
    assert first == list(islice(schedule(7), 100))
    assert first != list(islice(schedule(8), 100))


def test_every_round_of_the_schedule_has_every_kind() -> None:
    faults = list(islice(schedule(random.randrange(1 << 30)), 3 * len(KINDS)))
    for r in range(3):
        round_ = faults[r * len(KINDS):(r + 1) * len(KINDS)]
        assert sorted(f.kind for f in round_) == sorted(KINDS)
    assert [f.number for f in faults] == list(range(len(faults)))


def test_schedule_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        next(schedule(1, ["kill_client", "flood"]))


# -- the checker ---------------------------------------------------------------------


def _records(tmp_path: Path, lines: list[tuple[str, ...]]) -> Records:
    path = tmp_path / "c0.1.rec"
    writer = RecordWriter(path)
    for fields in lines:
        writer.write(*fields)
    writer.close()
    with path.open("a") as f:
        f.write("K torn-line-without-newline")  # what a SIGKILL mid-write leaves
    return read_records([path])


def test_records_parse_outcomes_and_cut_short_attempts(tmp_path: Path) -> None:
    recs = _records(tmp_path, [
        ("A", "t1", "ab"), ("K", "t1"),
        ("A", "t2", "cd"), ("X", "t2", "TransactionAborted"),
        ("A", "t3", "ef"), ("U", "t3", "OutcomeUnknown"),
        ("A", "t4", "01"),  # killed before its outcome
        ("F", "before_decision", "raise"),
    ])  # fmt: skip
    assert recs.attempted == {"t1", "t2", "t3", "t4"}
    assert recs.acked == {"t1"}  # the torn line is not taken
    assert recs.aborted == {"t2": "TransactionAborted"}
    assert recs.unknown == {"t3": "OutcomeUnknown", "t4": "cut short"}
    assert recs.failpoints == {"before_decision=raise": 1}


def test_checker_judges_money_and_ledger_without_databases() -> None:
    state = BankState(
        balances={"a": {1: START_BALANCE - 5, 2: -5}, "b": {1: START_BALANCE + 5, 2: 1010}},
        ledger={"a": [("t1", 1, -5)], "b": [("t1", 1, 5)]},
    )
    recs = Records(attempted={"t1"}, acked={"t1"})
    report = check(state, recs, Leftovers(), SecretScan(), accounts=2,
                   start_balance=START_BALANCE)
    kinds = report.violation_counts()
    # a: account 2 went negative (and off its ledger); b: account 2 has 10 of nowhere
    assert kinds == {"negative": 1, "ledger": 2, "money": 1}, report.violations
    assert report.committed == 1 and report.acked == 1
    assert not report.ok


def _bank(make_database: MakeDatabase, servers: list[Server]) -> tuple[dict[str, str], str]:
    dsns = {n: make_database(servers[i % len(servers)]) for i, n in enumerate(("bank1", "bank2"))}
    for dsn in dsns.values():
        create_schema(dsn, accounts=3)
    log = make_database(servers[0])
    txmgr.migrate(log)
    return dsns, log


def _move(dsns: dict[str, str], tid: str, legs: dict[str, tuple[int, int]]) -> None:
    """Write ledger rows and balance changes directly (no txmgr): planted state."""
    for name, (account, delta) in legs.items():
        query(dsns[name], "UPDATE accounts SET balance = balance + %s WHERE id = %s",
              (delta, account))
        query(dsns[name], "INSERT INTO ledger VALUES (%s, %s, %s)", (tid, account, delta))


def test_checker_reports_each_planted_violation(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    dsns, log = _bank(make_database, pg_servers)
    secret = "tpw" + secrets.token_hex(12)
    servers = {f"s{i}": s.admin_dsn for i, s in enumerate(pg_servers)}
    clean_log = tmp_path / "client0.1.log"
    clean_log.write_text("WARNING txmgr: cannot connect to 'bank1' at user:****@host\n")

    # A clean state first: one committed, acknowledged transfer, one aborted.
    _move(dsns, "t1", {"bank1": (1, -10), "bank2": (2, 10)})
    recs = _records(tmp_path, [("A", "t1", "x"), ("K", "t1"),
                               ("A", "t9", "y"), ("X", "t9", "TransactionAborted")])

    ours = {conninfo_to_dict(d)["dbname"] for d in [*dsns.values(), log]}

    def leftovers() -> Leftovers:
        # Only this test's databases: the session's servers are shared.
        found = read_leftovers(servers, log)
        found.prepared = [p for p in found.prepared if p.split("/")[1] in ours]
        return found

    def verdict(files: list[Path]) -> txmgr.torture.CheckReport:
        return check(read_bank(dsns), recs, leftovers(),
                     scan_for_secret(secret, files, {"log tables": read_log_text(log)}),
                     accounts=3, start_balance=START_BALANCE)

    before = verdict([clean_log])
    assert before.ok, before.violations
    assert (before.committed, before.acked, before.aborted) == (1, 1, 1)
    assert before.scan.files == 1 and before.scan.bytes > 0

    # Now break every rule once.
    _move(dsns, "t2", {"bank1": (1, -7)})                          # half a transfer
    recs.attempted |= {"t2", "t3"}
    recs.acked.add("t3")                                           # acked, never written
    _move(dsns, "t9", {"bank1": (3, -4), "bank2": (3, 4)})         # aborted, yet committed
    _move(dsns, "t5", {"bank1": (2, -1), "bank2": (1, 1)})         # nobody attempted it
    recs.unknown["t6"] = "unexpected:OperationalError"             # commit() leaked a raw error
    recs.unknown["t7"] = "unexpected:ParticipantUnavailable"       # (a fixed bug) leaked too
    leaked = tmp_path / "daemon0.1.log"
    leaked.write_text(f"ERROR could not connect: postgresql://torture:{secret}@h/db\n")
    with psycopg.connect(dsns["bank2"]) as conn:                   # a forgotten branch
        conn.execute("UPDATE accounts SET balance = balance WHERE id = 1")
        conn.execute("PREPARE TRANSACTION 'torture_planted'")
    query(log, "INSERT INTO txmgr_decision (txid, lxid, participants) "
               "VALUES ('00000000000000aa', '5', ARRAY[%s])", (secret,))

    after = verdict([clean_log, leaked])
    kinds = after.violation_counts()
    assert kinds == {
        "money": 1, "atomicity": 1, "durability": 1, "aborted_committed": 1,
        "phantom": 1, "untyped_error": 2, "secret": 2,
    }, after.violations
    assert any("t2" in v.detail for v in after.violations if v.kind == "atomicity")
    assert any("t3" in v.detail for v in after.violations if v.kind == "durability")
    assert after.known_issues == {}
    assert sorted(after.scan.hits) == ["daemon0.1.log:1", "log tables"]
    assert [p.rsplit("/", 1)[1] for p in after.leftovers.prepared] == ["torture_planted"]
    assert after.leftovers.decisions == ["00000000000000aa"]
    assert not after.ok
    query(dsns["bank2"], "ROLLBACK PREPARED 'torture_planted'")


# -- the torture ---------------------------------------------------------------------


def _seed() -> int:
    env = os.environ.get("TXMGR_TORTURE_SEED", "").strip()
    return int(env) if env else random.randrange(1 << 31)


@pytest.fixture
def own_servers() -> None:
    if os.environ.get("TXMGR_TEST_DSNS", "").strip():
        pytest.skip("the torture test crashes servers of its own; TXMGR_TEST_DSNS asks "
                    "for existing servers only")


@pytest.mark.soak
@pytest.mark.crash
@pytest.mark.timeout(1800 if LONG else 600)
@pytest.mark.parametrize(
    ("log", "participants", "seconds"),
    [("dedicated", 2, 600 if LONG else 60), ("participant", 3, 300 if LONG else 30)],
)
def test_torture(own_servers: None, log: str, participants: int, seconds: float) -> None:
    seed = _seed()
    # No tmp_path: other pytest sessions on the machine may prune it mid-run. The
    # run's own temporary directory is removed after a clean run, kept (and
    # named in the report) otherwise.
    report = run_torture(
        TortureOptions(seconds=seconds, seed=seed, participants=participants,
                       log="participant" if log == "participant" else "dedicated",
                       clients=4),
        echo=print,
    )
    text = report.text()
    print(text)
    assert report.nemesis_seconds >= seconds
    assert report.check.violations == [], text
    assert report.check.leftovers.count == 0, text
    assert report.harness_errors == [], text
    assert {k: report.effective[k] for k in KINDS if not report.effective[k]} == {}, text
    # the workload really ran, and the faults really hurt
    assert report.check.committed > 100, text
    assert report.check.acked <= report.check.committed, text
    assert report.check.errors.get("TransactionAborted", 0) > 0, text
    assert report.check.scan.files > report.options.clients, text
    assert report.ok


# -- bugs the torture found ------------------------------------------------------------


def test_unreachable_log_participant_aborts_the_commit(make_bank: MakeBank) -> None:
    bank = make_bank(("a", "b", "c"), log="a")
    tm = bank.manager(pool_min_size=0, pool_max_size=1, connect_timeout=1)
    holder = tm.transaction()  # holds the log participant's only pooled connection
    holder.connection("a").execute("SELECT 1")
    try:
        tx = tm.transaction()
        tx.connection("b").execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        tx.connection("c").execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")
        with pytest.raises(txmgr.TransactionAborted):
            tx.commit()  # the decision needs a branch of "a": none within 1 s
        assert tx.state is txmgr.TransactionState.ROLLED_BACK
    finally:
        holder.rollback()
    assert (bank.balance("b"), bank.balance("c")) == (START, START)
    assert bank.prepared() == []

"""The bank torture test (txmgr.torture), its nemesis schedule and its checker.

The torture runs are marked ``soak``: a CI version by default (15 s of faults
each, with a dedicated log, with the log inside a participant and in Paxos
mode; each goes on until every one of its kinds hit something, one round of
them at least). The CI versions share the kinds out (:data:`CI_KINDS`): every
kind runs in one of them at least, so the three together cover all 17 in
about half the time that every kind in each would take. With ``TXMGR_SOAK=1``:
10, 5 and 5 minutes, each with every kind of its mode. Three more, 10 s each:
through PgBouncer in transaction and in session mode (:data:`POOLER_CI_KINDS`),
and with a synchronous standby of every server (:data:`STANDBY_CI_KINDS`:
failovers, a lagging standby refused); 5 minutes each with every kind of their
mode with ``TXMGR_SOAK=1``. And the hot-account
workload (distributed deadlocks, deadlines): 20 s with 5 kinds, or 5 minutes
with every kind. The seed is random unless
``TXMGR_TORTURE_SEED`` is set; a failure prints it, and the same seed
replays the same fault schedule.

A checker that cannot fail proves nothing: ``test_checker_reports_*`` plant
each kind of violation in real databases and check that it is reported.
"""

from __future__ import annotations

import os
import random
import re
import secrets
from itertools import islice
from pathlib import Path
from typing import Literal

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import START, MakeBank, query
from txmgr.paxos._acceptor import (
    PREPARE_ALL,
    STATEMENTS,
    accept_many_query,
    accept_query,
    register_query,
)
from txmgr.paxos._core import ABORT, Value
from txmgr.testing import Server
from txmgr.testing.pytest_plugin import MakeDatabase
from txmgr.torture import KINDS, PAXOS_KINDS, TortureOptions, run_torture, schedule
from txmgr.torture._acceptors import AcceptorSamples, read_accepted
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
from txmgr.torture._kinds import ALL_KINDS, kinds_for
from txmgr.torture._nemesis import Fault
from txmgr.torture._paxos_faults import MAX_DOWN, LogOutages
from txmgr.torture._records import Records, RecordWriter, Voters, read_records
from txmgr.torture._rules import ACCEPT_PATTERN, ACCEPT_STATEMENT
from txmgr.torture._waits import wait_bound
from txmgr.torture._workload import START_BALANCE, create_schema

LONG = os.environ.get("TXMGR_SOAK", "") == "1"
# The CI versions' kinds, per log mode. A run goes on until each of its kinds hit
# something, so every kind in each run made each take 40-60 s; shared out, each
# kind still runs in CI (checked below) in the mode where it bites most: the log's
# faults against a dedicated log, the participants' where the log is one of them
# (its branch commits in one phase), the log databases' in Paxos mode. Killed
# clients and crash failpoints, which strand transactions mid-protocol, in all three.
# Where the mode's own faults may end no commit() in TransactionAborted (a seed
# whose log outages all ended in OutcomeUnknown; PgBouncer's errors, raised inside
# the block), a lost PREPARE is added: it always aborts its transaction, so the
# "the faults really hurt" check below does not rest on timing.
CI_KINDS: dict[str, tuple[str, ...]] = {
    "dedicated": ("kill_client", "kill_daemon", "restart_log", "drop_log_commit",
                  "log_outage", "failpoint_crash", "failpoint_raise", "failpoint_sleep"),
    "participant": ("kill_client", "restart_participant", "drop_connections", "drop_prepare",
                    "drop_commit_prepared", "partition", "failpoint_crash"),
    "paxos": ("kill_client", "kill_daemon", "drop_log_commit", "failpoint_crash", "stop_log",
              "wipe_log", "isolate_log", "two_logs_down", "drop_prepare"),
}


# -- the schedule ------------------------------------------------------------------
# The CI version of the hot run: the faults that hit the detector's daemons,
# the clients and the participants' sessions (the others are the bank runs').
# The CI versions of the runs through PgBouncer: the faults a pooler stands in the
# way of (a killed client's open transactions, server restarts and dropped server
# connections behind the pooler, lost statements, the daemons' leadership).
POOLER_CI_KINDS = {
    "transaction": ("kill_client", "kill_daemon", "restart_log", "drop_log_commit",
                    "failpoint_crash", "drop_prepare"),
    "session": ("kill_client", "restart_participant", "drop_connections", "drop_prepare",
                "failpoint_crash"),
}
# The CI version of the failover run (every server with a synchronous standby).
STANDBY_CI_KINDS = ("failover_participant", "failover_log", "stale_replica", "kill_client",
                    "restart_participant", "drop_commit_prepared", "failpoint_crash")
HOT_CI_KINDS = ("kill_client", "kill_daemon", "restart_participant", "drop_connections",
                "partition")


def test_a_seed_replays_the_same_schedule() -> None:
    first = list(islice(schedule(7), 100))
    assert first == list(islice(schedule(7), 100))
    assert first != list(islice(schedule(8), 100))


@pytest.mark.parametrize("kinds", [KINDS, PAXOS_KINDS], ids=["single log", "paxos"])
def test_every_round_of_the_schedule_has_every_kind(kinds: tuple[str, ...]) -> None:
    faults = list(islice(schedule(random.randrange(1 << 30), kinds), 3 * len(kinds)))
    for r in range(3):
        round_ = faults[r * len(kinds):(r + 1) * len(kinds)]
        assert sorted(f.kind for f in round_) == sorted(kinds)
    assert [f.number for f in faults] == list(range(len(faults)))


def test_the_ci_runs_cover_every_kind() -> None:
    assert set().union(*CI_KINDS.values()) == set(PAXOS_KINDS)
    assert set(PAXOS_KINDS) | set(STANDBY_CI_KINDS) == set(ALL_KINDS)
    for log, kinds in CI_KINDS.items():
        TortureOptions(log=log, kinds=kinds)  # each applies to its mode
    TortureOptions(kinds=STANDBY_CI_KINDS, standby=True)


def test_failover_kinds_need_a_standby_of_every_server() -> None:
    with pytest.raises(ValueError, match=r"\['failover_log'\] do not apply"):
        TortureOptions(kinds=("kill_client", "failover_log"))
    with pytest.raises(ValueError, match=r"\['failover_log'\] do not apply"):
        TortureOptions(log="participant", kinds=("failover_log",), standby=True)
    with pytest.raises(ValueError, match="single-log modes, without a pooler"):
        TortureOptions(log="paxos", standby=True)
    assert "failover_participant" in TortureOptions(log="participant", standby=True).kinds


def test_schedule_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        next(schedule(1, ["kill_client", "flood"]))


def test_options_take_the_fault_kinds_of_their_log_mode() -> None:
    assert TortureOptions().kinds == KINDS
    assert TortureOptions(log="paxos").kinds == PAXOS_KINDS
    assert set(KINDS) < set(PAXOS_KINDS)  # every kind stays; the log ones pick a database
    with pytest.raises(ValueError, match=r"\['wipe_log'\] do not apply with log='dedicated'"):
        TortureOptions(kinds=("kill_client", "wipe_log"))


def test_log_outages_never_take_more_than_two_of_three_down() -> None:
    outages = LogOutages(3)

    def fault(target: int) -> Fault:
        return Fault(number=0, gap=0.0, kind="two_logs_down", target=target, variant=0,
                     seconds=1.0)

    assert outages.choose(fault(4), 2) == [1, 2]  # from the draw on, round the ring
    assert outages.choose(fault(0), 3) is None
    outages.down[1] = "stopped"
    assert outages.choose(fault(1), 1) == [2]  # the draw's target is down: the next one
    assert outages.choose(fault(1), 2) is None  # that would make three
    outages.down[2] = "isolated"
    assert len(outages.down) == MAX_DOWN
    assert outages.choose(fault(0), 1) is None


def test_the_accept_pattern_matches_the_acceptors_accept_only() -> None:
    # The nemesis loses phase-2 statements by their name: it must still be theirs.
    assert ACCEPT_STATEMENT in STATEMENTS
    txid = "0123456789abcdef"
    accept = accept_query(txid, 0, Value.commit(["bank1", "bank2"])).as_string(None)
    assert re.search(ACCEPT_PATTERN, accept, re.IGNORECASE)
    assert f"{ACCEPT_STATEMENT}_many" in STATEMENTS
    combined = accept_many_query([(txid, Value.commit(["bank1"])), ("f" * 16, ABORT)], 0)
    assert re.search(ACCEPT_PATTERN, combined.as_string(None), re.IGNORECASE)
    # Not the statements every session prepares first, nor a registration.
    assert not re.search(ACCEPT_PATTERN, PREPARE_ALL.decode(), re.IGNORECASE)
    assert not re.search(ACCEPT_PATTERN, register_query(txid).as_string(None), re.IGNORECASE)


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
        ("A", "t5", "02"), ("K", "t5", "txid=00000000000000f5", f"voters=2:{'a' * 12},{'b' * 12}"),
        ("A", "t6", "03"), ("X", "t6", "TransactionAborted", "txid=00000000000000f6",
                            "cause=LogQuorumUnavailable"),
    ])  # fmt: skip
    assert recs.attempted == {"t1", "t2", "t3", "t4", "t5", "t6"}
    assert recs.acked == {"t1", "t5"}  # the torn line is not taken
    assert recs.aborted == {"t2": "TransactionAborted", "t6": "TransactionAborted"}
    assert recs.unknown == {"t3": "OutcomeUnknown", "t4": "cut short"}
    assert recs.failpoints == {"before_decision=raise": 1}
    assert recs.txids == {"t5": "00000000000000f5", "t6": "00000000000000f6"}
    assert recs.voters == {"t5": Voters(2, frozenset({"a" * 12, "b" * 12}))}
    assert recs.causes == {"TransactionAborted<-LogQuorumUnavailable": 1}


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


def test_checker_reports_a_planted_overlong_wait(tmp_path: Path) -> None:
    recs = _records(tmp_path, [
        ("A", "h1", "-"), ("W", "h1", "1", "0.800", "DeadlockDetected"),
        ("W", "h1", "2", "3.100", "TransactionTimeout"),
        ("W", "h1", "3", "0.050", "committed"), ("K", "h1"),
        ("A", "h2", "-"), ("W", "h2", "1", "9.500", "TransactionTimeout"),  # over the bound
        ("W", "h2", "2", "30.000", "committed", "faulted=1"), ("K", "h2"),  # failpoint: not judged
    ])  # fmt: skip
    assert [a.waited for a in recs.attempts] == [0.8, 3.1, 0.05, 9.5, 30.0]
    assert recs.attempts[-1].faulted and not recs.attempts[0].faulted
    state = BankState(balances={"a": {1: START_BALANCE}, "b": {1: START_BALANCE}},
                      ledger={"a": [], "b": []})
    recs.acked = set()  # the ledger is empty here: judge the waits alone
    report = check(state, recs, Leftovers(), SecretScan(), accounts=1,
                   start_balance=START_BALANCE, wait_bound=wait_bound(3.0, 0.5))
    assert report.violation_counts() == {"wait": 1}, report.violations
    assert "h2 attempt 1 waited 9.50s" in report.violations[0].detail
    waits = report.waits
    assert waits is not None
    assert (waits.attempts, waits.victims, waits.timeouts) == (5, 1, 2)
    assert (waits.longest, waits.longest_faulted) == (9.5, 30.0)
    assert "deadlock victims=1 timeouts=2 longest wait=9.50s" in waits.text()
    # without a bound (the bank workload) waits are not judged
    assert check(state, recs, Leftovers(), SecretScan(), accounts=1,
                 start_balance=START_BALANCE).ok


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


def _accepted(log: str, txid: str, ballot: int, value: str, parts: list[str] | None) -> None:
    """Plant a slot holding (ballot, value) in a log database, as an acceptor would."""
    query(log, "INSERT INTO txmgr_paxos (txid, promised, accepted_ballot, accepted_value, "
               "participants) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (txid) DO UPDATE SET "
               "promised = excluded.promised, accepted_ballot = excluded.accepted_ballot, "
               "accepted_value = excluded.accepted_value, participants = excluded.participants",
          (txid, ballot, ballot, value, parts))


def test_checker_reports_planted_paxos_violations(
    make_database: MakeDatabase, pg_servers: list[Server], tmp_path: Path
) -> None:
    dsns, _ = _bank(make_database, pg_servers)
    logs = [make_database(pg_servers[i % len(pg_servers)]) for i in range(3)]
    for log in logs:
        txmgr.migrate(log)
    incs = [str(query(log, "SELECT incarnation FROM txmgr_paxos_acceptor")[0][0])
            for log in logs]
    secret = "tpw" + secrets.token_hex(12)
    three = Voters(2, frozenset(incs))
    two = Voters(2, frozenset(incs[:2]))  # registered while log 2 did not answer
    txid = {t: f"{n:016x}" for n, t in enumerate(("t1", "t2", "t3", "t4", "t5"), start=1)}
    recs = Records(attempted=set(txid), acked={"t1"}, txids=dict(txid),
                   voters={"t1": three, "t2": three, "t3": three, "t4": three, "t5": two})
    recs.unknown = {"t2": "OutcomeUnknown", "t3": "cut short", "t4": "OutcomeUnknown",
                    "t5": "OutcomeUnknown"}
    _move(dsns, "t1", {"bank1": (1, -10), "bank2": (2, 10)})  # committed
    _move(dsns, "t3", {"bank1": (2, -3), "bank2": (3, 3)})  # committed
    both = ["bank1", "bank2"]
    samples = AcceptorSamples()

    def sample() -> None:
        for log in logs:
            read_accepted(log, samples)

    def verdict() -> txmgr.torture.CheckReport:
        left = read_leftovers({}, logs)
        scan = scan_for_secret(secret, [], {"log tables": read_log_text(logs)})
        return check(read_bank(dsns), recs, left, scan, accounts=3,
                     start_balance=START_BALANCE, samples=samples)

    # Clean: t1's voters chose commit and it is committed; t5's commit was accepted by
    # one voter and by log 2, which is not its voter: nothing chosen, nothing to judge.
    _accepted(logs[0], txid["t1"], 0, "commit", both)
    _accepted(logs[1], txid["t1"], 0, "commit", both)
    _accepted(logs[0], txid["t5"], 0, "commit", both)
    _accepted(logs[2], txid["t5"], 0, "commit", both)
    sample()
    before = verdict()
    assert before.violations == []
    assert before.decisions_seen == {"commit": 1}
    assert sorted(before.leftovers.slots) == sorted(
        [f"log0/{txid['t1']}", f"log1/{txid['t1']}", f"log0/{txid['t5']}",
         f"log2/{txid['t5']}"])
    assert not before.ok  # slots left over

    # Now: commit chosen for t2 (no rows), abort chosen for t3 (committed), and for
    # t4 commit then abort (both chosen), and the password in an acceptor table.
    for log in logs[:2]:
        _accepted(log, txid["t2"], 0, "commit", both)
        _accepted(log, txid["t4"], 0, "commit", both)
    _accepted(logs[1], txid["t3"], 5 << 32, "abort", None)
    _accepted(logs[2], txid["t3"], 5 << 32, "abort", None)
    sample()
    for log in logs[1:]:
        _accepted(log, txid["t4"], 7 << 32, "abort", None)
    _accepted(logs[2], "00000000000000aa", 0, "commit", [secret])
    sample()
    after = verdict()
    assert after.violation_counts() == {"decision": 3, "secret": 1}, after.violations
    details = " ".join(v.detail for v in after.violations if v.kind == "decision")
    assert "transfer t2" in details and "transfer t3" in details and "transfer t4" in details
    assert "both commit and abort" in details
    assert after.decisions_seen == {"commit": 3, "abort": 2}
    assert "log2/00000000000000aa" in after.leftovers.slots
    assert after.scan.hits == ["log tables"]


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
# One torture at a time (under pytest-xdist, on one worker): each loads both cores
# with clients, daemons and a nemesis; two at once would starve each other.
@pytest.mark.xdist_group("torture")
@pytest.mark.timeout(1800 if LONG else 600)
@pytest.mark.parametrize(
    ("log", "participants", "seconds", "pooler", "standby"),
    [("dedicated", 2, 600 if LONG else 15, "none", False),
     ("participant", 3, 300 if LONG else 15, "none", False),
     ("paxos", 2, 300 if LONG else 15, "none", False),
     # Through a real PgBouncer: transaction pooling (no session state may cross
     # transactions) and session pooling, each with the faults of its log mode.
     ("dedicated", 2, 300 if LONG else 10, "transaction", False),
     ("participant", 3, 300 if LONG else 10, "session", False),
     # Every server with a synchronous standby, and failovers to it.
     ("dedicated", 2, 300 if LONG else 10, "none", True)],
    ids=["dedicated", "participant", "paxos", "dedicated-pgbouncer-transaction",
         "participant-pgbouncer-session", "dedicated-failover"],
)
def test_torture(
    own_servers: None, log: Literal["dedicated", "participant", "paxos"], participants: int,
    seconds: float, pooler: Literal["none", "session", "transaction"], standby: bool,
) -> None:
    from txmgr.testing._pgbouncer import find_pgbouncer

    if pooler != "none" and find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed (the Debian package pgbouncer)")
    seed = _seed()
    # No tmp_path: other pytest sessions on the machine may prune it mid-run. The
    # run's own temporary directory is removed after a clean run, kept (and
    # named in the report) otherwise.
    # Paxos mode: 2 clients of 2 threads each (their commits share accept
    # rounds, which the faults then hit); 4 threads in all, as in the others.
    clients = 2 if log == "paxos" and not LONG else 4
    kinds = (kinds_for(log, standby=standby) if LONG else
             STANDBY_CI_KINDS if standby else
             POOLER_CI_KINDS[pooler] if pooler != "none" else CI_KINDS[log])
    report = run_torture(
        TortureOptions(seconds=seconds, seed=seed, participants=participants, log=log,
                       clients=clients, kinds=kinds, pooler=pooler, standby=standby),
        echo=print,
    )
    text = report.text()
    print(text)
    assert report.nemesis_seconds >= seconds
    assert report.check.violations == [], text
    assert report.check.leftovers.count == 0, text
    assert report.harness_errors == [], text
    assert report.options.kinds == kinds
    assert {k: report.injected[k] for k in kinds if not report.injected[k]} == {}, text
    assert {k: report.effective[k] for k in kinds if not report.effective[k]} == {}, text
    # the workload really ran, and the faults really hurt
    # (a floor, not a rate: a loaded CI machine once committed 52 in a 47 s Paxos run)
    assert report.check.committed > 30, text
    assert report.check.acked <= report.check.committed, text
    assert report.check.errors.get("TransactionAborted", 0) > 0, text
    assert report.check.scan.files > report.options.clients, text
    if log == "paxos":
        assert report.acceptor_reads > 0, text  # the acceptor tables were sampled
    assert report.ok


@pytest.mark.soak
@pytest.mark.crash
@pytest.mark.xdist_group("torture")
@pytest.mark.timeout(1800 if LONG else 600)
def test_torture_hot_accounts(own_servers: None) -> None:
    """Hot accounts in random lock order: distributed deadlocks, broken by the
    daemons' detector; every attempt under a deadline; no wait over its bound."""
    seconds = 300 if LONG else 20
    kinds = KINDS if LONG else HOT_CI_KINDS
    report = run_torture(
        TortureOptions(seconds=seconds, seed=_seed(), workload="hot", kinds=kinds),
        echo=print,
    )
    text = report.text()
    print(text)
    assert report.check.violations == [], text
    assert report.check.leftovers.count == 0, text
    assert report.harness_errors == [], text
    assert {k: report.effective[k] for k in kinds if not report.effective[k]} == {}, text
    waits = report.check.waits
    assert waits is not None, text
    assert waits.victims > 0, text  # deadlocks really happened and were broken
    assert report.check.committed > 30, text
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

"""Standbys and failover (issue 15, findings 2 and 5): a decision log or a participant
DSN that reaches a hot standby is refused on every pass, and nothing is decided from a
replica; a multi-host DSN with ``target_session_attrs=read-write`` follows a promotion.

One primary with a streaming standby for the module; each test has its own databases.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

import txmgr
from support import START, Bank, MakeBank, own_server, query, transfer
from test_bad_input import has_pg_basebackup
from txmgr._leader import LeaderLock, lock_key
from txmgr.daemon import Daemon
from txmgr.resolve import resolve
from txmgr.testing import PgServer, Server

pytestmark = pytest.mark.skipif(not has_pg_basebackup(),
                                reason="needs pg_basebackup to make a standby")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    """A primary and its hot standby, for the whole module."""
    with own_server() as primary, PgServer.standby_of(primary) as standby:
        yield primary, standby


def caught_up(primary: PgServer, standby: PgServer) -> None:
    """Wait until ``standby`` has replayed everything ``primary`` wrote so far."""
    lsn = query(primary.dsn(), "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        while not conn.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
        ).fetchone()[0]:  # type: ignore[index]
            conn.execute("SELECT pg_sleep(0.05)")  # polls a condition; asserts no timing


def on(server: PgServer, dsn: str) -> str:
    """``dsn``'s database on ``server`` (same user and password)."""
    return server.dsn(str(conninfo_to_dict(dsn)["dbname"]))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txmgr.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def config_file(tmp_path: pathlib.Path, participants: dict[str, str], log: str) -> str:
    lines = ["[log]", f'dsn = "{log}"', "", "[participants]"]
    lines += [f'{name} = "{dsn}"' for name, dsn in participants.items()]
    path = tmp_path / "txmgr.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def decided_bank(make_bank: MakeBank, servers: list[Server]) -> tuple[Bank, str]:
    """A bank whose coordinator died right after the commit decision: both branches of
    a 70-transfer a -> b are prepared, the decision row is committed."""
    bank = make_bank(("a", "b"), servers=servers)
    txid = bank.kill_coordinator("after_decision", transfer(70, "a", "b"))
    assert len(bank.prepared()) == 2 and bank.decisions() == [txid]
    return bank, txid


# -- the decision log on a standby ------------------------------------------------------


def test_recover_and_status_refuse_a_standby_log(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
    tmp_path: pathlib.Path,
) -> None:
    primary, standby = pair
    bank, txid = decided_bank(make_bank, [primary, pg_server])
    caught_up(primary, standby)
    cfg = config_file(tmp_path, bank.dsns, on(standby, bank.log))
    for command in ("recover", "status"):
        proc = cli(command, "--config", cfg)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "hot standby" in out and "target_session_attrs=read-write" in out, out
        assert standby.password not in out
    # Nothing was finished from the replica, even though it had the decision.
    assert len(bank.prepared()) == 2 and bank.decisions() == [txid]
    assert txmgr.recover(bank.config()).committed == 2  # the primary finishes it
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START + 70)


def test_a_lagging_standby_log_never_rolls_back_a_committed_decision(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
) -> None:
    """The issue's a=1, b=0: the standby has not replayed the decision yet, so its
    pg_xact_status reads "not committed" and recovery would roll back b while a (the
    coordinator got that far) is committed."""
    primary, standby = pair
    bank = make_bank(("a", "b"), servers=[primary, pg_server])  # the log on the primary
    caught_up(primary, standby)
    standby.pause_replay()
    try:
        txid = bank.kill_coordinator("after_decision", transfer(70, "a", "b"))
        (gid_a,) = bank.prepared("a")
        query(bank.dsns["a"], f"COMMIT PREPARED '{gid_a}'")  # the coordinator got this far
        lagging = txmgr.Config(participants=bank.dsns, log=on(standby, bank.log))
        report = txmgr.recover(lagging)
        assert report.rolled_back == 0, report.summary()
        assert not report.log_reachable, report
        assert any("target_session_attrs=read-write" in e for e in report.errors), report.errors
        assert len(bank.prepared("b")) == 1 and bank.decisions() == [txid]
    finally:
        standby.resume_replay()
    assert txmgr.recover(bank.config()).committed == 1
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START + 70)


def test_resolve_refuses_a_standby_log(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
) -> None:
    primary, standby = pair
    bank, txid = decided_bank(make_bank, [primary, pg_server])
    caught_up(primary, standby)
    config = txmgr.Config(participants=bank.dsns, log=on(standby, bank.log))
    (gid,) = bank.prepared("b")
    with pytest.raises((txmgr.NotPrimary, txmgr.ResolveRefused),
                       match="target_session_attrs=read-write"):
        resolve(config, gid, commit=False, force=True, reason="test")
    assert len(bank.prepared()) == 2 and bank.decisions() == [txid]


def test_confirm_step_refuses_a_lagging_standby_log(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer],
) -> None:
    """The coordinator's confirm step (a lost COMMIT reply, then "what did the log
    decide?") on a fresh connection that lands on a lagging standby — a multi-host
    log DSN without target_session_attrs picks the first host that answers. There
    the committed decision reads as not committed; confirm would then report the
    transaction aborted while it is committed."""
    primary, standby = pair
    bank = make_bank(("a",), servers=[primary])
    caught_up(primary, standby)
    parts = conninfo_to_dict(bank.log)
    either = make_conninfo(host=f"{standby.host},{primary.host}",
                           port=f"{standby.port},{primary.port}", dbname=parts["dbname"],
                           user=parts["user"], password=parts["password"])
    standby.pause_replay()
    try:
        with psycopg.connect(bank.log) as lconn:  # a decision, committed on the primary
            lxid = txmgr.log.open_decision(lconn, "0123456789abcdef", ["a"], idle_timeout=60)
        with txmgr.TransactionManager(bank.dsns, either) as tm:
            try:
                answer: object = tm.read_decision(lxid, "0123456789abcdef")
            except txmgr.TxmgrError as e:
                answer = e
        assert isinstance(answer, txmgr.TxmgrError), f"the standby answered {answer}"
        assert isinstance(answer, txmgr.NotPrimary), answer
        assert "target_session_attrs=read-write" in str(answer)
    finally:
        standby.resume_replay()


def test_daemon_refuses_a_standby_log(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
) -> None:
    primary, standby = pair
    bank, txid = decided_bank(make_bank, [primary, pg_server])
    caught_up(primary, standby)
    daemon = Daemon(txmgr.Config(participants=bank.dsns, log=on(standby, bank.log)))
    try:
        for _ in range(2):  # every pass refuses
            step = daemon.step()
            assert step.state == "unreachable" or (
                step.report is not None and not step.report.log_reachable), step
            healthy, text = daemon.health()
            assert not healthy and "target_session_attrs=read-write" in text, text
    finally:
        daemon.close()
    assert len(bank.prepared()) == 2 and bank.decisions() == [txid]


def test_leader_lock_statement_refuses_a_standby(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer],
) -> None:
    """A hot standby grants pg_try_advisory_xact_lock: unchecked, a daemon whose lock
    session reaches one (a pooler's next server session, say, whatever the log id's
    read saw) would believe it leads. The lock statement itself refuses it, and the
    transaction (and the standby's lock) is ended."""
    primary, standby = pair
    bank = make_bank(("a",), servers=[primary])
    caught_up(primary, standby)
    leader = LeaderLock(on(standby, bank.log), connect_timeout=5)
    try:
        conn = leader._connect()
        with pytest.raises(txmgr.NotPrimary, match="target_session_attrs=read-write") as info:
            leader._try_lock(conn, lock_key("standby-leader-test"))
        assert standby.password not in str(info.value)
        assert conn.info.transaction_status == TransactionStatus.IDLE  # lock given up
    finally:
        leader.release()


# -- a participant DSN on a standby -----------------------------------------------------


def test_recovery_refuses_a_standby_participant_and_keeps_the_decision(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
    tmp_path: pathlib.Path,
) -> None:
    primary, standby = pair
    # a and the log on pg_server, b on the primary; b's DSN then names the standby.
    bank, txid = decided_bank(make_bank, [pg_server, primary])
    caught_up(primary, standby)
    wrong = dict(bank.dsns, b=on(standby, bank.dsns["b"]))
    report = txmgr.recover(txmgr.Config(participants=wrong, log=bank.log))
    assert report.unreachable == ["b"], report
    assert any("target_session_attrs=read-write" in e for e in report.errors), report.errors
    assert report.committed == 1  # a's branch: the decision says commit
    assert bank.decisions() == [txid]  # b was not verified: the row stays
    cfg = config_file(tmp_path, wrong, bank.log)
    for command in ("recover", "status"):
        proc = cli(command, "--config", cfg)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "target_session_attrs=read-write" in proc.stdout + proc.stderr
    # The right DSN: b is committed, then the row goes.
    right = txmgr.recover(bank.config())
    assert right.committed == 1 and right.decisions_deleted == 1, right
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START + 70)
    assert bank.prepared() == [] and bank.decisions() == []


def test_resolve_refuses_a_standby_participant(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
) -> None:
    primary, standby = pair
    bank, txid = decided_bank(make_bank, [pg_server, primary])
    caught_up(primary, standby)
    (gid,) = bank.prepared("b")
    wrong = txmgr.Config(participants=dict(bank.dsns, b=on(standby, bank.dsns["b"])),
                         log=bank.log)
    # Unfixed: BranchNotFound ("no prepared transaction"), the standby lists nothing.
    with pytest.raises(txmgr.ResolveRefused, match=r"'b' is a hot standby.*read-write"):
        resolve(wrong, gid, commit=True, reason="test")
    assert len(bank.prepared()) == 2 and bank.decisions() == [txid]


def test_read_write_dsn_reaching_only_standbys_names_the_fix(
    make_bank: MakeBank, pair: tuple[PgServer, PgServer], pg_server: Server,
) -> None:
    """libpq's "session is read-only" (target_session_attrs=read-write found no
    primary) gets a hint about the failover, not "check host, port, …"."""
    primary, standby = pair
    bank, txid = decided_bank(make_bank, [pg_server, primary])
    only_standby = make_conninfo(on(standby, bank.dsns["b"]), target_session_attrs="read-write")
    report = txmgr.recover(txmgr.Config(participants=dict(bank.dsns, b=only_standby),
                                        log=bank.log))
    assert report.unreachable == ["b"] and bank.decisions() == [txid], report
    (error,) = [e for e in report.errors if e.startswith("b:")]
    assert "session is read-only" in error and "found no primary" in error, error
    assert standby.password not in error


def test_multi_host_dsn_follows_a_promotion(
    make_bank: MakeBank, pg_server: Server,
) -> None:
    """``host=h1,h2 port=p1,p2 target_session_attrs=read-write``: after the primary is
    fenced and its standby promoted, recovery reaches the new primary and finishes
    the prepared branch there (prepared transactions are replicated)."""
    with own_server() as old, PgServer.standby_of(old) as new:
        bank, _ = decided_bank(make_bank, [pg_server, old])
        caught_up(old, new)
        parts = conninfo_to_dict(bank.dsns["b"])
        multi = make_conninfo(
            host=f"{old.host},{new.host}", port=f"{old.port},{new.port}",
            dbname=parts["dbname"], user=parts["user"], password=parts["password"],
            target_session_attrs="read-write",
        )
        config = txmgr.Config(participants=dict(bank.dsns, b=multi), log=bank.log)
        old.fence()
        new.promote()
        report = txmgr.recover(config)
        assert report.committed == 2 and report.decisions_deleted == 1, report
        assert query(multi, "SELECT balance FROM accounts WHERE id = 1") == [(START + 70,)]
        assert bank.balance("a") == START - 70 and bank.decisions() == []
        assert query(multi, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)]


# -- a branch's gid gone at COMMIT PREPARED ---------------------------------------------


class _FinishElsewhere(txmgr.Hooks):
    """Before the coordinator's COMMIT PREPARED of ``participant``, another session
    finishes that branch (a careless operator, a wrong recovery)."""

    def __init__(self, dsn: str, participant: str, *, commit: bool) -> None:
        self.dsn, self.participant, self.commit = dsn, participant, commit

    def before_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        if participant == self.participant:
            verb = "COMMIT" if self.commit else "ROLLBACK"
            query(self.dsn, psycopg.sql.SQL(verb + " PREPARED {}").format(  # type: ignore[arg-type]
                psycopg.sql.Literal(gid)))


def _move(tx: Any) -> None:
    for name, statements in transfer(70, "a", "b").items():
        for stmt in statements:
            tx.connection(name).execute(stmt)


def _heuristic_count(participant: str) -> float:
    prom = pytest.importorskip("prometheus_client")
    value = prom.REGISTRY.get_sample_value(
        "txmgr_heuristic_mixed_branches_total", {"participant": participant})
    return value or 0.0


def test_gone_gid_rolled_back_elsewhere_is_heuristic_mixed(
    bank: Bank, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = _FinishElsewhere(bank.dsns["b"], "b", commit=False)
    before = _heuristic_count("b")
    with txmgr.TransactionManager(bank.dsns, bank.log, hooks=hooks) as tm:
        with pytest.raises(txmgr.HeuristicMixed) as info, tm.transaction() as tx:
            _move(tx)
    assert info.value.committed == ["a"] and info.value.rolled_back == ["b"]
    assert "'b'" in str(info.value) and info.value.txid
    assert tx.state.name == "HEURISTIC_MIXED"
    assert _heuristic_count("b") == before + 1  # the metric
    assert any("HEURISTIC MIXED" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)  # the log line
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START)
    assert bank.prepared() == [] and bank.decisions() == []


def test_gone_gid_committed_elsewhere_is_committed(bank: Bank) -> None:
    hooks = _FinishElsewhere(bank.dsns["b"], "b", commit=True)
    with txmgr.TransactionManager(bank.dsns, bank.log, hooks=hooks) as tm:
        with tm.transaction() as tx:
            _move(tx)
        assert tx.state.value == "committed"
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START + 70)


async def _async_move(bank: Bank, hooks: txmgr.Hooks) -> None:
    async with txmgr.AsyncTransactionManager(bank.dsns, bank.log, hooks=hooks) as tm:
        async with tm.transaction() as tx:
            for name, statements in transfer(70, "a", "b").items():
                conn = await tx.connection(name)
                for stmt in statements:
                    await conn.execute(stmt)


def test_gone_gid_rolled_back_elsewhere_is_heuristic_mixed_async(bank: Bank) -> None:
    import asyncio

    hooks = _FinishElsewhere(bank.dsns["b"], "b", commit=False)
    with pytest.raises(txmgr.HeuristicMixed) as info:
        asyncio.run(_async_move(bank, hooks))
    assert info.value.committed == ["a"] and info.value.rolled_back == ["b"]
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START)


def test_a_standby_never_counts_as_a_paxos_acceptor(
    pair: tuple[PgServer, PgServer], make_database: Any, pg_servers: list[Server],
) -> None:
    from txmgr._dsn import mask
    from txmgr.paxos import PaxosLog
    from txmgr.paxos._acceptor import parse
    from txmgr.paxos._schema import install

    primary, standby = pair
    dsns = [make_database(pg_servers[0]), make_database(pg_servers[1]), make_database(primary)]
    for dsn in dsns:
        install(dsn)
    caught_up(primary, standby)
    # The third DSN reaches a caught-up standby of a migrated acceptor database: its
    # slots would read like an acceptor's, but they may lag behind its primary's.
    replica = on(standby, dsns[2])
    log = PaxosLog([dsns[0], dsns[1], replica], connect_timeout=5)
    try:
        found = log.check()
        assert sorted(found) == sorted(mask(d) for d in dsns[:2])  # a majority, without it
        third = log.slots()[2]
        assert third.incarnation is None and third.error is not None
        assert "hot standby" in third.error and "target_session_attrs" in third.error
    finally:
        log.close()
    # Each answer carries the check too (a pooler may move a session to a standby):
    # the scan's rows, read on the standby itself, are refused.
    from txmgr.paxos._acceptor import STATEMENTS

    with psycopg.connect(replica, autocommit=True) as conn:
        rows = conn.execute(STATEMENTS["txmgr_paxos_scan"][1]).fetchall()
    with pytest.raises(ValueError, match="hot standby"):
        parse(rows)
    with pytest.raises(ValueError, match="hot standby"):
        parse([("inc", None, None, None, None, None, None, None, None, True)])
    assert parse([("inc", None, None, None, None, None, None, None, None, False)]).replies == {}

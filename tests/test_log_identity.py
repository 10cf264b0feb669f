"""A copied decision log is told apart from its original (issue 15, finding 6).

The log's id is bound to the cluster's system identifier and the database's
oid. A ``CREATE DATABASE … TEMPLATE`` clone (new oid) and a dump restored on
another server (new oid, new system identifier) read as copies and refuse to
decide; a physical standby promoted in the original's place (same identity)
keeps working; ``txmgr migrate --adopt`` gives a copy an identity of its own.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import START, Bank, MakeBank, query, transfer
from txmgr import log as decision_log
from txmgr.testing import PgServer, Server
from txmgr.testing import _runas as runas
from txmgr.testing.pytest_plugin import MakeDatabase


def clone_by_template(dsn: str, make_database: MakeDatabase, server: Server) -> str:
    """A ``CREATE DATABASE … TEMPLATE`` copy of ``dsn``'s database on the same server."""
    target = make_database(server)
    source_db = conninfo_to_dict(dsn)["dbname"]
    target_db = conninfo_to_dict(target)["dbname"]
    admin = server.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(target_db)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(target_db), sql.Identifier(source_db)))
    return target


def config_file(tmp_path: pathlib.Path, log: str, participants: dict[str, str]) -> str:
    path = tmp_path / "txmgr.toml"
    lines = ["[log]", f"dsn = '{log}'", "", "[participants]"]
    lines += [f"{name} = '{dsn}'" for name, dsn in participants.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txmgr.cli", *args],
                          capture_output=True, text=True, check=False)


def logid_of(dsn: str) -> str:
    return str(query(dsn, "SELECT logid FROM txmgr_log_meta")[0][0])


def read(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return decision_log.read_logid(conn, dsn)


@pytest.mark.crash
def test_a_template_copy_made_earlier_does_not_roll_back_the_originals_commit(
    make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server]
) -> None:
    """A copy of the log taken before a decision: an application configured with
    the copy (sharing participant b) must not take b's branch as its own. Before
    the fix, its recovery read the lxid on the same cluster (committed), found no
    row in the copy, and rolled b back while the original's decision is commit."""
    bank = make_bank(("a", "b"))
    copy = clone_by_template(bank.log_dsn, make_database, pg_servers[0])
    bank.crash_at("after_decision", transfer(100, "a", "b"))
    assert len(bank.prepared()) == 2
    other_app = txmgr.Config(participants={"b": bank.dsns["b"]}, log=copy)
    report = txmgr.recover(other_app)
    assert not report.log_reachable
    assert any("copy" in e and "txmgr migrate --adopt" in e for e in report.errors), report
    assert len(bank.prepared("b")) == 1  # still prepared: the copy did not decide
    report = txmgr.recover(bank.config())
    assert report.errors == []
    assert (bank.balance("a"), bank.balance("b")) == (START - 100, START + 100)


def test_every_reader_of_a_copied_log_refuses_it(
    make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server],
    tmp_path: pathlib.Path,
) -> None:
    bank = make_bank(("a", "b"))
    copy = clone_by_template(bank.log_dsn, make_database, pg_servers[0])
    with pytest.raises(txmgr.LogCopied) as info:
        read(copy)
    message = str(info.value)
    assert logid_of(bank.log_dsn) in message and "--adopt" in message
    # The coordinator refuses before preparing anything.
    with txmgr.TransactionManager(bank.dsns, copy) as tm, pytest.raises(txmgr.LogCopied):
        with tm.transaction() as tx:
            tx.connection("a").execute("UPDATE accounts SET balance = 0 WHERE id = 1")
    assert bank.balance("a") == START
    # The CLI's readers (status, recover) exit 1 naming the problem.
    config = config_file(tmp_path, copy, {"a": bank.dsns["a"]})
    for command in ("status", "recover"):
        done = cli(command, "--config", config)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "copy" in done.stdout + done.stderr
    # The original is untouched.
    assert read(bank.log_dsn) == logid_of(bank.log_dsn)


def test_a_dump_restored_on_another_server_is_a_copy_until_adopted(
    bank: Bank, make_database: MakeDatabase, pg_servers: list[Server]
) -> None:
    target = make_database(pg_servers[1])
    dump = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", "-d", bank.log_dsn],
                          capture_output=True, text=True, check=True).stdout
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", target],
                   input=dump, capture_output=True, text=True, check=True)
    with pytest.raises(txmgr.LogCopied):
        read(target)
    old, new = txmgr.adopt_log(target)
    assert old == logid_of(bank.log_dsn) and new != old
    assert read(target) == new  # its own log now: gids of the original are not its own
    assert read(bank.log_dsn) == old
    with pytest.raises(txmgr.LogIdentityError, match="not a copy"):
        txmgr.adopt_log(bank.log_dsn)  # the original has nothing to adopt


def test_adopt_keep_logid_takes_over_and_keeps_the_decisions(
    make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server]
) -> None:
    """For a log that replaces its retired original (pg_upgrade, a move by dump):
    the id and the pending decisions stay, the binding moves."""
    bank = make_bank(("a", "b"))
    bank.crash_at("after_decision", transfer(100, "a", "b"))
    copy = clone_by_template(bank.log_dsn, make_database, pg_servers[0])
    old, new = txmgr.adopt_log(copy, keep_logid=True)
    assert old == new == logid_of(bank.log_dsn)
    report = txmgr.recover(txmgr.Config(participants=bank.dsns, log=copy))
    assert report.errors == []
    assert (bank.balance("a"), bank.balance("b")) == (START - 100, START + 100)


def test_cli_migrate_adopt(
    bank: Bank, make_database: MakeDatabase, pg_servers: list[Server],
    tmp_path: pathlib.Path,
) -> None:
    copy = clone_by_template(bank.log_dsn, make_database, pg_servers[0])
    done = cli("migrate", "--adopt", "--config", config_file(tmp_path, copy, {"a": bank.dsns["a"]}))
    assert done.returncode == 0, done.stderr
    assert "adopted" in done.stdout
    assert read(copy) != logid_of(bank.log_dsn)


@pytest.fixture
def standby_pair(pg_servers: list[Server]) -> Iterator[tuple[PgServer, PgServer]]:
    with PgServer() as primary:
        with PgServer.standby_of(primary) as standby:
            yield primary, standby


def test_a_promoted_physical_standby_is_the_same_log(
    standby_pair: tuple[PgServer, PgServer],
) -> None:
    """Failover of the log to its streaming standby is not a copy: same system
    identifier, same database oid (and likewise a pg_basebackup clone promoted on
    its own, which this design cannot tell apart)."""
    primary, standby = standby_pair
    with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE txlog")
    txmgr.migrate(primary.dsn("txlog"))
    logid = read(primary.dsn("txlog"))
    with psycopg.connect(primary.dsn("txlog"), autocommit=True) as conn:
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    assert lsn is not None
    with psycopg.connect(standby.dsn("postgres"), autocommit=True) as conn:
        while True:  # replay up to the migration, then promote
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                               (lsn[0],)).fetchone()
            if row and row[0]:
                break
            conn.execute("SELECT pg_sleep(0.05)")  # polling for replay, not a timed assertion
        conn.execute("SELECT pg_promote(true)")
    primary.stop()
    assert read(standby.dsn("txlog")) == logid


def test_migration_binds_an_existing_log_to_its_database(make_database: MakeDatabase,
                                                           pg_servers: list[Server]) -> None:
    dsn = make_database(pg_servers[0])
    txmgr.migrate(dsn, revision="0003")
    logid = logid_of(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:  # an old log: no binding
        assert decision_log.read_logid(conn, dsn) == logid
    txmgr.migrate(dsn)
    ident = query(dsn, "SELECT m.system_identifier = c.system_identifier, m.database_oid = "
                       "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                       "FROM txmgr_log_meta m, pg_control_system() c")
    assert ident == [(True, True)]
    assert read(dsn) == logid


# -- Paxos mode: each acceptor database is bound the same way ----------------------


def test_a_copied_paxos_log_database_is_refused(
    make_bank: MakeBank, make_database: MakeDatabase, pg_servers: list[Server]
) -> None:
    """A copy of an acceptor carries its incarnation and its promises: listed in
    place of another log database, it is refused at the check and its answers
    are never counted (it is as if down); adopted, it is a new incarnation."""
    bank = make_bank(("a", "b"))
    originals = [make_database(pg_servers[0]) for _ in range(2)]
    for dsn in originals:
        txmgr.migrate(dsn)
    copy = clone_by_template(originals[1], make_database, pg_servers[0])
    with txmgr.PaxosLog([originals[0], copy, originals[1]], connect_timeout=5) as log:
        with pytest.raises(txmgr.LogCopied, match="incarnation"):
            log.check()
    # Without the copy's original listed: the coordinator refuses before any work,
    # and a round (here: reading the slots) never counts the copy's answer.
    third = make_database(pg_servers[0])
    txmgr.migrate(third)
    with txmgr.TransactionManager(bank.dsns, log=txmgr.PaxosLog(
            [originals[0], copy, third], connect_timeout=2)) as tm:
        with pytest.raises(txmgr.LogCopied):
            tm.transaction()
    with txmgr.PaxosLog([originals[0], copy, third], connect_timeout=2) as log:
        states = log.slots()
        assert states[1].error is not None and "copy" in states[1].error
        assert states[0].error is None and states[2].error is None
    old, new = txmgr.adopt_log(copy)
    assert new != old
    with txmgr.PaxosLog([originals[0], copy, third], connect_timeout=5) as log:
        assert len(log.check()) == 3


# -- 64-bit xids in the lock check -------------------------------------------------


def test_an_xid_of_another_epoch_with_the_same_low_bits_is_not_in_progress() -> None:
    """The decision's xid is compared with pg_locks' 32-bit xids. On a server whose
    xid epoch is 5 (set with pg_resetwal), a transaction holds xid X; the xid with
    X's low 32 bits in epoch 4 is another transaction and must not read as in
    progress. (It never did: pg_xact_status calls it too old, so the lock check,
    now a 64-bit comparison, is not reached; this test pins that down.)"""
    with PgServer() as server:
        server.stop()
        user = runas.server_user()
        bin_dir = runas.reachable_bin_dir(pathlib.Path(subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()), user)
        done = runas.run([bin_dir / "pg_resetwal", "-e", "5", server.data_dir], user,
                         cwd=server.data_dir)
        assert done.returncode == 0, done.stderr
        server.restart()
        dsn = server.dsn()
        with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as conn:
            row = holder.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert row is not None
            x = int(row[0])
            assert x >> 32 == 5
            same_low_bits = x - 2**32
            statuses = decision_log.xact_status(conn, [x, same_low_bits])
            assert statuses == {x: "in progress", same_low_bits: None}
            holder.rollback()
            assert decision_log.xact_status(conn, [x]) == {x: "aborted"}

"""``txmgr resolve`` in Paxos mode: an operator's decision is imposed only by proposing it.

Real servers: a bank of two participants and three log databases (the
fixtures of test_paxos_mode.py). In-doubt transactions come from a coordinator
crashed at a failpoint; a log database is down when the FaultProxy in front of
it is stopped, and "re-created" when the configuration lists a freshly
migrated database in its place (a new incarnation). What must hold: a request
that contradicts what Paxos chose is refused, commit is never proposed by
resolve, abort is proposed only after the coordinator's grace, nothing is done
without a majority of the transaction's log databases, and every resolution is
audited on a majority of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

import txmgr
from ops_support import prepare_branch, query, run_cli
from support import START, Bank, MakeBank, transfer
from test_paxos_mode import (  # the Paxos fixtures and helpers, shared with the sync tests
    acceptors,  # noqa: F401  (fixture)
    closing,  # noqa: F401  (fixture)
    crash_at,
    paxos_config,
    paxos_log,
    paxos_prepared,
    proxied,
    proxies,  # noqa: F401  (fixture)
    recover,
)
from txmgr.paxos import PaxosGid, Value
from txmgr.paxos._acceptor import accept_query, encode, parse
from txmgr.paxos._schema import install
from txmgr.resolve import resolve
from txmgr.testing import Server
from txmgr.testing.proxy import FaultProxy
from txmgr.testing.pytest_plugin import MakeDatabase

AUDIT = ("gid", "participant", "action", "forced", "log_decision", "reason")


def gids_of(bank: Bank) -> dict[str, str]:
    """The prepared Paxos gid of each participant (one transaction in doubt)."""
    found = {}
    for gid in paxos_prepared(bank):
        parsed = PaxosGid.parse(gid)
        assert parsed is not None
        found[parsed.participant] = gid
    return found


def audit_rows(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, f"SELECT {', '.join(AUDIT)} FROM txmgr_resolution_audit ORDER BY id")


def cli(capsys: pytest.CaptureFixture[str], servers: list[Server], config: Path,
        *args: str) -> tuple[int, str]:
    """``txmgr resolve ARGS --config CONFIG`` in-process: (exit code, output)."""
    code, out, err = run_cli(capsys, "resolve", *args, "--config", str(config))
    for server in servers:
        assert server.password not in out + err
    return code, out + err


def accept_commit_on(dsn: str, txid: str, participants: list[str]) -> None:
    """Ballot 0's commit reaching this one log database only (its coordinator died
    while sending it), through the acceptor's own statement."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        body = accept_query(txid, 0, Value.commit(participants)).as_bytes(conn)
        cur = conn.execute(encode(conn, body))  # PREPAREs, SET LOCAL, then the answer
        while cur.nextset():
            pass
        answer = parse(cur.fetchall())
    assert answer.replies[txid].status == "ok"


def test_a_decided_transaction_is_finished_as_decided_and_audited(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str],  # noqa: F811
    closing: list[Any], pg_servers: list[Server], capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    bank = make_bank()
    crash_at(bank, acceptors, "after_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    config = paxos_config(tmp_path / "txmgr.toml", bank, acceptors)

    code, out = cli(capsys, pg_servers, config, gids["a"], "--rollback", "--force")
    assert code == 1
    assert "the Paxos log decided commit" in out and "chosen at ballot 0" in out
    assert "would break atomicity" in out and "--force cannot override" in out
    assert gids_of(bank) == gids and all(audit_rows(d) == [] for d in acceptors)

    code, out = cli(capsys, pg_servers, config, gids["a"], "--commit", "--reason", "ticket 7")
    assert code == 0, out
    assert f"committed {gids['a']} on a;" in out and "'commit' (commit chosen at ballot 0)" in out
    for dsn in acceptors:  # the audit row is on every log database that answered
        assert audit_rows(dsn) == [(gids["a"], "a", "commit", False, "commit", "ticket 7")]
    assert list(gids_of(bank)) == ["b"]
    assert recover(bank, closing, acceptors).committed == 1
    assert (bank.balance("a"), bank.balance("b")) == (START - 30, START + 30)


def test_resolve_proposes_abort_after_the_grace_and_never_commit(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str],  # noqa: F811
    closing: list[Any], pg_servers: list[Server], capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    bank = make_bank()
    txid = crash_at(bank, acceptors, "before_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    config = paxos_config(tmp_path / "txmgr.toml", bank, acceptors)
    observer = paxos_log(closing, acceptors)

    def accepted() -> list[str]:
        return [str(st.slots[txid].accepted_value) for st in observer.slots([txid])
                if txid in st.slots and st.slots[txid].accepted_value is not None]

    # Commit is never proposed by resolve, whatever the grace: nothing was accepted.
    code, out = cli(capsys, pg_servers, config, gids["a"], "--commit", "--force")
    assert code == 1
    assert "no log database that answered accepted commit" in out
    assert "--force cannot override" in out
    assert gids_of(bank) == gids and accepted() == []

    # Its coordinator is gone (its liveness lock is free on every log database):
    # abort is proposed at once, within the grace (idle_timeout, 60 s) too.
    paxos_config_obj = txmgr.Config.from_file(config)
    closing.append(paxos_config_obj.paxos_log)
    result = resolve(paxos_config_obj, gids["a"], commit=False,
                     requested_by="ops", reason="coordinator gone")
    assert (result.outcome, result.action, result.log_decision) == ("done", "rollback", "abort")
    assert "decided by this command's Paxos round" in result.detail and not result.forced
    assert len(result.audit_rows) == 3
    assert accepted().count("abort") >= 2  # chosen: a majority accepted abort

    code, out = cli(capsys, pg_servers, config, gids["b"], "--commit", "--force")
    assert code == 1 and "the Paxos log decided abort" in out
    code, out = cli(capsys, pg_servers, config, gids["b"], "--rollback")
    assert code == 0, out
    assert paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START, START)
    for dsn in acceptors:
        assert [r[:5] for r in audit_rows(dsn)] == [
            (gids["a"], "a", "rollback", False, "abort"),
            (gids["b"], "b", "rollback", False, "abort"),
        ]


def test_paxos_keeps_a_commit_accepted_where_it_counts(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str],  # noqa: F811
    closing: list[Any], proxies: list[FaultProxy], pg_servers: list[Server],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], acceptors[1], proxied(proxies, acceptors[2])]
    txid = crash_at(bank, dsns, "before_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    accept_commit_on(acceptors[0], txid, ["a", "b"])
    proxies[0].stop()  # the two that answer hold a commit at ballot 0 between them
    config = txmgr.Config(participants=bank.dsns, log=paxos_log(closing, dsns))

    with pytest.raises(txmgr.ResolveRefused, match="the Paxos log decided commit") as refused:
        resolve(config, gids["a"], commit=False, paxos_grace=0)
    assert "decided by this command's Paxos round" in str(refused.value)
    assert gids_of(bank) == gids  # refused: the branch is untouched

    code, out = cli(capsys, pg_servers, paxos_config(tmp_path / "txmgr.toml", bank, dsns),
                    gids["a"], "--commit")
    assert code == 0, out
    assert recover(bank, closing, dsns).committed == 1
    assert paxos_prepared(bank) == []
    assert (bank.balance("a"), bank.balance("b")) == (START - 30, START + 30)
    assert len(audit_rows(acceptors[0])) == 1 and len(audit_rows(acceptors[1])) == 1


def test_a_forgotten_transaction_can_only_be_rolled_back(
    make_bank: MakeBank, acceptors: list[str], closing: list[Any],  # noqa: F811
) -> None:
    bank = make_bank()
    txid = crash_at(bank, acceptors, "before_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    paxos_log(closing, acceptors).forget([txid])  # every slot gone: commit can never be chosen
    config = txmgr.Config(participants=bank.dsns, log=paxos_log(closing, acceptors))
    with pytest.raises(txmgr.ResolveRefused, match=r"decided abort .*forgotten"):
        resolve(config, gids["a"], commit=True)
    # Known without any proposal, so the coordinator's grace does not matter.
    result = resolve(config, gids["a"], commit=False)
    assert result.outcome == "done" and result.detail.startswith("forgotten")
    assert list(gids_of(bank)) == ["b"]


def test_without_a_majority_of_its_log_databases_nothing_is_done(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str],  # noqa: F811
    proxies: list[FaultProxy], pg_servers: list[Server],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    bank = make_bank()
    dsns = [acceptors[0], proxied(proxies, acceptors[1]), proxied(proxies, acceptors[2])]
    # Committed by a majority: the one log database left cannot show it.
    crash_at(bank, dsns, "after_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    for p in proxies:
        p.stop()
    config = paxos_config(tmp_path / "txmgr.toml", bank, dsns)
    for action in ("--rollback", "--commit"):
        code, out = cli(capsys, pg_servers, config, gids["a"], action, "--force")
        assert code == 1
        assert "only 1 of the 3 log databases" in out and "--force cannot override" in out
        assert "could undo a commit" in out
    assert gids_of(bank) == gids and audit_rows(acceptors[0]) == []


def test_gids_no_majority_of_this_log_can_decide_need_force(
    tmp_path: Path, make_bank: MakeBank, make_database: MakeDatabase,
    acceptors: list[str], pg_servers: list[Server],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    bank = make_bank()
    crash_at(bank, acceptors, "before_decision", transfer(30, "a", "b"))
    gids = gids_of(bank)
    # Two of its three log databases lost and re-created empty: new incarnations.
    recreated = [make_database(pg_servers[0]), make_database(pg_servers[-1])]
    for dsn in recreated:
        txmgr.migrate(dsn)
    dsns = [acceptors[0], *recreated]
    config = paxos_config(tmp_path / "txmgr.toml", bank, dsns)
    prepare_branch(bank.dsns["b"], "legacy 17",
                   ["UPDATE accounts SET balance = balance + 5 WHERE id = 3"])

    for gid in (gids["a"], "legacy 17"):
        code, out = cli(capsys, pg_servers, config, gid, "--rollback")
        assert code == 1 and "not ours" in out and "--force" in out
    assert "can never be decided here" in cli(capsys, pg_servers, config, gids["a"],
                                              "--commit")[1]
    code, out = cli(capsys, pg_servers, config, gids["a"], "--rollback", "--force",
                    "--reason", "log databases lost; branch b was never committed")
    assert code == 0 and "(forced)" in out, out
    code, out = cli(capsys, pg_servers, config, "legacy 17", "--commit", "--force")
    assert code == 0, out
    assert bank.balance("b", 3) == START + 5
    assert list(gids_of(bank)) == ["b"]
    for dsn in dsns:
        assert [r[:5] for r in audit_rows(dsn)] == [
            (gids["a"], "a", "rollback", True, "not ours"),
            ("legacy 17", "b", "commit", True, "not ours"),
        ]


def test_nothing_is_done_unless_a_majority_of_log_databases_take_the_audit_row(
    tmp_path: Path, make_bank: MakeBank, make_database: MakeDatabase,
    acceptors: list[str], pg_servers: list[Server], capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    bank = make_bank()
    # Two log databases with the acceptor tables only: no txmgr_resolution_audit.
    bare = [make_database(pg_servers[0]), make_database(pg_servers[-1])]
    for dsn in bare:
        install(dsn)
    config = paxos_config(tmp_path / "txmgr.toml", bank, [acceptors[0], *bare])
    prepare_branch(bank.dsns["a"], "legacy 18",
                   ["UPDATE accounts SET balance = balance + 5 WHERE id = 3"])
    code, out = cli(capsys, pg_servers, config, "legacy 18", "--rollback", "--force")
    assert code == 1
    assert "written on 1 of 3 Paxos log databases, 2 are needed" in out
    assert "txmgr_resolution_audit" in out  # what is missing where
    assert query(bank.dsns["a"], "SELECT 1 FROM pg_prepared_xacts WHERE gid = 'legacy 18'")
    assert bank.balance("a", 3) == START  # not committed


def test_resolve_refuses_to_abort_for_a_live_coordinator(
    tmp_path: Path, make_bank: MakeBank, acceptors: list[str],  # noqa: F811
    closing: list[Any], pg_servers: list[Server], capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    """The rule of recovery (txmgr.paxos._beacon.may_decide): a transaction whose
    coordinator is alive (here: registered, every branch prepared, ballot 0 not
    sent yet) is never decided by resolve, even with no grace at all."""
    bank = make_bank()
    coordinator = paxos_log(closing, acceptors)
    txid, voters = coordinator.take()
    gids = {p: str(PaxosGid(txid, voters, p)) for p in ("a", "b")}
    for p, gid in gids.items():
        prepare_branch(bank.dsns[p], gid, ["UPDATE accounts SET balance = balance WHERE id = 1"])
    config = txmgr.Config.from_file(paxos_config(tmp_path / "txmgr.toml", bank, acceptors))
    closing.append(config.paxos_log)
    with pytest.raises(txmgr.errors.ResolveRefused, match="alive inside the protocol"):
        resolve(config, gids["a"], commit=False, paxos_grace=0, requested_by="ops")
    assert sorted(gids_of(bank).values()) == sorted(gids.values())
    assert coordinator.propose_commit(txid, voters, ["a", "b"]).commits

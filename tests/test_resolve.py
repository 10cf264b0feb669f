"""``txmgr resolve``: refusals that protect atomicity, --force, audit rows, exit codes."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Any

import pytest

from ops_support import Cluster, prepare_branch, query, run_cli, write_config
from txmgr._gid import Gid, new_txid


def _audit(cluster: Cluster) -> list[dict[str, Any]]:
    cols = ["gid", "participant", "action", "forced", "log_decision", "requested_by",
            "db_user", "client_host", "reason"]
    rows = query(cluster.log, f"SELECT {', '.join(cols)} FROM txmgr_resolution_audit ORDER BY id")
    return [dict(zip(cols, r, strict=True)) for r in rows]


def _resolve(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], *args: str, config: Path | None = None
) -> tuple[int, str]:
    code, out, err = run_cli(
        capsys, "resolve", *args, "--config", str(config or cluster.config_path)
    )
    for server in cluster.servers:
        assert server.password is not None and server.password not in out + err
    return code, out + err


def test_a_decision_the_log_agrees_with_needs_no_force_and_is_audited(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    committed, _ = cluster.our_branch("orders", "commit", ["INSERT INTO kv VALUES ('c', 1)"])
    aborted, _ = cluster.our_branch("billing", "abort", ["INSERT INTO kv VALUES ('a', 1)"])
    code, out = _resolve(cluster, capsys, committed, "--commit", "--reason", "ticket 42")
    assert code == 0, out
    assert f"committed {committed} on orders" in out
    code, out = _resolve(cluster, capsys, aborted, "--rollback")
    assert code == 0, out
    assert cluster.all_prepared() == {"orders": [], "billing": []}
    assert cluster.kv("orders") == {"c": 1} and cluster.kv("billing") == {}
    assert _audit(cluster) == [
        {"gid": committed, "participant": "orders", "action": "commit", "forced": False,
         "log_decision": "commit", "requested_by": getpass.getuser(), "db_user": "postgres",
         "client_host": socket.gethostname(), "reason": "ticket 42"},
        {"gid": aborted, "participant": "billing", "action": "rollback", "forced": False,
         "log_decision": "abort", "requested_by": getpass.getuser(), "db_user": "postgres",
         "client_host": socket.gethostname(), "reason": None},
    ]


@pytest.mark.parametrize(("decision", "request_"), [("commit", "--rollback"),
                                                    ("abort", "--commit")])
def test_contradicting_the_log_is_refused_even_with_force(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], decision: str, request_: str
) -> None:
    gid, _ = cluster.our_branch("orders", decision)
    code, out = _resolve(cluster, capsys, gid, request_, "--force")
    assert code == 1
    assert "would break atomicity" in out and "--force cannot override" in out
    assert cluster.prepared("orders") == [gid]
    assert _audit(cluster) == []


def test_in_progress_is_refused_even_with_force(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    gid, lconn = cluster.our_branch("orders", "in progress")
    assert lconn is not None
    try:
        for action in ("--commit", "--rollback"):
            code, out = _resolve(cluster, capsys, gid, action, "--force")
            assert code == 1 and "in progress" in out
        assert cluster.prepared("orders") == [gid]
        assert _audit(cluster) == []
    finally:
        lconn.rollback()
        lconn.close()


def test_undecidable_branches_need_force_and_are_audited(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = "legacy app 17"
    prepare_branch(cluster.participants["billing"], foreign, ["INSERT INTO kv VALUES ('f', 1)"])
    other_logid = "0badcafe" if cluster.logid != "0badcafe" else "1badcafe"
    lost = str(Gid(other_logid, new_txid(), 4242, "orders"))
    prepare_branch(cluster.participants["orders"], lost, ["INSERT INTO kv VALUES ('l', 1)"])

    code, out = _resolve(cluster, capsys, foreign, "--rollback")
    assert code == 1 and "--force" in out and "not ours" in out
    assert cluster.prepared("billing") == [foreign] and _audit(cluster) == []

    code, out = _resolve(cluster, capsys, foreign, "--rollback", "--force",
                         "--reason", "app retired")
    assert code == 0, out
    code, out = _resolve(cluster, capsys, lost, "--commit", "--force")
    assert code == 0, out
    assert "(forced)" in out
    assert cluster.all_prepared() == {"orders": [], "billing": []}
    assert cluster.kv("orders") == {"l": 1} and cluster.kv("billing") == {}
    audit = _audit(cluster)
    assert [(a["gid"], a["participant"], a["action"], a["forced"], a["log_decision"],
             a["reason"]) for a in audit] == [
        (foreign, "billing", "rollback", True, "not ours", "app retired"),
        (lost, "orders", "commit", True, "not ours", None),
    ]


def test_a_gid_on_several_participants_needs_participant(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("orders", "billing"):  # two servers: the same gid can exist on both
        prepare_branch(cluster.participants[name], "twin", [])
    code, out = _resolve(cluster, capsys, "twin", "--rollback", "--force")
    assert code == 1 and "--participant" in out
    code, out = _resolve(cluster, capsys, "twin", "--rollback", "--force",
                         "--participant", "billing")
    assert code == 0, out
    assert cluster.all_prepared() == {"orders": ["twin"], "billing": []}
    code, out = _resolve(cluster, capsys, "twin", "--rollback", "--force",
                         "--participant", "nope")
    assert code == 2 and "unknown participant 'nope'" in out


def test_not_found_names_where_it_is(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _resolve(cluster, capsys, "nothing here", "--commit")
    assert code == 1 and "no prepared transaction 'nothing here'" in out
    # Prepared in a database of the same server that is no participant (here: the log's).
    prepare_branch(cluster.log, "stray", ["CREATE TABLE t (x int)"])
    code, out = _resolve(cluster, capsys, "stray", "--commit", "--force")
    assert code == 1
    assert "orders's server, database" in out and "no configured participant" in out


def test_usage_errors(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert _resolve(cluster, capsys, "g")[0] == 2
    assert _resolve(cluster, capsys, "g", "--commit", "--rollback")[0] == 2


def test_without_the_log_nothing_is_done(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prepare_branch(cluster.participants["orders"], "foreign", [])
    config = write_config(tmp_path / "nolog.toml", cluster.participants,
                          "postgresql://u:hunter2@127.0.0.1:1/log")
    code, out = _resolve(cluster, capsys, "foreign", "--rollback", "--force", config=config)
    assert code == 1
    assert "cannot reach the decision log" in out and "hunter2" not in out
    assert cluster.prepared("orders") == ["foreign"]

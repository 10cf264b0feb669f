"""``txmgr status``: every prepared branch, the log's verdict, locks, blocking, exit codes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ops_support import Cluster, prepare_branch, query, run_cli, wait_for, write_config
from txmgr._gid import Gid, new_txid
from txmgr.cli._status import Duration, format_age
from txmgr.status import classify, inspect


def _status_json(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_cli(capsys, "status", "--config", str(config), "--json", *extra)
    return code, json.loads(out)


def test_every_kind_of_branch_is_classified(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    committed, _ = cluster.our_branch("orders", "commit")
    aborted, _ = cluster.our_branch("orders", "abort")
    in_progress, lconn = cluster.our_branch("billing", "in progress")
    assert lconn is not None
    other_log = str(Gid("0badcafe" if cluster.logid != "0badcafe" else "1badcafe", new_txid(),
                        1234, "orders"))
    prepare_branch(cluster.participants["orders"], other_log, [])
    prepare_branch(cluster.participants["billing"], "someone else's", [])
    try:
        code, doc = _status_json(capsys, cluster.config_path, "--older-than", "1h")
    finally:
        lconn.close()
    decisions = {(b["participant"], b["gid"]): b["decision"] for b in doc["branches"]}
    assert decisions == {
        ("orders", committed): "commit",
        ("orders", aborted): "abort",
        ("billing", in_progress): "in progress",
        ("orders", other_log): "not ours",
        ("billing", "someone else's"): "not ours",
    }
    txids = {b["gid"]: b["txid"] for b in doc["branches"]}
    assert txids[committed] == Gid.parse(committed).txid  # type: ignore[union-attr]
    assert txids["someone else's"] is None
    # The committed decision's row waits for cleanup; the open one is invisible.
    assert [p["txid"] for p in doc["pending_decisions"]] == [txids[committed]]
    assert doc["logid"] == cluster.logid
    assert doc["unreachable"] == {} and doc["log_error"] is None
    assert code == 0 and doc["ok"] is True and doc["stuck"] == 0


def test_exit_code_follows_older_than(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _status_json(capsys, cluster.config_path, "--older-than", "0")
    assert (code, doc["branches"]) == (0, [])  # nothing prepared: healthy at any threshold
    gid, _ = cluster.our_branch("orders", "commit")
    code, doc = _status_json(capsys, cluster.config_path, "--older-than", "1h")
    assert (code, doc["stuck"]) == (0, 0)
    age = doc["branches"][0]["age"]
    assert 0 < age < 60
    code, doc = _status_json(capsys, cluster.config_path, "--older-than", "0")
    assert (code, doc["stuck"], doc["ok"]) == (1, 1, False)
    # The table tells people the same, with the stuck branch marked.
    code, out, _ = run_cli(capsys, "status", "--config", str(cluster.config_path),
                           "--older-than", "0")
    assert code == 1
    header, row = out.splitlines()[:2]
    assert header.split() == ["PARTICIPANT", "GID", "AGE", "DECISION", "LOCKS", "BLOCKING",
                              "OWNER"]
    assert row.split()[:2] == ["orders", gid]
    assert " ! " in row and "commit" in row
    assert "decision rows waiting for cleanup: 1" in out
    assert "1 prepared, 1 older than 0.0s" in out
    assert "is `txmgr daemon` running?" in out


def test_locks_and_blocked_sessions(cluster: Cluster) -> None:
    orders = cluster.participants["orders"]
    query(orders, "CREATE TABLE a (x int); CREATE TABLE b (x int); CREATE TABLE c (x int)")
    query(orders, "INSERT INTO kv VALUES ('row', 1)")
    query(orders, "INSERT INTO kv VALUES ('p', 1)")
    plain = "plain_branch"
    prepare_branch(orders, plain, ["UPDATE kv SET v = 2 WHERE k = 'p'"])
    # The same work plus three more relations locked: three more locks.
    more = "locking_branch"
    prepare_branch(orders, more, ["UPDATE kv SET v = 2 WHERE k = 'row'",
                                  "LOCK TABLE a, b, c IN SHARE MODE"])
    by_gid = {b.gid: b for b in inspect(cluster.config).branches}
    assert by_gid[more].locks - by_gid[plain].locks == 3
    assert by_gid[plain].locks >= 2  # at least its table and its own xid
    assert not by_gid[plain].blocks and not by_gid[more].blocks

    # Two sessions wait: one for the row `more` updated, one for a table it locked.
    pids: dict[str, int] = {}
    errors: list[BaseException] = []

    def wait_on(name: str, stmt: str) -> None:
        try:
            with psycopg.connect(orders) as conn:  # LOCK TABLE needs a transaction block
                pids[name] = conn.info.backend_pid
                conn.execute("SET lock_timeout = '30s'")
                conn.execute(stmt)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=wait_on, args=("row", "UPDATE kv SET v = 3 WHERE k = 'row'")),
        threading.Thread(target=wait_on, args=("table", "LOCK TABLE b IN EXCLUSIVE MODE")),
    ]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: len(pids) == 2 and query(
                orders, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
                "AND wait_event_type = 'Lock'", (list(pids.values()),))[0][0] == 2,
            what="both sessions waiting on locks",
        )
        by_gid = {b.gid: b for b in inspect(cluster.config).branches}
        assert by_gid[more].blocked_pids == tuple(sorted(pids.values()))
        assert by_gid[more].blocks
        assert by_gid[plain].blocked_pids == ()
    finally:
        query(orders, "ROLLBACK PREPARED 'locking_branch'")
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert {b.gid for b in inspect(cluster.config).branches} == {plain}


def test_unreachable_servers_are_reported_without_passwords(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    gid, _ = cluster.our_branch("orders", "commit")
    down = "postgresql://app:s3cret-pw@127.0.0.1:1/nowhere"
    config = write_config(tmp_path / "down.toml", {**cluster.participants, "ghost": down},
                          cluster.log)
    code, doc = _status_json(capsys, config, "--older-than", "1h")
    assert code == 1 and doc["ok"] is False
    assert list(doc["unreachable"]) == ["ghost"]
    assert [b["gid"] for b in doc["branches"]] == [gid]  # the others are still shown
    code, out, err = run_cli(capsys, "status", "--config", str(config))
    assert code == 1
    assert "participant ghost: UNREACHABLE" in err
    assert "s3cret-pw" not in out + err + json.dumps(doc)

    # Without the log, txmgr's branches are "unknown": nobody can say what they are.
    no_log = write_config(tmp_path / "nolog.toml", cluster.participants,
                          "postgresql://txmgr:s3cret-pw@127.0.0.1:1/log")
    code, doc = _status_json(capsys, no_log, "--older-than", "1h")
    assert code == 1 and doc["log_error"] and "s3cret-pw" not in json.dumps(doc)
    assert [(b["gid"], b["decision"]) for b in doc["branches"]] == [(gid, "unknown")]


def test_classify_follows_recovery_the_row_decides_once_over() -> None:
    gid = Gid("00c0ffee", new_txid(), 77, "orders")
    for status in ("committed", "aborted", None, "future"):
        # Not in progress: only the decision row tells commit from abort.
        assert classify(str(gid), "00c0ffee", {77: status}, [gid.txid])[0] == "commit"
        assert classify(str(gid), "00c0ffee", {77: status}, [])[0] == "abort"
    assert classify(str(gid), "00c0ffee", {77: "in progress"}, [gid.txid])[0] == "in progress"
    assert classify(str(gid), "00c0ffee", {}, [])[0] == "unknown"  # the log was not asked
    assert classify(str(gid), None, {}, [])[0] == "unknown"
    assert classify(str(gid), "11c0ffee", {77: "committed"}, [])[0] == "not ours"
    assert classify("txm1_junk", "00c0ffee", {}, [])[0] == "not ours"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("2d", 172800.0),
     ("0.5", 0.5), (" 1H ", 3600.0)],
)
def test_duration_forms(text: str, seconds: float) -> None:
    assert Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "1h 30", "-5", "1.5.5", "1.5s.5"])
def test_bad_durations_are_usage_errors(
    text: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, "status", "--config", str(tmp_path / "x.toml"),
                           "--older-than", text)
    assert code == 2 and "is not a duration" in err


def test_format_age() -> None:
    assert [format_age(s) for s in (0.25, 42, 303, 7500, 200000)] == [
        "0.2s", "42s", "5m03s", "2h05m", "2d07h"]


def test_ages_come_from_the_server_clock(cluster: Cluster) -> None:
    cluster.our_branch("orders", "commit")
    before = time.monotonic()
    (branch,) = inspect(cluster.config).branches
    (server_age,) = query(cluster.participants["orders"],
                          "SELECT extract(epoch FROM clock_timestamp() - prepared)::float8 "
                          "FROM pg_prepared_xacts WHERE database = current_database()")[0]
    assert 0 <= branch.age <= server_age <= branch.age + (time.monotonic() - before) + 0.5

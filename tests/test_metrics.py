"""The daemon's Prometheus endpoint, scraped over HTTP and checked against the servers."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict

from ops_support import Cluster, metric, parse_metrics, prepare_branch, query
from txmgr.daemon import Daemon


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _get(port, "/metrics")
    assert status == 200
    return parse_metrics(text)


@pytest.fixture
def daemon(cluster: Cluster) -> Iterator[Daemon]:
    d = Daemon(cluster.config, interval=60)
    yield d
    d.close()


def _age(dsn: str, gid: str) -> float:
    return float(query(dsn, "SELECT extract(epoch FROM clock_timestamp() - prepared)::float8 "
                            "FROM pg_prepared_xacts WHERE gid = %s", (gid,))[0][0])


def test_metrics_match_the_real_state(cluster: Cluster, daemon: Daemon) -> None:
    committed = cluster.transfer("after_decision", "c")
    cluster.transfer("before_decision", "r")
    in_progress, lconn = cluster.our_branch("orders", "in progress")
    assert lconn is not None
    prepare_branch(cluster.participants["billing"], "not txmgr's", [])
    # A row naming a participant this config does not know is never cleaned up here.
    query(cluster.log, "INSERT INTO txmgr_decision (txid, lxid, participants) "
                       "VALUES ('00000000000000aa', pg_current_xact_id(), '{orders,elsewhere}')")
    server = daemon.serve_metrics("127.0.0.1", 0)
    assert server.host == "127.0.0.1" and server.port > 0
    try:
        # The branches the pass must leave alone, and their ages around the pass.
        left = {"orders": in_progress, "billing": "not txmgr's"}
        before = {n: _age(cluster.participants[n], gid) for n, gid in left.items()}
        step = daemon.step()
        after = {n: _age(cluster.participants[n], gid) for n, gid in left.items()}
        assert step.state == "active" and step.report is not None
        assert committed in {r.txid for r in step.report.resolutions}
        s = _scrape(server.port)

        for name in ("orders", "billing"):
            assert metric(s, "txmgr_branches_resolved_total", participant=name,
                          outcome="committed") == 1
            assert metric(s, "txmgr_branches_resolved_total", participant=name,
                          outcome="rolled_back") == 1
            assert metric(s, "txmgr_participant_up", participant=name) == 1
            # What is left prepared: exactly what the servers hold.
            in_doubt = sum(v for (n, labels), v in s.items()
                           if n == "txmgr_in_doubt_branches" and ("participant", name) in labels)
            assert in_doubt == len(cluster.prepared(name)) == 1
            assert cluster.prepared(name) == [left[name]]
            oldest = metric(s, "txmgr_oldest_in_doubt_seconds", participant=name)
            assert before[name] <= oldest <= after[name]
        assert metric(s, "txmgr_in_doubt_branches", participant="orders",
                      decision="in progress") == 1
        assert metric(s, "txmgr_in_doubt_branches", participant="billing",
                      decision="not ours") == 1
        assert metric(s, "txmgr_decision_rows") == cluster.decision_count() == 1
        assert metric(s, "txmgr_recovery_passes_total") == 1
        assert metric(s, "txmgr_recovery_pass_duration_seconds_count") == 1
        assert 0 < metric(s, "txmgr_recovery_pass_duration_seconds_sum") <= step.duration
        assert metric(s, "txmgr_daemon_active") == 1
        assert metric(s, "txmgr_log_up") == 1
        assert metric(s, "txmgr_recovery_errors_total", source="log") == 0

        # The coordinator finishes; the next pass sees nothing in doubt on orders.
        lconn.commit()
        daemon.step()
        s = _scrape(server.port)
        assert metric(s, "txmgr_recovery_passes_total") == 2
        assert metric(s, "txmgr_in_doubt_branches", participant="orders",
                      decision="in progress") == 0
        assert metric(s, "txmgr_oldest_in_doubt_seconds", participant="orders") == 0
        assert metric(s, "txmgr_branches_resolved_total", participant="orders",
                      outcome="committed") == 2
        assert _get(server.port, "/healthz") == (200, "ok active\n")
        assert _get(server.port, "/nope")[0] == 404
    finally:
        lconn.close()


def test_healthz_fails_while_the_log_is_unreachable(cluster: Cluster, daemon: Daemon) -> None:
    server = daemon.serve_metrics(port=0)
    assert _get(server.port, "/healthz")[0] == 503  # no pass yet: nothing known
    daemon.step()
    assert _get(server.port, "/healthz") == (200, "ok active\n")
    dbname = conninfo_to_dict(cluster.log)["dbname"]
    admin = cluster.servers[0].admin_dsn
    query(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    try:
        query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s", (dbname,))
        step = daemon.step()
        assert step.state == "unreachable"
        status, text = _get(server.port, "/healthz")
        assert status == 503 and "decision log unreachable" in text
        s = _scrape(server.port)
        assert metric(s, "txmgr_log_up") == 0
        assert metric(s, "txmgr_daemon_active") == 0
        assert metric(s, "txmgr_recovery_errors_total", source="log") == 1
        assert cluster.servers[0].password and cluster.servers[0].password not in text
    finally:
        query(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    daemon.step()
    assert _get(server.port, "/healthz") == (200, "ok active\n")
    assert metric(_scrape(server.port), "txmgr_log_up") == 1


def test_each_daemon_has_its_own_registry(cluster: Cluster) -> None:
    a, b = Daemon(cluster.config), Daemon(cluster.config)
    try:
        pa, pb = a.serve_metrics(port=0).port, b.serve_metrics(port=0).port
        a.step()
        b.step()  # the lock is a's: b stands by
        sa, sb = _scrape(pa), _scrape(pb)
        assert (metric(sa, "txmgr_daemon_active"), metric(sb, "txmgr_daemon_active")) == (1, 0)
        assert metric(sa, "txmgr_recovery_passes_total") == 1
        assert metric(sb, "txmgr_recovery_passes_total") == 0
        assert _get(pb, "/healthz") == (200, "ok standby\n")
    finally:
        a.close()
        b.close()

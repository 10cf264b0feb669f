"""The daemon as a non-superuser: the role that prepared the branches, with the grants
the README lists ("Roles and grants"); any other role is told which role it needs."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ops_support import Cluster, DaemonProcess, query, run_cli, wait_for, write_config
from txmgr.config import Config
from txmgr.recovery import recover

# The grants of the README, section "Roles and grants".
APP_LOG_GRANTS = [
    "GRANT SELECT ON txmgr_log_meta, txmgr_alembic_version TO {role}",
    "GRANT SELECT, INSERT, DELETE ON txmgr_decision TO {role}",
]
RECOVERY_LOG_GRANTS = [
    "GRANT SELECT ON txmgr_log_meta, txmgr_alembic_version TO {role}",
    "GRANT SELECT, DELETE ON txmgr_decision TO {role}",
    "GRANT INSERT ON txmgr_resolution_audit TO {role}",
    "GRANT USAGE ON SEQUENCE txmgr_resolution_audit_id_seq TO {role}",
]


def test_the_documented_grants_are_the_tested_ones() -> None:
    doc = (Path(__file__).parents[1] / "README.md").read_text()
    for stmt in APP_LOG_GRANTS:
        assert stmt.format(role="app") + ";" in doc
    for stmt in RECOVERY_LOG_GRANTS:
        assert stmt.format(role="txmgr_recovery") + ";" in doc


@dataclass
class Roles:
    app: str  # the application's role: it prepares the branches
    recovery: str  # the daemon's role on the log database only
    other: str  # some other non-superuser
    password: str

    def dsn(self, cluster: Cluster, base: str, role: str) -> str:
        server = cluster.servers[0] if base != cluster.participants["billing"] \
            else cluster.servers[1]
        return server.dsn(str(conninfo_to_dict(base)["dbname"]), user=role,
                          password=self.password)

    def participants(self, cluster: Cluster, role: str) -> dict[str, str]:
        return {n: self.dsn(cluster, dsn, role) for n, dsn in cluster.participants.items()}


def _grant(dsn: str, statements: list[str], role: str) -> None:
    for stmt in statements:
        query(dsn, sql.SQL(stmt).format(role=sql.Identifier(role)))


@pytest.fixture
def roles(cluster: Cluster) -> Iterator[Roles]:
    suffix = secrets.token_hex(3)
    r = Roles(f"app_{suffix}", f"recovery_{suffix}", f"other_{suffix}", secrets.token_hex(8))
    for server in cluster.servers:
        for role in (r.app, r.recovery, r.other):
            server.execute_admin(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(r.password)))
    for dsn in cluster.participants.values():
        for role in (r.app, r.other):
            _grant(dsn, ["GRANT SELECT, INSERT, UPDATE, DELETE ON kv TO {role}"], role)
    _grant(cluster.log, APP_LOG_GRANTS, r.app)
    _grant(cluster.log, RECOVERY_LOG_GRANTS, r.recovery)
    _grant(cluster.log, RECOVERY_LOG_GRANTS, r.other)
    yield r
    for dsn in [*cluster.participants.values(), cluster.log]:
        with suppress(Exception):
            query(dsn, sql.SQL("DROP OWNED BY {}, {}, {}").format(
                sql.Identifier(r.app), sql.Identifier(r.recovery), sql.Identifier(r.other)))
    for server in cluster.servers:
        for role in (r.app, r.recovery, r.other):
            with suppress(Exception):
                server.execute_admin(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_daemon_runs_as_the_preparing_role_with_the_documented_grants(
    cluster: Cluster, roles: Roles, daemons: Callable[..., DaemonProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = roles.participants(cluster, roles.app)
    app_log = roles.dsn(cluster, cluster.log, roles.app)
    stmt = "INSERT INTO kv VALUES ('{}', 1)"
    committed = cluster.kill_coordinator(
        "after_decision", {n: [stmt.format("c")] for n in app}, participants=app, log=app_log)
    cluster.kill_coordinator(
        "before_decision", {n: [stmt.format("r")] for n in app}, participants=app, log=app_log)
    owners = query(cluster.participants["orders"], "SELECT DISTINCT owner FROM pg_prepared_xacts "
                   "WHERE database = current_database()")
    assert owners == [(roles.app,)]
    assert query(cluster.log, "SELECT rolsuper FROM pg_roles WHERE rolname IN (%s, %s)",
                 (roles.app, roles.recovery)) == [(False,), (False,)]

    # The daemon: the application's role on the participants, a narrower one on the log.
    config = write_config(cluster.tmp / "daemon.toml", app,
                          roles.dsn(cluster, cluster.log, roles.recovery))
    code, out, _ = run_cli(capsys, "status", "--config", str(config), "--json")
    assert code == 0 and '"decision": "commit"' in out and '"decision": "abort"' in out
    d = daemons(config)
    wait_for(lambda: cluster.all_prepared() == {"orders": [], "billing": []}
             and cluster.decision_count() == 0, what="the non-superuser daemon to recover")
    assert cluster.kv("orders") == cluster.kv("billing") == {"c": 1}
    resolved = {(e["txid"], e["outcome"]) for e in d.events() if "outcome" in e}
    assert (committed, "committed") in resolved
    assert not [e for e in d.events() if e.get("level") == "error"]
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0


def test_another_role_is_told_which_role_it_needs(
    cluster: Cluster, roles: Roles, capsys: pytest.CaptureFixture[str]
) -> None:
    app = roles.participants(cluster, roles.app)
    stmt = "INSERT INTO kv VALUES ('x', 1)"
    cluster.kill_coordinator("after_decision", {n: [stmt] for n in app}, participants=app,
                             log=roles.dsn(cluster, cluster.log, roles.app))
    gid = cluster.prepared("orders")[0]

    other = write_config(cluster.tmp / "other.toml", roles.participants(cluster, roles.other),
                         roles.dsn(cluster, cluster.log, roles.other))
    report = recover(Config.from_file(other))
    assert report.committed == 0 and len(report.errors) == 2
    assert all(f"the role that prepared it ({roles.app})" in e for e in report.errors)
    code, out, err = run_cli(capsys, "resolve", gid, "--commit", "--config", str(other))
    assert code == 1
    assert f"prepared by role {roles.app!r}" in err and f"connected as {roles.other!r}" in err
    assert roles.password not in out + err
    assert query(cluster.log, "SELECT count(*) FROM txmgr_resolution_audit") == [(0,)]
    assert len(cluster.prepared("orders")) == len(cluster.prepared("billing")) == 1

    # The preparing role resolves it (with the recovery role's grants on the log).
    mine = write_config(cluster.tmp / "mine.toml", app,
                        roles.dsn(cluster, cluster.log, roles.recovery))
    code, out, err = run_cli(capsys, "resolve", gid, "--commit", "--config", str(mine))
    assert code == 0, err
    assert query(cluster.log, "SELECT db_user, forced, log_decision FROM "
                              "txmgr_resolution_audit") == [(roles.recovery, False, "commit")]
    assert recover(Config.from_file(mine)).committed == 1  # and the daemon's role finishes the rest
    assert cluster.all_prepared() == {"orders": [], "billing": []}

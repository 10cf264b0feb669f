"""Containers: the Docker backend of the harness, and the top-level docker-compose.yml.

Tests that need a Docker engine run where one answers and skip elsewhere; the
backend's choice and its skip without an engine are checked everywhere, by running
pytest on a small test file with ``TXMGR_TEST_BACKEND=docker``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import psycopg
import pytest

import txmgr
from txmgr.testing import PgServerError
from txmgr.testing._env import server_backend
from txmgr.testing.containers import ContainerServer, docker_unavailable_reason

ROOT = pathlib.Path(__file__).resolve().parent.parent
NO_DOCKER = docker_unavailable_reason()
needs_docker = pytest.mark.skipif(NO_DOCKER is not None, reason=f"needs Docker: {NO_DOCKER}")


@needs_docker
def test_two_phase_commit_in_containers() -> None:
    with ContainerServer() as server:
        dsns = {name: server.create_database() for name in ("a", "b")}
        log = server.create_database()
        txmgr.migrate(log)
        for dsn in dsns.values():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (x int)")
        with txmgr.TransactionManager(dsns, log) as tm, tm.transaction() as tx:
            for name in dsns:
                tx.connection(name).execute("INSERT INTO t VALUES (1)")
        for dsn in dsns.values():
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


# -- TXMGR_TEST_BACKEND ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "local"),
        ({"TXMGR_TEST_BACKEND": "docker"}, "docker"),
        ({"TXMGR_TEST_BACKEND": " Local "}, "local"),
        ({"TXMGR_TEST_DOCKER": "1"}, "docker"),
        ({"TXMGR_TEST_DOCKER": "0"}, "local"),
        ({"TXMGR_TEST_DOCKER": "1", "TXMGR_TEST_BACKEND": "local"}, "local"),
    ],
)
def test_backend_from_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                  expected: str) -> None:
    monkeypatch.delenv("TXMGR_TEST_BACKEND", raising=False)
    monkeypatch.delenv("TXMGR_TEST_DOCKER", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert server_backend() == expected


def test_unknown_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TXMGR_TEST_BACKEND", "podman")
    with pytest.raises(PgServerError, match="'podman' is not a test backend: use one of local"):
        server_backend()


INNER_TEST = '''
def test_needs_a_server(pg_server):
    raise AssertionError("must not run without a Docker engine")
'''


def run_inner_pytest(tmp_path: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess[
        str]:
    """pytest with txmgr's plugin on one test that wants a server, in a clean directory."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TXMGR_TEST_DSNS", "TXMGR_TEST_BACKEND", "TXMGR_TEST_DOCKER")}
    # An engine that cannot answer: the socket does not exist.
    clean["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "txmgr.testing.pytest_plugin", "-rs", "-q",
         "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=120,
        check=False,
    )


@pytest.mark.parametrize("env", [{"TXMGR_TEST_BACKEND": "docker"}, {"TXMGR_TEST_DOCKER": "1"}],
                         ids=["backend", "alias"])
def test_docker_backend_without_engine_skips_with_the_reason(
        tmp_path: pathlib.Path, env: dict[str, str]) -> None:
    proc = run_inner_pytest(tmp_path, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 skipped" in out
    assert "TXMGR_TEST_BACKEND=docker, but no Docker engine answers at unix://" in out


def test_unknown_backend_stops_pytest(tmp_path: pathlib.Path) -> None:
    proc = run_inner_pytest(tmp_path, {"TXMGR_TEST_BACKEND": "podman"})
    assert proc.returncode == 4  # pytest's usage error
    assert "'podman' is not a test backend" in proc.stderr


# -- docker-compose.yml ---------------------------------------------------------------

def compose_command() -> list[str] | None:
    """docker-compose (v1) or the docker compose plugin (v2), whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_is_valid() -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    # `config` only parses and validates the file: no engine is needed.
    proc = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(proc.stdout)["services"]
    participants = [name for name, s in services.items()
                    if "max_prepared_transactions=64" in " ".join(s.get("command") or [])]
    assert sorted(participants) == ["billing", "inventory", "orders"]
    assert services["txlog"]["environment"]["POSTGRES_DB"] == "txlog"
    assert services["txmgr-daemon"]["command"][0] == "daemon"
    assert "healthz" in " ".join(services["txmgr-daemon"]["healthcheck"]["test"])
    app = services["example-app"]
    assert app["entrypoint"][-1] == "/examples/transfer_core.py"
    assert {"ORDERS_DSN", "BILLING_DSN", "TXLOG_DSN"} <= set(app["environment"])


def test_compose_config_file_is_a_valid_txmgr_config() -> None:
    # The file docker-compose.yml mounts as /etc/txmgr/txmgr.toml.
    config = txmgr.Config.from_file(ROOT / "deploy" / "txmgr.compose.toml")
    assert sorted(config.participants) == ["billing", "inventory", "orders"]
    assert config.metrics_port == 9187
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/txmgr.compose.toml:/etc/txmgr/txmgr.toml" in compose
    for name in config.participants:
        assert f"\n  {name}:\n" in compose, f"no compose service for participant {name}"

"""Every script in examples/ runs, as a user would run it, against real servers.

Each ``examples/*.py`` (not ``_*.py``) is run as ``python examples/NAME.py`` with
``ORDERS_DSN`` and ``BILLING_DSN`` on two servers and ``TXLOG_DSN`` — databases made
for the test. A script must exit 0, leave nothing prepared and no decision rows
behind; scripts listed in ``EXPECTED`` must also leave these balances in
``example_accounts``. New examples are picked up without changing this file.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from support import query
from txmgr.testing import Server
from txmgr.testing._env import server_backend
from txmgr.testing.pytest_plugin import MakeDatabase

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))

#: script name -> (output it must print, balances of account 1 afterwards)
EXPECTED: dict[str, tuple[str, dict[str, int]]] = {
    "transfer_core": ("nothing changed", {"orders": 70, "billing": 130}),
    "daemon_from_config": ("committed=2", {"orders": 60, "billing": 140}),
    "transfer_orm": ("nothing changed", {"orders": 70, "billing": 130}),
    "transfer_async": ("nothing changed", {"orders": 70, "billing": 130}),
}


def run_example(script: pathlib.Path, cwd: pathlib.Path,
                env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=180, check=False)


def has_table(dsn: str, table: str) -> bool:
    return query(dsn, "SELECT to_regclass(%s) IS NOT NULL", (table,)) == [(True,)]


def test_examples_are_there() -> None:
    names = {p.stem for p in SCRIPTS}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs(script: pathlib.Path, tmp_path: pathlib.Path,
                      make_database: MakeDatabase, pg_servers: list[Server]) -> None:
    dsns = {"orders": make_database(pg_servers[0]), "billing": make_database(pg_servers[1])}
    log = make_database(pg_servers[0])
    proc = run_example(script, tmp_path, {"ORDERS_DSN": dsns["orders"],
                                          "BILLING_DSN": dsns["billing"], "TXLOG_DSN": log})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip(), "an example says what it did"
    for name, dsn in {**dsns, "txlog": log}.items():
        assert query(dsn, "SELECT gid FROM pg_prepared_xacts "
                          "WHERE database = current_database()") == [], f"{name}: left prepared"
    assert has_table(log, "txmgr_decision"), "the example uses TXLOG_DSN for the log"
    assert query(log, "SELECT txid FROM txmgr_decision") == [], "decision rows left behind"
    assert not re.search(r"://[^:/@\s]+:[^*@\s][^@\s]*@", proc.stdout), "a password shown"
    if script.stem in EXPECTED:
        text, balances = EXPECTED[script.stem]
        assert text in proc.stdout
        for name, balance in balances.items():
            assert query(dsns[name], "SELECT balance FROM example_accounts WHERE id = 1") == [
                (balance,)
            ], name


def test_example_without_dsns_starts_its_own_servers(tmp_path: pathlib.Path) -> None:
    if os.environ.get("TXMGR_TEST_DSNS", "").strip() or server_backend() != "local":
        pytest.skip("the example starts local servers of its own, but TXMGR_TEST_DSNS or "
                    "TXMGR_TEST_BACKEND asks for other servers")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORDERS_DSN", "BILLING_DSN", "TXLOG_DSN")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "transfer_core.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting two throwaway PostgreSQL servers" in proc.stdout
    assert "moved 30: {'orders': 70, 'billing': 130}" in proc.stdout


def test_every_example_has_a_line_in_the_readme() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Examples", 1)[1].split("\n## ", 1)[0]
    for script in SCRIPTS:
        assert f"examples/{script.name}" in section, f"README: describe {script.name}"

"""The built wheel, installed in a fresh virtual environment, is a working txmgr.

The wheel is built from a copy of the sources (so the checkout is not touched),
installed with its dependencies — and without extras — in a new venv, and used
from there with nothing of the checkout on the path: the ``txmgr`` command,
``txmgr migrate``, one transaction over two databases, the migrations and
``txmgr.testing`` inside the package, and the extras' metadata. The ``metrics``
extra is then added and checked. It takes about 15 s here with pip's cache warm
(most of it pip); a fresh machine downloads the dependencies once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement

import txmgr
from support import query
from txmgr._migrate import head_revision
from txmgr.testing.pytest_plugin import MakeDatabase

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600  # seconds; pip may have to download the dependencies

# One worker runs them all (pytest-xdist), and the venv is session-scoped: a worker
# may run other modules' tests between these, which tore a module-scoped one down
# and built it (37 s) twice.
pytestmark = [pytest.mark.timeout(2 * INSTALL_TIMEOUT), pytest.mark.xdist_group("wheel")]


@dataclass(frozen=True)
class Venv:
    root: pathlib.Path
    wheel: pathlib.Path
    work: pathlib.Path  # an empty directory to run in, away from the checkout

    @property
    def bin(self) -> pathlib.Path:
        return self.root / "bin"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.work, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin / "python"), "-c", textwrap.dedent(code))


def copy_sources(dest: pathlib.Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)


def build_wheel(sources: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    # pip builds through the project's PEP 517 backend in an isolated environment,
    # as a user's `pip install .` does; no other build front end is looked for (a
    # `build/` folder in the working directory once passed for the `build` package).
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
           str(sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("txmgr-*.whl")
    return wheel


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    base = tmp_path_factory.mktemp("wheel")
    copy_sources(base / "sources")
    wheel = build_wheel(base / "sources", base / "dist")
    made = subprocess.run([sys.executable, "-m", "venv", str(base / "venv")],
                          capture_output=True, text=True, timeout=300, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()}")
    (base / "work").mkdir()
    v = Venv(base / "venv", wheel, base / "work")
    installed = v.run(str(v.bin / "python"), "-m", "pip", "install", "-q", str(wheel),
                      timeout=INSTALL_TIMEOUT)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return v


def config_file(v: Venv, participants: dict[str, str], log: str) -> pathlib.Path:
    lines = ["[log]", f'dsn = "{log}"', "", "[participants]"]
    lines += [f'{name} = "{dsn}"' for name, dsn in participants.items()]
    path = v.work / "txmgr.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_wheel_declares_the_extras(venv: Venv) -> None:
    with zipfile.ZipFile(venv.wheel) as whl:
        (meta_name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        meta = whl.read(meta_name).decode()
        names = set(whl.namelist())
    for extra in ("sqlalchemy", "metrics", "embedded", "test"):
        assert f"Provides-Extra: {extra}" in meta
    # Parsed, not matched as text: build back ends quote and order markers differently.
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    prometheus = [r for r in requires if r.name == "prometheus-client"]
    # prometheus-client comes with the metrics extra, never without an extra.
    assert any(r.marker is not None and r.marker.evaluate({"extra": "metrics"})
               for r in prometheus), prometheus
    assert not any(r.marker is None or r.marker.evaluate({"extra": ""}) for r in prometheus)
    assert any(r.name == "alembic" and r.marker is None for r in requires), requires
    for path in ("txmgr/py.typed", "txmgr/migrations/env.py",
                 "txmgr/migrations/script.py.mako", "txmgr/testing/pytest_plugin.py"):
        assert path in names, path
    versions = {n for n in names if n.startswith("txmgr/migrations/versions/")}
    assert len([n for n in versions if n.endswith(".py") and "__init__" not in n]) == len(
        list((ROOT / "src/txmgr/migrations/versions").glob("[0-9]*.py"))
    )


def test_installed_package_is_complete_and_apart_from_the_checkout(venv: Venv) -> None:
    proc = venv.python(
        """
        import importlib.metadata, json, pathlib
        import txmgr, txmgr.testing
        from txmgr._migrate import head_revision, revisions
        from txmgr.testing import PgServer
        pkg = pathlib.Path(txmgr.__file__).parent
        plugins = [e.value for e in importlib.metadata.entry_points(group="pytest11")]
        print(json.dumps({
            "file": txmgr.__file__,
            "revisions": revisions(),
            "head": head_revision(),
            "mako": (pkg / "migrations" / "script.py.mako").is_file(),
            "plugin": "txmgr.testing.pytest_plugin" in plugins,
        }))
        """
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["file"].startswith(str(venv.root)), info["file"]
    assert info["head"] == head_revision() and info["revisions"][-1] == head_revision()
    assert info["mako"] and info["plugin"]
    help_ = venv.run(str(venv.bin / "txmgr"), "--help")
    assert help_.returncode == 0, help_.stderr
    for command in ("migrate", "recover", "daemon", "status", "resolve"):
        assert command in help_.stdout


def test_migrate_and_one_transaction_from_the_wheel(venv: Venv,
                                                    make_database: MakeDatabase) -> None:
    dsns = {"orders": make_database(), "billing": make_database()}
    log = make_database()
    for dsn in dsns.values():
        query(dsn, "CREATE TABLE t (x int)")
    cfg = config_file(venv, dsns, log)
    migrated = venv.run(str(venv.bin / "txmgr"), "migrate", "--config", str(cfg))
    assert migrated.returncode == 0, migrated.stderr
    assert f"migrated from empty to {head_revision()}" in migrated.stdout
    tx = venv.python(
        f"""
        import txmgr
        with txmgr.TransactionManager.from_config({str(cfg)!r}) as tm:
            with tm.transaction() as tx:
                tx.connection("orders").execute("INSERT INTO t VALUES (1)")
                tx.connection("billing").execute("INSERT INTO t VALUES (2)")
            print("committed", tx.txid)
        """
    )
    assert tx.returncode == 0, tx.stderr
    assert tx.stdout.startswith("committed ")
    assert query(dsns["orders"], "SELECT x FROM t") == [(1,)]
    assert query(dsns["billing"], "SELECT x FROM t") == [(2,)]


def test_metrics_need_the_extra(venv: Venv, make_database: MakeDatabase) -> None:
    log = make_database()
    txmgr.migrate(log)
    cfg = config_file(venv, {"orders": make_database()}, log)
    # Without the extra: no prometheus_client, and the daemon runs all the same...
    plain = venv.python(
        f"""
        import importlib.util
        from txmgr.config import Config
        from txmgr.daemon import Daemon
        assert importlib.util.find_spec("prometheus_client") is None, "installed without extras"
        daemon = Daemon(Config.from_file({str(cfg)!r}))
        step = daemon.step()
        daemon.close()
        print(step.state, step.report.summary())
        """
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("active committed=0 rolled_back=0"), plain.stdout
    # ... but asked to serve metrics, it says which extra to install.
    daemon = venv.run(str(venv.bin / "txmgr"), "daemon", "--config", str(cfg),
                      "--metrics-port", "0")
    assert daemon.returncode == 2, daemon.stdout + daemon.stderr
    assert "pip install 'txmgr[metrics]'" in daemon.stderr
    extra = venv.run(str(venv.bin / "python"), "-m", "pip", "install", "-q",
                     f"{venv.wheel}[metrics]", timeout=INSTALL_TIMEOUT)
    assert extra.returncode == 0, extra.stdout + extra.stderr
    served = venv.python(
        """
        from txmgr.metrics import DaemonMetrics, MetricsServer
        metrics = DaemonMetrics(["orders"])
        server = MetricsServer(metrics.registry, lambda: (True, "ok")).start()
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read()
        server.stop()
        print("txmgr_daemon_active" in body.decode())
        """
    )
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip() == "True"

"""Tests of txmgr.testing against real PostgreSQL servers."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from txmgr.testing import (
    ExternalServer,
    PgBinariesNotFound,
    PgServer,
    PgServerError,
    Server,
    _binaries,
    find_pg_bin,
    servers_from_env,
)
from txmgr.testing.pytest_plugin import MakeDatabase

pytest_plugins = ["pytester"]

# Characters that must be URL-quoted in a DSN.
ODD_PASSWORD = "p@ss:/w?rd #1%"


@pytest.fixture(scope="module")
def custom_server() -> Iterator[PgServer]:
    if os.environ.get("TXMGR_TEST_DSNS"):
        pytest.skip("starts its own server; TXMGR_TEST_DSNS asks for external ones only")
    with PgServer(
        max_prepared_transactions=0,
        settings={"application_name": "from-settings"},
        superuser_password=ODD_PASSWORD,
    ) as server:
        yield server


def _owner_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_server_runs_unprivileged_and_accepts_its_password(custom_server: PgServer) -> None:
    with psycopg.connect(custom_server.dsn()) as conn:
        row = conn.execute("SELECT current_user, pg_backend_pid()").fetchone()
        assert row is not None
        # Read while the session is open: its backend exits when it closes.
        backend_uid = _owner_uid(row[1])
    assert row[0] == "postgres"
    if os.geteuid() == 0:
        # PostgreSQL refuses root, so the harness must have switched users.
        assert backend_uid != 0
        assert custom_server.data_dir.stat().st_uid == backend_uid
    else:
        assert backend_uid == os.geteuid()
    assert stat.S_IMODE(custom_server.data_dir.stat().st_mode) == 0o700
    assert custom_server.is_running()


def test_server_data_goes_to_a_ram_file_system_when_one_has_room(
    custom_server: PgServer,
) -> None:
    from txmgr.testing import _datadir

    if _datadir._ram_usable(shared=os.geteuid() == 0):
        assert custom_server.data_dir.is_relative_to(_datadir.RAM_DIR)
    else:  # e.g. a container's small /dev/shm: the temporary directory
        assert not custom_server.data_dir.is_relative_to(_datadir.RAM_DIR)


def test_data_dir_setting_is_honoured_or_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from txmgr.testing import _datadir

    monkeypatch.setenv(_datadir.DATA_DIR_ENV, str(tmp_path))
    assert _datadir.data_parent(None) == str(tmp_path)
    monkeypatch.setenv(_datadir.DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(PgServerError, match=r"TXMGR_TEST_DATA_DIR=.*missing.* is not a writable"):
        _datadir.data_parent(None)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setenv(_datadir.DATA_DIR_ENV, str(private))
    with pytest.raises(PgServerError, match="not reachable by the server's user"):
        _datadir.data_parent(_datadir.RunAs("someone", 12345, 12345))
    # Unset: a benchmark's servers (ram=False) and a RAM file system without room
    # are passed over for the temporary directory.
    monkeypatch.delenv(_datadir.DATA_DIR_ENV)
    assert _datadir.data_parent(None, ram=False) is None
    monkeypatch.setattr(_datadir, "RAM_MIN_FREE", 1 << 62)
    assert _datadir.data_parent(None) is None


def test_wrong_password_is_rejected(custom_server: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(custom_server.dsn(password="wrong"), connect_timeout=10)


def test_settings_are_applied(custom_server: PgServer) -> None:
    assert custom_server.execute_admin("SHOW max_prepared_transactions") == [("0",)]
    assert custom_server.execute_admin("SHOW application_name") == [("from-settings",)]
    assert custom_server.execute_admin("SHOW fsync") == [("off",)]
    with psycopg.connect(custom_server.dsn()) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("PREPARE TRANSACTION 'nope'")


def test_session_servers_are_distinct_and_prepare_capable(pg_servers: list[Server]) -> None:
    assert len(pg_servers) == 2
    ports = {conninfo_to_dict(s.admin_dsn).get("port") for s in pg_servers}
    if not os.environ.get("TXMGR_TEST_DSNS"):
        assert len(ports) == 2
        assert pg_servers[0].execute_admin("SHOW max_prepared_transactions") == [("64",)]


def test_prepared_transaction_survives_crash(crash_server: PgServer) -> None:
    crash_server.execute_admin("CREATE TABLE t (x int)")
    with psycopg.connect(crash_server.dsn()) as conn:
        conn.execute("INSERT INTO t VALUES (42)")
        conn.execute("PREPARE TRANSACTION 'x'")
    crash_server.crash()
    assert not crash_server.is_running()
    crash_server.restart()
    assert crash_server.is_running()
    # A clean stop would not make the server recover on restart.
    assert "automatic recovery" in crash_server.log_file.read_text()
    assert crash_server.execute_admin("SELECT gid FROM pg_prepared_xacts") == [("x",)]
    assert crash_server.execute_admin("SELECT x FROM t") == []
    crash_server.execute_admin("COMMIT PREPARED 'x'")
    assert crash_server.execute_admin("SELECT x FROM t") == [(42,)]


def test_start_failure_reports_server_log_and_cleans_up() -> None:
    if os.environ.get("TXMGR_TEST_DSNS"):
        pytest.skip("starts its own server; TXMGR_TEST_DSNS asks for external ones only")
    server = PgServer(settings={"shared_buffers": "lots"})
    with pytest.raises(PgServerError, match=r"tail of .*server\.log") as info:
        server.start()
    assert 'invalid value for parameter "shared_buffers"' in str(info.value)
    data_dir = Path(str(info.value).split(":")[0].split(" for ")[1])
    assert data_dir.name == "data"
    assert not data_dir.parent.exists()
    assert not server.is_running()


KILLED_OWNER = """
import time
from txmgr.testing import PgServer
server = PgServer().start()
print(server.data_dir, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # A zombie has exited; reaping it is up to its new parent (init), not to us.
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def test_server_of_a_killed_process_is_cleaned_up() -> None:
    if os.environ.get("TXMGR_TEST_DSNS"):
        pytest.skip("starts its own server; TXMGR_TEST_DSNS asks for external ones only")
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        data_dir = Path(owner.stdout.readline().strip())
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert _alive(postmaster)
    finally:
        owner.kill()  # SIGKILL: no atexit handler runs
        owner.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (data_dir.parent.exists() or _alive(postmaster)):
        time.sleep(0.05)
    assert not _alive(postmaster)
    assert not data_dir.parent.exists()


def test_drop_database_rolls_back_prepared_transactions(pg_server: Server) -> None:
    dsn = pg_server.create_database()
    name = str(conninfo_to_dict(dsn)["dbname"])
    assert name.startswith("t_")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
    idle = psycopg.connect(dsn)  # an open session must not block the drop either
    idle.execute("INSERT INTO t VALUES (1)")
    idle.execute("PREPARE TRANSACTION 'it''s left over'")
    try:
        pg_server.drop_database(name)
    finally:
        idle.close()
    assert pg_server.execute_admin("SELECT 1 FROM pg_database WHERE datname = %s", [name]) == []
    assert pg_server.execute_admin("SELECT gid FROM pg_prepared_xacts") == []
    pg_server.drop_database(name)  # dropping again is harmless


def test_make_database_copies_a_template(
    make_database: MakeDatabase, pg_server: Server
) -> None:
    filled = make_database()
    with psycopg.connect(filled, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 7 AS x")
    template = str(conninfo_to_dict(filled)["dbname"])
    copy = make_database(template=template)
    assert copy != filled
    with psycopg.connect(copy) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]


INNER_TEST = """
import os
import psycopg
from psycopg.conninfo import conninfo_to_dict

KEEP = []

def test_leaves_garbage(make_database, pg_servers):
    assert [s.can_crash for s in pg_servers] == [False, False]
    assert pg_servers[0].admin_dsn == pg_servers[1].admin_dsn == os.environ["TXMGR_TEST_DSNS"]
    names = []
    for i, dsn in enumerate([make_database(), make_database(pg_servers[1])]):
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute("CREATE TABLE t (x int)")
        conn.autocommit = False
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute(f"PREPARE TRANSACTION 'left-{i}'")
        KEEP.append(conn)
        names.append(conninfo_to_dict(dsn)["dbname"])
    with open(NAMES_FILE, "w") as f:
        f.write(",".join(names))

def test_crash(crash_server):
    raise AssertionError("must be skipped")
"""


def test_plugin_with_external_servers(
    pytester: pytest.Pytester,
    pg_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names_file = pytester.path / "names.txt"
    pytester.makepyfile(test_inner=f"NAMES_FILE = {str(names_file)!r}\n" + INNER_TEST)
    monkeypatch.setenv("TXMGR_TEST_DSNS", pg_server.admin_dsn)
    # -p must work whether or not the "txmgr" entry point is installed as well.
    result = pytester.runpytest("-p", "txmgr.testing.pytest_plugin", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*external servers, which cannot be crashed*"])
    names = names_file.read_text().split(",")
    assert len(names) == 2
    rows = pg_server.execute_admin(
        "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [names]
    )
    assert rows == []
    assert pg_server.execute_admin("SELECT gid FROM pg_prepared_xacts") == []


def test_servers_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TXMGR_TEST_DSNS", raising=False)
    assert servers_from_env(2) is None
    monkeypatch.setenv("TXMGR_TEST_DSNS", "host=a user=u password=pw, host=b user=u")
    servers = servers_from_env(3)
    assert servers is not None
    hosts = [conninfo_to_dict(s.admin_dsn)["host"] for s in servers]
    assert hosts == ["a", "b", "a"]
    first = servers[0]
    assert first.password == "pw"
    assert conninfo_to_dict(first.dsn("db1")) == {
        "host": "a",
        "user": "u",
        "password": "pw",
        "dbname": "db1",
    }
    # Another user must not inherit the admin's password.
    assert "password" not in conninfo_to_dict(first.dsn("db1", user="app"))
    assert isinstance(first, ExternalServer)
    with pytest.raises(NotImplementedError, match="needs a server started by the harness"):
        first.crash()


def _fake_bin_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        exe = path / name
        exe.write_text("#!/bin/sh\nexit 1\n")
        exe.chmod(0o755)
    return path


def test_find_pg_bin_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_bin_dir(tmp_path / "pg" / "bin")
    monkeypatch.setenv("TXMGR_PG_BIN", str(fake))
    assert find_pg_bin() == fake
    # A wrong explicit setting is an error, not a silent fallback to another install.
    monkeypatch.setenv("TXMGR_PG_BIN", str(tmp_path))
    with pytest.raises(PgBinariesNotFound, match="TXMGR_PG_BIN"):
        find_pg_bin()


@pytest.fixture
def no_system_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the env variable, pg_config and /usr/lib/postgresql from find_pg_bin."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("TXMGR_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(empty))  # no pg_config
    monkeypatch.setattr(_binaries, "_DEBIAN_ROOT", tmp_path / "no-such-dir")


@pytest.fixture
def no_pgserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make an installed pgserver package invisible."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "pgserver" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.usefixtures("no_system_postgres", "no_pgserver")
def test_find_pg_bin_explains_the_fix() -> None:
    with pytest.raises(PgBinariesNotFound) as info:
        find_pg_bin()
    message = str(info.value)
    assert "apt-get install postgresql" in message
    assert "TXMGR_PG_BIN" in message
    assert "pip install 'txmgr[embedded]'" in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.usefixtures("no_system_postgres", "no_pgserver")
def test_find_pg_bin_prefers_newest_debian_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib-postgresql"
    for version in ("9.6", "15", "10"):
        _fake_bin_dir(root / version / "bin")
    (root / "common").mkdir()
    monkeypatch.setattr(_binaries, "_DEBIAN_ROOT", root)
    assert find_pg_bin() == root / "15" / "bin"  # numeric order; lexical would say 9.6


@pytest.mark.usefixtures("no_system_postgres")
def test_find_pg_bin_uses_pgserver_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    package = site / "pgserver"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('pgserver must not be imported')\n")
    fake = _fake_bin_dir(package / "pginstall" / "bin")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "pgserver", raising=False)
    assert find_pg_bin() == fake
    assert "pgserver" not in sys.modules

"""The decision log's migrations, up from empty to head and back to base, on a real server.

Three ways are documented in the README ("The decision log") and each is tested
here: `txmgr migrate` / `txmgr.migrate(dsn)`; `txmgr.migrate(connection=...)` from an
application's own alembic env.py; the `alembic` command pointed at txmgr's
migrations. Every revision shipped is walked, so new ones are covered as they come.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from psycopg.conninfo import conninfo_to_dict

import txmgr
from support import Bank, query, transfer
from txmgr._migrate import VERSION_TABLE, current_revision, head_revision, revisions
from txmgr.testing.pytest_plugin import MakeDatabase


def txmgr_relations(dsn: str) -> set[str]:
    """Every relation (table, sequence, index, …) whose name starts with txmgr_, and
    every column of those (``relation.column``: a revision may only add a column)."""
    rows = query(dsn, "SELECT relname FROM pg_class c JOIN pg_namespace n "
                      "ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
                      "AND starts_with(relname, 'txmgr_')")
    columns = query(dsn, "SELECT table_name || '.' || column_name FROM information_schema.columns "
                         "WHERE table_schema = 'public' AND starts_with(table_name, 'txmgr_')")
    return {r[0] for r in rows} | {r[0] for r in columns}


def txmgr_schema(dsn: str) -> set[str]:
    """Every txmgr_ relation, and every column of those tables as "table.column"
    (a revision may only add columns: 0005 binds the log id to its database)."""
    rows = query(dsn, "SELECT table_name || '.' || column_name FROM information_schema.columns "
                      "WHERE table_schema = 'public' AND starts_with(table_name, 'txmgr_')")
    return txmgr_relations(dsn) | {r[0] for r in rows}


def sa_url(dsn: str) -> str:
    """A SQLAlchemy URL for a libpq DSN (URL or key=value, as external servers give)."""
    p = conninfo_to_dict(dsn)
    port = p.get("port")
    url = sa.URL.create("postgresql+psycopg", username=p.get("user"),
                        password=p.get("password"), host=p.get("host"),
                        port=int(port) if port else None, database=p.get("dbname"))
    return url.render_as_string(hide_password=False)


def one_transaction(participants: dict[str, str], log: str) -> None:
    """A two-participant transaction through the log; checks both rows are there."""
    for dsn in participants.values():
        query(dsn, "CREATE TABLE IF NOT EXISTS t (x int)")
    with txmgr.TransactionManager(participants, log) as tm, tm.transaction() as tx:
        for name in participants:
            tx.connection(name).execute("INSERT INTO t VALUES (1)")
    for dsn in participants.values():
        assert query(dsn, "SELECT count(*) FROM t") == [(1,)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txmgr.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_revisions_end_at_the_head_the_code_expects() -> None:
    from txmgr.log import SCHEMA_REVISION

    revs = revisions()
    assert revs and revs[-1] == head_revision()
    assert len(set(revs)) == len(revs)
    assert head_revision() == SCHEMA_REVISION


def test_every_revision_up_and_down_through_txmgr_migrate(make_database: MakeDatabase) -> None:
    log = make_database()
    assert txmgr_relations(log) == set()
    seen: dict[str | None, set[str]] = {None: set()}
    previous: str | None = None
    for rev in revisions():
        assert txmgr.migrate(log, revision=rev) == (previous, rev)
        assert current_revision(log) == rev
        seen[rev] = txmgr_schema(log)
        assert seen[rev] > seen[previous], f"revision {rev} created nothing"
        previous = rev
    one_transaction({"a": make_database(), "b": make_database()}, log)
    # Down one revision at a time: each one leaves exactly what its predecessor made.
    for rev in [*reversed(revisions()[:-1]), None]:
        before, after = txmgr.migrate(log, revision=rev or "base")
        assert (before, after) == (previous, rev)
        assert txmgr_schema(log) == (seen[rev] if rev else set())
        previous = rev
    assert current_revision(log) is None
    # And up again in one go: a downgraded log is as good as a new one.
    assert txmgr.migrate(log) == (None, head_revision())
    one_transaction({"a": make_database(), "b": make_database()}, log)


def test_cli_up_and_down(tmp_path: pathlib.Path, make_database: MakeDatabase) -> None:
    log = make_database()
    cfg = tmp_path / "txmgr.toml"
    cfg.write_text(f'[log]\ndsn = "{log}"\n\n[participants]\na = "{log}"\n')
    up = cli("migrate", "--config", str(cfg))
    assert up.returncode == 0, up.stderr
    assert f"to {head_revision()}" in up.stdout
    down = cli("migrate", "--config", str(cfg), "--revision", "base")
    assert down.returncode == 0, down.stderr
    assert txmgr_relations(log) == set()
    bad = cli("migrate", "--config", str(cfg), "--revision", "nope")
    assert bad.returncode == 2
    assert "unknown revision 'nope'" in bad.stderr and "known: base, 0001" in bad.stderr


def test_downgrade_refused_while_decisions_are_pending(tmp_path: pathlib.Path,
                                                       bank: Bank) -> None:
    bank.kill_coordinator("after_decision", transfer(5, "a", "b"))
    assert len(bank.decisions()) == 1
    tables = txmgr_relations(bank.log_dsn)
    with pytest.raises(txmgr.LogSchemaError, match="holds 1 decision"):
        txmgr.migrate(bank.log_dsn, revision="base")
    assert txmgr_relations(bank.log_dsn) == tables
    assert len(bank.decisions()) == 1
    report = txmgr.recover(bank.config())
    assert report.committed == 2 and not bank.decisions()
    txmgr.migrate(bank.log_dsn, revision="base")
    assert txmgr_relations(bank.log_dsn) == set()


def test_unknown_database_revision_is_a_schema_error(make_database: MakeDatabase) -> None:
    log = make_database()
    txmgr.migrate(log)
    query(log, f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'")
    with pytest.raises(txmgr.LogSchemaError, match=r"'ffff'.*newer txmgr"):
        txmgr.migrate(log)


# -- from an application's own alembic environment ---------------------------------------

APP_ENV = '''
import sqlalchemy as sa
from alembic import context

import txmgr

def include_name(name, type_, parent_names):
    """Leave txmgr's tables out of autogenerate: txmgr migrates them itself."""
    return not (type_ == "table" and name.startswith("txmgr_"))

engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"),
                          poolclass=sa.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None,
                      include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()
        # txmgr's tables, at txmgr's head, in the same transaction, with their own
        # version table (txmgr_alembic_version).
        txmgr.migrate(connection=connection)
engine.dispose()
'''

APP_REVISION = '''
from alembic import op
import sqlalchemy as sa

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None

def upgrade():
    op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True))

def downgrade():
    op.drop_table("orders")
'''


def app_alembic(tmp_path: pathlib.Path, dsn: str) -> AlembicConfig:
    """An application's alembic directory with one revision of its own."""
    root = tmp_path / "app_migrations"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent(APP_ENV))
    (root / "versions" / "a1_orders.py").write_text(textwrap.dedent(APP_REVISION))
    (root / "script.py.mako").write_text("")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(root))
    cfg.set_main_option("sqlalchemy.url", sa_url(dsn).replace("%", "%%"))
    return cfg


def test_from_the_applications_own_env_py(tmp_path: pathlib.Path,
                                          make_database: MakeDatabase) -> None:
    app_db = make_database()
    cfg = app_alembic(tmp_path, app_db)
    command.upgrade(cfg, "head")
    # Both histories, each in its own version table.
    assert query(app_db, "SELECT version_num FROM alembic_version") == [("a1",)]
    assert current_revision(app_db) == head_revision()
    assert "orders" in {r[0] for r in query(app_db, "SELECT tablename FROM pg_tables")}
    one_transaction({"a": app_db, "b": make_database()}, app_db)
    # Running it again changes nothing; the app's downgrade leaves txmgr's tables alone.
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    assert query(app_db, "SELECT count(*) FROM alembic_version") == [(0,)]
    assert current_revision(app_db) == head_revision()
    # txmgr's tables go with txmgr's own downgrade.
    txmgr.migrate(app_db, revision="base")
    assert txmgr_relations(app_db) == set()


def test_autogenerate_with_the_filter_ignores_txmgr_tables(make_database: MakeDatabase) -> None:
    app_db = make_database()
    txmgr.migrate(app_db)
    query(app_db, "CREATE TABLE orders (id int PRIMARY KEY)")
    metadata = sa.MetaData()
    sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True))

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        return not (type_ == "table" and (name or "").startswith("txmgr_"))

    engine = sa.create_engine(sa_url(app_db), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            with warnings.catch_warnings():  # it cannot reflect txmgr's xid8 column
                warnings.simplefilter("ignore", sa.exc.SAWarning)
                unfiltered = compare_metadata(MigrationContext.configure(conn), metadata)
            filtered = compare_metadata(
                MigrationContext.configure(conn, opts={"include_name": include_name}), metadata
            )
    finally:
        engine.dispose()
    # Without the filter autogenerate would drop txmgr's tables; with it, nothing to do.
    dropped = {d[1].name for d in unfiltered if d[0] == "remove_table"}
    assert {"txmgr_decision", "txmgr_log_meta"} <= dropped
    assert filtered == []


def test_the_alembic_command_on_txmgrs_script_location(tmp_path: pathlib.Path,
                                                       make_database: MakeDatabase) -> None:
    log = make_database()
    ini = tmp_path / "txmgr-alembic.ini"
    url = sa_url(log).replace("%", "%%")
    ini.write_text(f"[alembic]\nscript_location = txmgr:migrations\nsqlalchemy.url = {url}\n")
    up = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
                        capture_output=True, text=True, timeout=120, check=False)
    assert up.returncode == 0, up.stderr
    assert current_revision(log) == head_revision()
    one_transaction({"a": make_database(), "b": make_database()}, log)

    cfg = AlembicConfig(str(ini))
    query(log, "INSERT INTO txmgr_decision (txid, lxid, participants) "
               "VALUES ('00000000000000aa', '1', '{a,b}')")
    with pytest.raises(txmgr.LogSchemaError, match="refusing to downgrade"):
        command.downgrade(cfg, "base")
    assert current_revision(log) == head_revision()
    query(log, "DELETE FROM txmgr_decision")
    command.downgrade(cfg, "-1")
    expected = revisions()[-2] if len(revisions()) > 1 else None
    assert current_revision(log) == expected
    command.downgrade(cfg, "base")
    assert txmgr_relations(log) == set()

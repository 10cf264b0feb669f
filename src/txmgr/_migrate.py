"""Apply the decision log's alembic migrations to a database, up or down.

The migrations ship inside the package (``txmgr/migrations``) and keep their own
version table, ``txmgr_alembic_version``, so they never mix with an application's
alembic history when the log lives in an application database. Three ways in:

- ``txmgr migrate --config FILE`` or :func:`migrate` with a DSN: txmgr connects and
  migrates in one transaction of its own;
- :func:`migrate` with ``connection=``: from an application's alembic ``env.py``,
  on the application's connection and inside its migration transaction;
- the ``alembic`` command with ``script_location = txmgr:migrations`` (its
  ``env.py`` reads ``sqlalchemy.url``).

Every path runs the same checks: a downgrade is refused while the log holds
decisions (dropping them would lose the outcome of in-doubt branches), and a
downgrade to ``base`` also drops the emptied version table, so nothing of txmgr's
is left behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from txmgr._dsn import mask
from txmgr.errors import ConfigError, LogSchemaError
from txmgr.participant import connect

if TYPE_CHECKING:  # alembic and SQLAlchemy load only when migrating
    import sqlalchemy as sa
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

__all__ = [
    "SCRIPT_LOCATION",
    "VERSION_TABLE",
    "check_downgrade",
    "current_revision",
    "drop_version_table_if_empty",
    "head_revision",
    "migrate",
    "plan",
    "revisions",
    "run_migrations",
]

#: Where alembic finds txmgr's migrations (``script_location`` in an alembic config).
SCRIPT_LOCATION = "txmgr:migrations"
#: The version table of txmgr's migrations, apart from an application's ``alembic_version``.
VERSION_TABLE = "txmgr_alembic_version"
# The table whose rows are decisions: it must be empty before any downgrade.
_DECISION_TABLE = "txmgr_decision"


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    """The newest revision shipped with this txmgr."""
    head = _script().get_current_head()
    assert head is not None
    return head


def revisions() -> list[str]:
    """Every revision shipped with this txmgr, oldest first."""
    return [s.revision for s in reversed(list(_script().walk_revisions()))]


def _engine(dsn: str, name: str) -> sa.Engine:
    # A creator keeps both DSN forms (URL and key=value) working and turns
    # connection failures into txmgr's masked ParticipantUnavailable.
    import sqlalchemy as sa

    def creator() -> Any:
        return connect(dsn, name)

    return sa.create_engine("postgresql+psycopg://", creator=creator, poolclass=sa.NullPool)


def _current(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def current_revision(dsn: str, name: str = "log") -> str | None:
    """The revision the log database is at (None: no txmgr tables)."""
    engine = _engine(dsn, name)
    try:
        with engine.connect() as conn:
            return _current(conn)
    finally:
        engine.dispose()


def plan(script: ScriptDirectory, current: str | None, revision: str) -> tuple[str | None, bool]:
    """``(target, downgrade)`` for going from ``current`` to ``revision``.

    ``target`` is the revision id (None for ``base``); ``downgrade`` tells the
    direction. Unknown revisions raise :class:`ConfigError` (a bad argument) or
    :class:`LogSchemaError` (the database is at a revision this txmgr does not
    ship: a newer txmgr migrated it).
    """
    from alembic.util import CommandError

    known = ", ".join(["base", *(s.revision for s in reversed(list(script.walk_revisions())))])
    if revision == "base":
        target = None
    else:
        try:
            found = script.get_revision(revision)
        except CommandError:
            found = None
        if found is None:
            raise ConfigError(
                f"unknown revision {revision!r} of txmgr's decision log; known: {known} "
                "(or head)"
            )
        target = found.revision
    if current is None or target == current:
        return target, False
    try:
        below_current = {s.revision for s in script.walk_revisions("base", current)}
    except CommandError:
        raise LogSchemaError(
            f"the decision log is at revision {current!r}, which this txmgr does not ship "
            f"(it knows {known}): it was migrated by a newer txmgr; upgrade txmgr"
        ) from None
    return target, target is None or target in below_current


def check_downgrade(connection: sa.Connection) -> None:
    """Refuse a downgrade while the decision log holds decisions.

    A decision row is the only record that a prepared branch must be committed;
    dropping it would turn a committed transaction into a rolled-back one on
    some participants. The table is locked until the migration's transaction
    ends, so no coordinator can add a row in between.
    """
    import sqlalchemy as sa

    exists = connection.execute(
        sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": _DECISION_TABLE}
    ).scalar_one()
    if not exists:
        return
    connection.execute(sa.text(f"LOCK TABLE {_DECISION_TABLE} IN ACCESS EXCLUSIVE MODE"))
    pending = connection.execute(sa.text(f"SELECT count(*) FROM {_DECISION_TABLE}")).scalar_one()
    if pending:
        raise LogSchemaError(
            f"refusing to downgrade the decision log: it holds {pending} decision(s) whose "
            "branches may not all be committed yet, and dropping them would lose those "
            "outcomes; stop the applications, run `txmgr recover` until `txmgr status` shows "
            "no decision rows, then try again"
        )


def drop_version_table_if_empty(connection: sa.Connection) -> None:
    """After a downgrade to ``base``: drop the version table, so no txmgr table remains."""
    import sqlalchemy as sa

    if connection.execute(
        sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": VERSION_TABLE}
    ).scalar_one() and not connection.execute(
        sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")
    ).scalar_one():
        connection.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))


def run_migrations(connection: sa.Connection, revision: str = "head") -> tuple[str | None,
                                                                               str | None]:
    """Migrate on ``connection``, inside the transaction it is in; returns (before, after).

    Uses alembic's migration context directly rather than its commands, so that it
    can run from inside another alembic environment (an application's ``env.py``)
    without replacing that environment's ``alembic.context``.
    """
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    script = _script()
    before = _current(connection)
    target, downgrade = plan(script, before, revision)
    if target == before:
        return before, before
    if downgrade:
        check_downgrade(connection)
    destination = target or "base"

    # The same step lists alembic's `upgrade`/`downgrade` commands compute.
    def steps(heads: Any, context: Any) -> Any:
        if downgrade:
            return script._downgrade_revs(destination, heads)
        return script._upgrade_revs(destination, heads)

    ctx = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "script": script, "fn": steps,
              "transactional_ddl": True},
    )  # fmt: skip
    with Operations.context(ctx):
        ctx.run_migrations()
    if target is None:
        drop_version_table_if_empty(connection)
    return before, _current(connection)


def migrate(
    dsn: str | None = None,
    *,
    revision: str = "head",
    name: str = "log",
    connection: sa.Connection | None = None,
) -> tuple[str | None, str | None]:
    """Bring the decision log tables to ``revision``; returns (before, after).

    ``revision`` is ``"head"`` (the default), a revision id, or ``"base"``; a
    revision older than the database's is a downgrade, refused while the log
    holds decisions (:class:`~txmgr.errors.LogSchemaError`). ``None`` stands for
    "no txmgr tables".

    Give either ``dsn`` (txmgr connects and migrates in one transaction; ``name``
    labels the database in error messages) or ``connection``, an open SQLAlchemy
    ``Connection`` — e.g. from your own alembic ``env.py`` — on which the migration
    runs inside the transaction the caller controls. Idempotent and safe to run
    while applications use the log.
    """
    if (dsn is None) == (connection is None):
        raise TypeError("migrate() takes either a dsn or connection=, not both or neither")
    if connection is not None:
        return run_migrations(connection, revision)
    assert dsn is not None
    engine = _engine(dsn, name)
    try:
        with engine.begin() as conn:
            return run_migrations(conn, revision)
    except (ConfigError, LogSchemaError) as e:
        raise type(e)(f"{e} (decision log at {mask(dsn)})") from None
    finally:
        engine.dispose()

"""Alembic environment for txmgr's decision log tables.

``txmgr migrate`` and :func:`txmgr.migrate` do not go through this file: they run
the migrations on their own connection (see :mod:`txmgr._migrate`). It is here for
the ``alembic`` command pointed at txmgr's migrations, e.g. an ``alembic.ini`` of
your own::

    [alembic]
    script_location = txmgr:migrations
    sqlalchemy.url = postgresql+psycopg://app@db0/txlog

    $ alembic -c txmgr-alembic.ini upgrade head

or for alembic's Python API with an open SQLAlchemy connection in
``config.attributes["connection"]``. The version table is always
``txmgr_alembic_version``, so that a log kept inside an application database never
collides with the application's own alembic history. The checks are those of
``txmgr migrate``: a downgrade is refused while the log holds decisions, and a
downgrade to ``base`` drops the emptied version table. Offline (``--sql``) mode is
not supported: the downgrade check needs the database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from txmgr._migrate import VERSION_TABLE, check_downgrade, drop_version_table_if_empty, plan


def _is_downgrade(current: str | None, destination: str | None) -> bool:
    if destination is None:  # not a migration: `alembic current`, `check`, ...
        return False
    if "-" in destination or "+" in destination:  # relative: -1, +2, ae10+1
        return "-" in destination
    return plan(context.script, current, destination)[1]


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, version_table=VERSION_TABLE,
                      transactional_ddl=True)  # fmt: skip
    with context.begin_transaction():
        migration = context.get_context()
        # The argument as given ("base", "head", "-1"): get_revision_argument()
        # turns "base" into None, which cannot be told from no argument at all.
        destination = migration.opts.get("destination_rev")
        downgrade = _is_downgrade(migration.get_current_revision(), destination)
        if downgrade:
            check_downgrade(connection)
        context.run_migrations()
        if downgrade:
            drop_version_table_if_empty(connection)  # only once at base: it is empty then


if context.is_offline_mode():
    raise RuntimeError("txmgr's migrations need a database connection (no --sql mode)")

_connection = context.config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
else:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "txmgr's alembic environment needs sqlalchemy.url in the alembic config (or an "
            "open connection in config.attributes['connection']); or run `txmgr migrate "
            "--config FILE`"
        )
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()

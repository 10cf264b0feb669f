"""Alembic environment for txmgr's decision log tables.

Run through ``txmgr migrate`` (or :func:`txmgr.migrate`), which passes an open
SQLAlchemy connection in ``config.attributes["connection"]``. The version table
is ``txmgr_alembic_version`` so that a log kept inside an application database
never collides with the application's own alembic history.
"""

from __future__ import annotations

from alembic import context

VERSION_TABLE = "txmgr_alembic_version"

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("txmgr migrations run through `txmgr migrate --config FILE`")

context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()

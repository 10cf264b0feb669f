"""Apply the decision log's alembic migrations to a database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from txmgr.participant import connect

if TYPE_CHECKING:  # alembic and SQLAlchemy load only when migrating
    import sqlalchemy as sa
    from alembic.config import Config as AlembicConfig

__all__ = ["current_revision", "head_revision", "migrate"]

_SCRIPT_LOCATION = "txmgr:migrations"
_VERSION_TABLE = "txmgr_alembic_version"


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", _SCRIPT_LOCATION)
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this txmgr."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _engine(dsn: str, name: str) -> sa.Engine:
    # A creator keeps both DSN forms (URL and key=value) working and turns
    # connection failures into txmgr's masked ParticipantUnavailable.
    import sqlalchemy as sa

    def creator() -> Any:
        return connect(dsn, name)

    return sa.create_engine("postgresql+psycopg://", creator=creator, poolclass=sa.NullPool)


def current_revision(dsn: str, name: str = "log") -> str | None:
    """The revision the log database is at (None: no txmgr tables)."""
    from alembic.runtime.migration import MigrationContext

    engine = _engine(dsn, name)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": _VERSION_TABLE})
            return ctx.get_current_revision()
    finally:
        engine.dispose()


def migrate(dsn: str, *, revision: str = "head", name: str = "log") -> tuple[str | None, str]:
    """Bring the decision log tables in ``dsn`` to ``revision``; returns (before, after).

    Idempotent and safe to run while applications use the log (each migration
    is one transaction).
    """
    from alembic import command

    before = current_revision(dsn, name)
    engine = _engine(dsn, name)
    try:
        with engine.begin() as conn:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
    after = current_revision(dsn, name)
    assert after is not None
    return before, after



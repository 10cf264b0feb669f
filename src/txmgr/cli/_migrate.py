"""``txmgr migrate``: create or upgrade the decision log tables."""

from __future__ import annotations

import click

from txmgr._dsn import mask
from txmgr._migrate import migrate
from txmgr.cli._common import config_option, load_config

__all__ = ["migrate_cmd"]


@click.command("migrate")
@config_option
@click.option(
    "--revision",
    default="head",
    show_default=True,
    help="Target alembic revision ('base' removes the tables; refused while decisions "
    "are pending).",
)
def migrate_cmd(config_path: str | None, revision: str) -> None:
    """Create or upgrade the decision log tables in the log database."""
    config = load_config(config_path)
    before, after = migrate(config.log_dsn, revision=revision, name=config.log_participant or "log")
    where = mask(config.log_dsn)
    if before == after:
        click.echo(f"decision log at {where} is up to date (revision {after or 'empty'})")
    else:
        click.echo(
            f"decision log at {where} migrated from {before or 'empty'} to {after or 'empty'}"
        )

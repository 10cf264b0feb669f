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
    paxos = config.paxos_log
    if paxos is not None:  # Paxos mode: every log database, one after the other
        targets = [(dsn, "log") for dsn in paxos.dsns]
    else:
        targets = [(config.log_dsn, config.log_participant or "log")]
    for dsn, name in targets:
        before, after = migrate(dsn, revision=revision, name=name)
        where = mask(dsn)
        if before == after:
            click.echo(f"decision log at {where} is up to date (revision {after or 'empty'})")
        else:
            click.echo(
                f"decision log at {where} migrated from {before or 'empty'} to {after or 'empty'}"
            )

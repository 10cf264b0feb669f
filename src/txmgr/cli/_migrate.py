"""``txmgr migrate``: create or upgrade the decision log tables."""

from __future__ import annotations

import click

from txmgr._adopt import adopt_log, is_copy
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
@click.option(
    "--adopt", is_flag=True,
    help="After migrating: give a copied log (a restored dump, a TEMPLATE clone) a new "
    "log id of its own, dropping the decisions it copied from the original.",
)
@click.option(
    "--keep-logid", is_flag=True,
    help="With --adopt: keep the id and the decisions; only when the copy replaces a "
    "retired original for good (pg_upgrade, a move).",
)
def migrate_cmd(config_path: str | None, revision: str, adopt: bool, keep_logid: bool) -> None:
    """Create or upgrade the decision log tables in the log database."""
    config = load_config(config_path)
    if keep_logid and not adopt:
        raise click.UsageError("--keep-logid goes with --adopt")
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
        if adopt and paxos is not None and not is_copy(dsn):
            click.echo(f"log database at {where} is not a copy: nothing to adopt")
        elif adopt:
            old, new = adopt_log(dsn, keep_logid=keep_logid)
            click.echo(f"decision log at {where} adopted: log id {old} -> {new}, bound to "
                       "this database")

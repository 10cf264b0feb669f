"""``txmgr recover``: one recovery pass over every participant."""

from __future__ import annotations

import sys

import click

from txmgr.cli._common import config_option, load_config
from txmgr.recovery import recover

__all__ = ["recover_cmd"]


@click.command("recover")
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Print every branch recovery looked at.")
def recover_cmd(config_path: str | None, verbose: bool) -> None:
    """Commit or roll back every prepared branch exactly as the log decided.

    Exit code 0 when every decidable branch was resolved, 1 otherwise.
    """
    report = recover(load_config(config_path))
    if verbose:
        for r in report.resolutions:
            click.echo(f"{r.participant}\t{r.gid}\t{r.outcome}\t{r.detail}")
    for err in report.errors:
        click.echo(f"error: {err}", err=True)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)

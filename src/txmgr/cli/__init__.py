"""The ``txmgr`` command line: one module per command, assembled here.

Nothing imports this package; it imports the library. Every command reads the
same TOML file as ``TransactionManager.from_config`` (``--config`` or
``$TXMGR_CONFIG``). Exit codes: 0 success, 1 the command ran and found a
problem (stuck branches, unresolved errors), 2 bad usage or configuration.
"""

from __future__ import annotations

import click

from txmgr import __version__
from txmgr.cli._common import run_main
from txmgr.cli._daemon import daemon_cmd
from txmgr.cli._migrate import migrate_cmd
from txmgr.cli._recover import recover_cmd
from txmgr.cli._resolve import resolve_cmd
from txmgr.cli._status import status_cmd

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="txmgr")
def cli() -> None:
    """Atomic commits across PostgreSQL databases: migrate, recover, inspect, demo."""


cli.add_command(migrate_cmd)
cli.add_command(recover_cmd)
cli.add_command(daemon_cmd)
cli.add_command(status_cmd)
cli.add_command(resolve_cmd)


def _add_optional() -> None:
    # Commands that live in modules of their own and may pull heavier imports.
    from txmgr.cli._demo import demo_cmd
    from txmgr.cli._torture import torture_cmd

    cli.add_command(demo_cmd)
    cli.add_command(torture_cmd)


_add_optional()


def main() -> None:
    """The ``txmgr`` command's entry point: exit codes 0, 1 or 2 (see the module doc)."""
    run_main(cli)

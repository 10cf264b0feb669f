"""``txmgr torture``: the bank torture test on throwaway servers (see txmgr.torture)."""

from __future__ import annotations

import sys
from typing import Any

import click

from txmgr.torture._cli import run_from_options, torture_options

__all__ = ["torture_cmd"]


@click.command("torture")
@torture_options
def torture_cmd(**kwargs: Any) -> None:
    """Transfers through txmgr while a seeded nemesis kills clients, daemons and servers
    and drops protocol messages; then recovery and a check of money, atomicity,
    durability, leftovers and leaked passwords. Exit status 1 on any violation.

    Needs PostgreSQL server binaries (as `txmgr demo`).
    """
    sys.exit(run_from_options(**kwargs))

"""``txmgr demo``: see txmgr survive a coordinator crash, on throwaway servers."""

from __future__ import annotations

import sys

import click

__all__ = ["demo_cmd"]


@click.command("demo")
@click.option("--transfers", default=200, show_default=True, help="Transfers to run.")
@click.option("--threads", default=4, show_default=True, help="Threads sharing one manager.")
def demo_cmd(transfers: int, threads: int) -> None:
    """Move money between two databases, kill coordinators mid-commit, recover, check totals.

    Needs PostgreSQL server binaries: a local installation, TXMGR_PG_BIN, or
    `pip install 'txmgr[embedded]'`.
    """
    from txmgr._demo import run_demo
    from txmgr.testing import PgBinariesNotFound

    try:
        ok = run_demo(transfers, threads, echo=click.echo)
    except PgBinariesNotFound as e:
        # Not a bug but a machine without a server: say what to install, nothing else.
        click.echo(f"txmgr demo: {e}", err=True)
        sys.exit(1)
    sys.exit(0 if ok else 1)

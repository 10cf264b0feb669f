"""Helpers shared by the CLI commands: config loading and error reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from txmgr._dsn import redact
from txmgr.config import CONFIG_ENV, Config, resolve_config_path
from txmgr.errors import ConfigError, TxmgrError

__all__ = ["config_option", "load_config", "run_main"]

F = TypeVar("F", bound=Callable[..., Any])


def config_option(fn: F) -> F:
    """The ``--config FILE`` option every command takes."""
    return click.option(
        "--config",
        "config_path",
        metavar="FILE",
        envvar=CONFIG_ENV,
        help=f"TOML configuration file (default: ${CONFIG_ENV}).",
    )(fn)


def load_config(path: str | None) -> Config:
    return Config.from_file(resolve_config_path(path))


def run_main(cli: click.Group) -> None:
    """Run the CLI, turning txmgr's errors into one clear line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except ConfigError as e:
        click.echo(f"txmgr: configuration error: {redact(str(e))}", err=True)
        sys.exit(2)
    except TxmgrError as e:
        click.echo(f"txmgr: {type(e).__name__}: {redact(str(e))}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: one line, never a password, never a traceback
        click.echo(f"txmgr: unexpected {type(e).__name__}: {redact(str(e))}", err=True)
        sys.exit(1)

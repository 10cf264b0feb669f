"""Command-line options of the torture test, shared by ``python -m txmgr.torture``
and ``txmgr torture``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from txmgr.torture._kinds import ALL_KINDS, FAILOVER, PAXOS_ONLY, kinds_for

__all__ = ["torture_main", "torture_options"]


def torture_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the torture command, applied to a click command function."""
    for option in reversed([
        click.option("--minutes", type=click.FloatRange(min=0), default=None,
                     help="Minutes of faults (added to --seconds)."),
        click.option("--seconds", type=click.FloatRange(min=0), default=None,
                     help="Seconds of faults (default 60 when neither is given)."),
        click.option("--seed", type=int, default=None,
                     help="Seed of the fault schedule (default: random, printed)."),
        click.option("--clients", type=click.IntRange(1, 32), default=4, show_default=True,
                     help="Client processes running transfers."),
        click.option("--threads", type=click.IntRange(1, 16), default=None,
                     help="Transfers each client runs at once (default: 2 with --log "
                          "paxos, where their commits share accept rounds; else 1)."),
        click.option("--participants", type=click.Choice(["2", "3"]), default="2",
                     show_default=True, help="Participant servers."),
        click.option("--log", "log_mode",
                     type=click.Choice(["dedicated", "participant", "paxos"]),
                     default="dedicated", show_default=True,
                     help="Decision log on a server of its own, inside a participant, or "
                          "Paxos mode: three log databases on servers of their own."),
        click.option("--pooler", type=click.Choice(["none", "session", "transaction"]),
                     default="none", show_default=True,
                     help="Reach every server through a PgBouncer in this pool mode."),
        click.option("--standby", is_flag=True, default=False,
                     help="Give every server a synchronous hot standby; adds the failover "
                          "faults (single-log modes)."),
        click.option("--daemons", type=click.IntRange(1, 4), default=2, show_default=True,
                     help="Recovery daemons (one active, the others standby)."),
        click.option("--workload", type=click.Choice(["bank", "hot"]), default="bank",
                     show_default=True,
                     help="hot: a few hot accounts, legs in random order (distributed "
                          "deadlocks), a deadline per attempt, retries; the checker bounds "
                          "every wait."),
        click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=3.0,
                     show_default=True, help="With --workload hot: each attempt's timeout."),
        click.option("--kinds", default=None,
                     help="Comma-separated fault kinds (default: every kind of the --log "
                          "mode)."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Also write the report as JSON to this file."),
        click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Keep logs and records here (default: a temporary "
                                        "directory, removed after a clean run)."),
    ]):  # fmt: skip
        fn = option(fn)
    return fn


def run_from_options(
    minutes: float | None,
    seconds: float | None,
    seed: int | None,
    clients: int,
    threads: int | None,
    participants: str,
    log_mode: str,
    daemons: int,
    kinds: str | None,
    json_path: Path | None,
    workdir: Path | None,
    workload: str = "bank",
    deadline: float = 3.0,
    pooler: str = "none",
    standby: bool = False,
) -> int:
    """Run the torture test; the exit status: 0 passed, 1 failed."""
    from txmgr.torture._report import TortureOptions
    from txmgr.torture._run import run_torture  # the harness: only now

    total = (minutes or 0.0) * 60 + (seconds or 0.0)
    log: Literal["dedicated", "participant", "paxos"] = (
        "participant" if log_mode == "participant" else
        "paxos" if log_mode == "paxos" else "dedicated")
    allowed = kinds_for(log, standby=standby)
    chosen = allowed if kinds is None else tuple(k.strip() for k in kinds.split(",")
                                                 if k.strip())
    unknown = sorted(set(chosen) - set(ALL_KINDS))
    misfits = sorted(set(chosen) - set(allowed) - set(unknown))
    if unknown or misfits or not chosen:
        why = ("need --standby" if not standby and set(misfits) <= set(FAILOVER) else
               "need --log paxos" if set(misfits) <= set(PAXOS_ONLY) else
               f"do not apply with --log {log}")
        problem = (f"unknown fault kinds {unknown}" if unknown or not chosen else
                   f"fault kinds {misfits} {why}")
        raise click.BadParameter(f"{problem}; with --log {log} choose from "
                                 f"{', '.join(allowed)}", param_hint="--kinds")
    options = TortureOptions(
        seconds=total or 60.0,
        seed=seed,
        clients=clients,
        threads=threads,
        participants=int(participants),
        log=log,
        daemons=daemons,
        kinds=chosen,
        workload="hot" if workload == "hot" else "bank",
        deadline=deadline,
        pooler="session" if pooler == "session" else
               "transaction" if pooler == "transaction" else "none",
        standby=standby,
        workdir=workdir,
        keep=workdir is not None,
    )
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    report = run_torture(options, echo=lambda line: click.echo(line, err=True))
    click.echo(report.text())
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    return 0 if report.ok else 1


@click.command("torture")
@torture_options
def _command(**kwargs: Any) -> None:
    raise SystemExit(run_from_options(**kwargs))


def torture_main() -> int:
    """``python -m txmgr.torture``."""
    try:
        _command.main(prog_name="python -m txmgr.torture", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0

"""``txmgr status``: what is prepared on every participant, and what the log says of it."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from txmgr.cli._common import config_option, load_config
from txmgr.status import StatusReport, inspect

__all__ = ["Duration", "format_age", "status_cmd"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_DURATION = re.compile(rf"({_NUMBER})([smhd])")
# Either one bare number of seconds, or number+unit parts ("1h30m").
_WHOLE = re.compile(rf"{_NUMBER}|(?:{_NUMBER}[smhd])+")


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, written as ``300``, ``90s``, ``5m``, ``1h``, ``1h30m`` or ``2d``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower().replace(" ", "")
        if not _WHOLE.fullmatch(text):
            self.fail(f"{value!r} is not a duration: write 300, 90s, 5m, 1h or 1h30m", param, ctx)
        if not text[-1].isalpha():
            return float(text)
        return sum(float(m[1]) * _UNITS[m[2]] for m in _DURATION.finditer(text))


def format_age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@click.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.option(
    "--older-than",
    type=Duration(),
    default="5m",
    show_default=True,
    help="Exit 1 when a branch was prepared longer ago than this (300, 5m, 1h, ...).",
)
def status_cmd(config_path: str | None, as_json: bool, older_than: float) -> None:
    """Every prepared branch on every participant, and the decision log's verdict.

    Exit code 0 when every server answered and no branch is older than
    --older-than, 1 otherwise (use it as a monitoring check), 2 on bad usage.
    """
    config = load_config(config_path)
    try:
        report = inspect(config)
    finally:
        if config.paxos_log is not None:  # its pools and round threads
            config.paxos_log.close()
    if as_json:
        click.echo(json.dumps(report.to_json(older_than), indent=2, default=str))
    else:
        _print_table(report, older_than)
    sys.exit(0 if report.healthy(older_than) else 1)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]


def _print_table(report: StatusReport, older_than: float) -> None:
    echo = click.echo
    if report.branches:
        rows = [
            [
                b.participant,
                b.gid,
                format_age(b.age) + (" !" if b.age > older_than else ""),
                b.decision,
                str(b.locks),
                ",".join(map(str, b.blocked_pids)) or "-",
                b.owner,
            ]
            for b in report.branches
        ]
        for line in _table(
            ["PARTICIPANT", "GID", "AGE", "DECISION", "LOCKS", "BLOCKING", "OWNER"], rows
        ):
            echo(line)
    else:
        echo("no prepared branches")
    if report.pending:
        echo("")
        echo(f"decision rows waiting for cleanup: {len(report.pending)}")
        rows = [
            [p.txid, str(p.lxid), format_age(p.age), ",".join(p.participants)]
            for p in report.pending
        ]
        for line in _table(["TXID", "LXID", "AGE", "PARTICIPANTS"], rows):
            echo("  " + line)
    if report.mode == "paxos":
        _print_paxos(report)
    if report.waits:
        _print_waits(report)
    for name, err in report.unreachable.items():
        echo(f"participant {name}: UNREACHABLE: {err}", err=True)
    if report.log_error is not None:
        echo(f"decision log: UNREACHABLE: {report.log_error}", err=True)
    stuck = report.stuck(older_than)
    echo("")
    echo(f"{len(report.branches)} prepared, {len(stuck)} older than {format_age(older_than)}")
    for hint in _hints({b.decision for b in stuck}):
        echo(f"  {hint}")


def _print_waits(report: StatusReport) -> None:
    """Who waits for whom: a global transaction by its txid, other sessions by pid."""
    echo = click.echo
    echo("")
    echo(f"lock waits: {len(report.waits)}")
    rows = [
        [
            w.waiter.removeprefix("tx "),
            f"{w.participant} (pid {w.pid})",
            w.holder.removeprefix("tx "),
            ",".join(w.relations) or "-",
            "-" if w.waited is None else format_age(w.waited),
        ]
        for w in report.waits
    ]
    for line in _table(["WAITER", "ON", "BLOCKED BY", "TABLES", "FOR"], rows):
        echo("  " + line)


def _print_paxos(report: StatusReport) -> None:
    """Per in-doubt transaction: what was learned, and each log database's slot."""
    echo = click.echo
    for t in report.paxos:
        echo("")
        echo(f"paxos transaction {t.txid}: {t.learned} ({t.detail}); "
             f"quorum {t.quorum} of {len(t.voters)} voters")
        rows = [
            [
                a.dsn,
                a.incarnation or "-",
                "yes" if a.voter else "no",
                ("DOWN: " + a.error) if a.error is not None
                else "-" if not a.has_slot else str(a.promised),
                "-" if a.accepted_ballot is None else f"{a.accepted_value}@{a.accepted_ballot}",
            ]
            for a in t.acceptors
        ]
        for line in _table(["LOG DATABASE", "INCARNATION", "VOTER", "PROMISED", "ACCEPTED"],
                           rows):
            echo("  " + line)


_HINTS = {
    "commit": "commit/abort: recovery finishes these on its next pass; is `txmgr daemon` "
    "running? (or run `txmgr recover`)",
    "in progress": "in progress: a coordinator is inside the commit protocol; the log server "
    "aborts it after [log] idle_timeout if it hangs",
    "not ours": "not ours: recovery will never touch these; finish them with "
    "`txmgr resolve GID --commit|--rollback --force` once you know their outcome",
    "undecided": "undecided: no majority of the Paxos log databases has decided yet; recovery "
    "decides once the coordinator's grace ([log] idle_timeout) is over and a majority answers",
    "unknown": "unknown: the decision log could not be read; fix that first",
}


def _hints(decisions: set[str]) -> list[str]:
    if "abort" in decisions:
        decisions = (decisions - {"abort"}) | {"commit"}
    return [text for key, text in _HINTS.items() if key in decisions]

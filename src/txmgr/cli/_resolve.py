"""``txmgr resolve``: finish one prepared branch by hand, checked against the log and audited."""

from __future__ import annotations

import sys

import click

from txmgr.cli._common import config_option, load_config
from txmgr.resolve import resolve

__all__ = ["resolve_cmd"]


@click.command("resolve")
@click.argument("gid")
@click.option("--commit", is_flag=True, help="COMMIT PREPARED the branch.")
@click.option("--rollback", is_flag=True, help="ROLLBACK PREPARED the branch.")
@click.option(
    "--force",
    is_flag=True,
    help="Needed when the log cannot decide (not a txmgr gid, another log's gid, or an xid "
    "the log cannot tell). Never overrides a decision the log has.",
)
@click.option("--participant", metavar="NAME", help="Where the branch is, if several have it.")
@click.option("--reason", metavar="TEXT", help="Why; stored in the audit row.")
@config_option
def resolve_cmd(
    gid: str,
    commit: bool,
    rollback: bool,
    force: bool,
    participant: str | None,
    reason: str | None,
    config_path: str | None,
) -> None:
    """Commit or roll back the prepared branch GID, for what recovery cannot decide.

    Refused (exit 1) when the decision log contradicts the request or says the
    transaction is still in progress; needs --force when the log has no
    decision. Every resolution is first recorded in txmgr_resolution_audit in
    the log database. Exit 0 when the branch was finished by this command.

    In Paxos mode --rollback of an undecided transaction proposes abort (refused
    if Paxos keeps an accepted commit), --commit needs a commit accepted by the
    log databases, and nothing is done without a majority of the transaction's
    log databases answering.
    """
    if commit == rollback:
        raise click.UsageError("say what to do: exactly one of --commit or --rollback")
    config = load_config(config_path)
    try:
        result = resolve(
            config, gid, commit=commit, force=force, participant=participant, reason=reason
        )
    finally:
        if config.paxos_log is not None:
            config.paxos_log.close()  # its pools and collector thread
    done = {"commit": "committed", "rollback": "rolled back"}[result.action]
    forced = " (forced)" if result.forced else ""
    detail = f" ({result.detail})" if result.detail else ""
    rows = (  # Paxos mode: a row in each log database that took it
        "audit rows " + ", ".join(f"{i} in {dsn}" for dsn, i in result.audit_rows)
        if result.audit_rows else f"audit row {result.audit_id}"
    )
    if result.outcome == "done":
        click.echo(
            f"{done} {result.gid} on {result.participant}{forced}; the log's decision was "
            f"{result.log_decision!r}{detail}; {rows}"
        )
        sys.exit(0)
    why = {
        "missing": "it was no longer prepared: another session finished it meanwhile",
        "busy": "another session is finishing it right now",
    }[result.outcome]
    click.echo(
        f"did not finish {result.gid} on {result.participant}: {why}; {rows} "
        f"record{'s' if not result.audit_rows else ''} the attempt; check with `txmgr status`",
        err=True,
    )
    sys.exit(1)

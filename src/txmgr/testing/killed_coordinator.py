"""A coordinator process that kills itself (SIGKILL) at a chosen protocol step.

Crash tests and ``txmgr demo`` run it as a subprocess to prove that recovery
finishes whatever a dead coordinator leaves prepared::

    python -m txmgr.testing.killed_coordinator SPEC_JSON

``SPEC_JSON`` is a JSON object: ``participants`` (name -> DSN), ``log`` (DSN,
participant name, or ``{"paxos": [DSN, …]}`` for a Paxos log), ``statements``
(name -> list of SQL strings run in that participant's branch) and
``kill_at``, one of:

- ``after_vote``: before anything is prepared;
- ``after_prepare``: right after the first branch is prepared (others may
  or may not be);
- ``before_decision``: every branch prepared, decision not committed;
- ``after_decision``: decision committed, no branch committed;
- ``after_commit_prepared``: after exactly one branch is committed (the kill
  falls between COMMIT PREPAREDs); ``commits`` (default 1) lets that many
  branches commit first.

Instead of ``kill_at``, ``failpoint`` names a point of :mod:`txmgr.failpoints`
where the process ends with ``os._exit`` (exit status
:data:`txmgr.failpoints.CRASH_EXIT`).

It prints ``TXID <txid>`` before committing, so the caller knows which
transaction to look for, and again after the vote if the txid changed (in
Paxos mode a transaction takes its registered txid then): the last one
counts. If it survives (bad ``kill_at``), it exits 3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from txmgr import failpoints
from txmgr.hooks import Hooks
from txmgr.manager import TransactionManager
from txmgr.paxos import PaxosLog

__all__ = ["KILL_POINTS", "KillingHooks", "main"]

KILL_POINTS = (
    "after_vote",
    "after_prepare",
    "before_decision",
    "after_decision",
    "after_commit_prepared",
)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class TxidPrinter(Hooks):
    """Prints ``TXID <txid>`` after the vote when commit() gave the transaction
    its final txid (Paxos mode)."""

    def __init__(self) -> None:
        self.printed: str | None = None

    def after_vote(self, txid: str, writers: list[str]) -> None:
        if txid != self.printed:
            self.printed = txid
            print(f"TXID {txid}", flush=True)


class KillingHooks(TxidPrinter):
    """Hooks that SIGKILL the process at ``point``.

    ``participants`` (name -> DSN) lets ``after_commit_prepared`` land exactly
    between two COMMIT PREPAREDs: the coordinator sends them all at once, so
    the hook lets the first ``commits`` go, then, before the next one is sent,
    waits until those branches are committed on their servers and dies.
    """

    def __init__(self, point: str, participants: dict[str, str] | None = None, *,
                 commits: int = 1) -> None:
        if point not in KILL_POINTS:
            raise ValueError(f"kill_at must be one of {KILL_POINTS}, not {point!r}")
        super().__init__()
        self.point = point
        self.participants = participants or {}
        self.commits = commits
        self._through: list[tuple[str, str]] = []  # (participant, gid) let through

    def after_vote(self, txid: str, writers: list[str]) -> None:
        super().after_vote(txid, writers)
        if self.point == "after_vote":
            _die()

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        if self.point == "after_prepare":
            _die()

    def before_decision(self, txid: str, lxid: int) -> None:
        if self.point == "before_decision":
            _die()

    def after_decision(self, txid: str, lxid: int) -> None:
        if self.point == "after_decision":
            _die()

    def before_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        if self.point != "after_commit_prepared":
            return
        if len(self._through) < self.commits:
            self._through.append((participant, gid))
            return
        for name, through in self._through:
            _wait_until_gone(self.participants[name], through)
        _die()

    def after_commit_prepared(self, txid: str, participant: str, gid: str) -> None:
        if self.point == "after_commit_prepared" and len(self._through) >= self.commits:
            _die()


def _wait_until_gone(dsn: str, gid: str, timeout: float = 30.0) -> None:
    """Wait for a condition (the gid committed), not for a fixed time."""
    import time

    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", (gid,)
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.01)
    raise RuntimeError(f"{gid} was never committed")


def run(spec: dict[str, Any]) -> None:
    hooks: TxidPrinter
    if "failpoint" in spec:
        failpoints.enable(spec["failpoint"], "crash")
        hooks = TxidPrinter()
    else:
        hooks = KillingHooks(spec["kill_at"], spec["participants"],
                             commits=int(spec.get("commits", 1)))
    log = spec["log"]
    if isinstance(log, dict):
        # connect_timeout: how long a log database that refuses connections holds up
        # registration (tests cutting one off need not wait PaxosLog's default).
        log = (PaxosLog(log["paxos"], connect_timeout=float(log["connect_timeout"]))
               if "connect_timeout" in log else PaxosLog(log["paxos"]))
    tm = TransactionManager(spec["participants"], log, pool_min_size=0, hooks=hooks)
    with tm.transaction() as tx:
        print(f"TXID {tx.txid}", flush=True)
        hooks.printed = tx.txid
        for name, statements in spec["statements"].items():
            for stmt in statements:
                tx.connection(name).execute(stmt)
    tm.close()


def main(argv: list[str] | None = None) -> None:
    """Run the coordinator described by the one SPEC_JSON argument (see the module doc)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m txmgr.testing.killed_coordinator SPEC_JSON")
    run(json.loads(args[0]))
    sys.exit(3)  # still alive: the kill point was never reached


if __name__ == "__main__":
    main()

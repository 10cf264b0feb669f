"""Test support: a "bank" of participant databases on the harness's real servers.

Every participant database holds ``accounts(id, balance)`` with ACCOUNTS rows of
START each, so that atomicity is checked as "money is neither lost nor created".
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

import txmgr

ACCOUNTS = 4
START = 1000


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@dataclass
class Bank:
    dsns: dict[str, str]
    log: str  # a DSN, or the name of the participant holding the log
    managers: list[txmgr.TransactionManager] = field(default_factory=list)

    @property
    def log_dsn(self) -> str:
        return self.dsns.get(self.log, self.log)

    def config(self) -> txmgr.Config:
        return txmgr.Config(participants=self.dsns, log=self.log)

    def manager(self, **kwargs: Any) -> txmgr.TransactionManager:
        tm = txmgr.TransactionManager(self.dsns, self.log, **kwargs)
        self.managers.append(tm)
        return tm

    def balance(self, name: str, account: int = 1) -> int:
        return int(query(self.dsns[name], "SELECT balance FROM accounts WHERE id = %s",
                         (account,))[0][0])

    def total(self) -> int:
        return sum(int(query(d, "SELECT sum(balance) FROM accounts")[0][0])
                   for d in self.dsns.values())

    @property
    def expected_total(self) -> int:
        return len(self.dsns) * ACCOUNTS * START

    def prepared(self, name: str | None = None) -> list[str]:
        """txmgr gids prepared in the participant databases (all of them by default)."""
        names = [name] if name else list(self.dsns)
        return sorted(
            r[0]
            for n in names
            for r in query(
                self.dsns[n],
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                "AND gid LIKE 'txm1\\_%%'",
            )
        )

    def decisions(self) -> list[str]:
        return [r[0] for r in query(self.log_dsn, "SELECT txid FROM txmgr_decision")]

    def kill_coordinator(self, kill_at: str, statements: dict[str, list[str]]) -> str:
        """Run a coordinator subprocess that SIGKILLs itself at ``kill_at``; its txid."""
        spec = {"participants": self.dsns, "log": self.log, "statements": statements,
                "kill_at": kill_at}
        return run_coordinator(KILLED_COORDINATOR, spec, exit_code=-9)

    def crash_at(self, failpoint: str, statements: dict[str, list[str]]) -> str:
        """Run a coordinator subprocess that a ``crash`` failpoint ends; its txid."""
        from txmgr.failpoints import CRASH_EXIT

        spec = {"participants": self.dsns, "log": self.log, "statements": statements,
                "failpoint": failpoint}
        return run_coordinator(KILLED_COORDINATOR, spec, exit_code=CRASH_EXIT)

    def close(self) -> None:
        for tm in self.managers:
            tm.close()


KILLED_COORDINATOR = ["-m", "txmgr.testing.killed_coordinator"]


def run_coordinator(
    args: list[str], spec: dict[str, Any], *, exit_code: int, timeout: float = 60
) -> str:
    """Run ``python ARGS SPEC_JSON``, a coordinator that must end with ``exit_code``
    (-9: SIGKILL) after printing ``TXID <txid>``; that txid (the last one printed:
    in Paxos mode commit() gives the transaction its registered txid)."""
    proc = subprocess.run(
        [sys.executable, *args, json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    txids = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("TXID ")]
    assert txids, proc.stdout
    return txids[-1]


def transfer(amount: int, src: str, dst: str, account: int = 1) -> dict[str, list[str]]:
    return {
        src: [f"UPDATE accounts SET balance = balance - {amount} WHERE id = {account}"],
        dst: [f"UPDATE accounts SET balance = balance + {amount} WHERE id = {account}"],
    }


MakeBank = Callable[..., Bank]


def own_server(**settings: Any) -> Any:
    """A private PgServer with special settings; skips the test when
    TXMGR_TEST_DSNS asks for existing servers only."""
    import os

    import pytest

    from txmgr.testing import PgServer

    if os.environ.get("TXMGR_TEST_DSNS", "").strip():
        pytest.skip("needs a server of its own with special settings; "
                    "TXMGR_TEST_DSNS asks for existing servers only")
    return PgServer(**settings)


class RecoveryLoop:
    """Recovery passes back to back on a thread while the ``with`` block runs."""

    def __init__(self, config: txmgr.Config) -> None:
        import threading

        self.config = config
        self.reports: list[txmgr.RecoveryReport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        recoverer = txmgr.Recoverer(self.config)
        try:
            while not self._stop.is_set():
                self.reports.append(recoverer.run_pass())
        finally:
            recoverer.close()

    def __enter__(self) -> RecoveryLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

"""Helpers shared by the operations tests (daemon, status, resolve, metrics, roles).

Their fixtures are in ``ops_fixtures.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from txmgr import log as decision_log
from txmgr._gid import Gid, new_txid
from txmgr._leader import lock_key
from txmgr.config import Config
from txmgr.testing import Server

T = TypeVar("T")

KV_TABLE = "CREATE TABLE kv (k text PRIMARY KEY, v int NOT NULL)"


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def query(dsn: str, sql: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def write_config(
    path: Path,
    participants: dict[str, str],
    log: str,
    *,
    interval: float | None = None,
    metrics_port: int | None = None,
) -> Path:
    lines = ["[log]", f"dsn = {json.dumps(log)}", "", "[participants]"]
    lines += [f"{name} = {json.dumps(dsn)}" for name, dsn in participants.items()]
    lines += ["", "[pool]", "connect_timeout = 3"]
    if interval is not None:
        lines += ["", "[recovery]", f"interval = {interval}"]
    if metrics_port is not None:
        lines += ["", "[metrics]", f"port = {metrics_port}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Cluster:
    servers: list[Server]
    participants: dict[str, str]  # name -> superuser DSN
    log: str
    tmp: Path
    logid: str = ""
    config_path: Path = field(default=Path())

    @property
    def config(self) -> Config:
        return Config.from_file(self.config_path)

    def prepared(self, name: str) -> list[str]:
        """gids prepared in participant ``name``'s database."""
        rows = query(
            self.participants[name],
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY 1",
        )
        return [r[0] for r in rows]

    def all_prepared(self) -> dict[str, list[str]]:
        return {name: self.prepared(name) for name in self.participants}

    def decision_count(self) -> int:
        return int(query(self.log, "SELECT count(*) FROM txmgr_decision")[0][0])

    def kv(self, name: str) -> dict[str, int]:
        return {k: v for k, v in query(self.participants[name], "SELECT k, v FROM kv")}

    def kill_coordinator(
        self,
        kill_at: str,
        statements: dict[str, list[str]],
        *,
        participants: dict[str, str] | None = None,
        log: str | None = None,
    ) -> str:
        """Run a coordinator that SIGKILLs itself at ``kill_at``; return its txid."""
        spec = {
            "participants": participants or self.participants,
            "log": log or self.log,
            "statements": statements,
            "kill_at": kill_at,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "txmgr.testing.killed_coordinator", json.dumps(spec)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("TXID "))
        return line.split()[1]

    def transfer(self, kill_at: str, key: str, value: int = 1) -> str:
        """A killed two-participant insert of ``key`` into both kv tables."""
        stmt = f"INSERT INTO kv VALUES ('{key}', {value})"
        return self.kill_coordinator(kill_at, {"orders": [stmt], "billing": [stmt]})

    def our_branch(
        self, name: str, decision: str, statements: list[str] | None = None
    ) -> tuple[str, psycopg.Connection[Any] | None]:
        """Prepare a txmgr branch on ``name`` whose decision transaction is committed,
        rolled back or left open ("commit", "abort", "in progress"); returns
        (gid, the open log connection for "in progress", else None)."""
        txid = new_txid()
        lconn = psycopg.connect(self.log)
        lxid = decision_log.open_decision(lconn, txid, [name], idle_timeout=600)
        gid = str(Gid(self.logid, txid, lxid, name))
        prepare_branch(self.participants[name], gid, statements or [])
        if decision == "commit":
            lconn.commit()
        elif decision == "abort":
            lconn.rollback()
        if decision == "in progress":
            return gid, lconn
        lconn.close()
        return gid, None

    def lock_holder(self) -> str | None:
        """application_name of the session holding the daemons' recovery lock."""
        key = lock_key(self.logid)
        rows = query(
            self.log,
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = %s "
            "AND l.objid::bigint = %s AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        )
        return rows[0][0] if rows else None


def prepare_branch(dsn: str, gid: str, statements: list[str]) -> None:
    """PREPARE TRANSACTION ``gid`` after ``statements`` (default: insert a random kv row)."""
    with psycopg.connect(dsn) as conn:
        for stmt in statements:
            conn.execute(stmt)
        if not statements:
            conn.execute("INSERT INTO kv VALUES (%s, 0)", (secrets.token_hex(6),))
        conn.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(psycopg.sql.Literal(gid)))


# -- daemon subprocesses ------------------------------------------------------


class DaemonProcess:
    """``python -m txmgr.cli daemon`` with JSON logs in a file, metrics on a free port."""

    def __init__(self, config: Path, log_file: Path, *args: str, interval: float = 0.3) -> None:
        self.log_file = log_file
        self._stderr = open(log_file, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "txmgr.cli", "daemon", "--config", str(config),
             "--interval", str(interval), "--log-format", "json", "--metrics-port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
        )  # fmt: skip
        self.identity_prefix = f"txmgr-daemon {self.proc.pid}@"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"message": line, "level": "raw"})
        return out

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]  # fmt: skip

    def wait_event(self, event: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not self.find(event, **match):
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.log_file.read_text()}"
                )
            hits = self.find(event, **match)
            return hits[-1] if hits else None

        return wait_for(found, timeout, f"daemon event {event!r} {match}")

    @property
    def metrics_port(self) -> int:
        return int(self.wait_event("metrics")["metrics_port"])

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return parse_metrics(text)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def running_as_root() -> bool:
    return os.geteuid() == 0


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``txmgr ARGS`` in-process through the real entry point: (exit code, out, err)."""
    from unittest import mock

    from txmgr.cli import main

    code = 0
    with mock.patch.object(sys, "argv", ["txmgr", *args]):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err

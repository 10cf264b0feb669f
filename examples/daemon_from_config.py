"""Run the recovery daemon from a configuration file, and watch it finish a crashed commit.

    python examples/daemon_from_config.py

1. Writes a ``txmgr.toml`` for the example's databases (``$ORDERS_DSN``,
   ``$BILLING_DSN``, ``$TXLOG_DSN``, else throwaway servers: see ``_servers.py``).
2. Runs a coordinator process that is killed (SIGKILL) right after its commit
   decision: both branches of its transfer stay prepared, holding their locks.
3. Starts ``txmgr daemon --config txmgr.toml``, reads its JSON log until its first
   recovery pass is done, then stops it with SIGTERM (it exits 0).
4. Shows that the daemon committed both branches: the money moved.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import tempfile

import psycopg
from _servers import ExampleDatabases, balances, create_accounts, example_databases, masked


def write_config(db: ExampleDatabases, directory: pathlib.Path) -> pathlib.Path:
    """The same TOML file the library, the CLI and the daemon read."""
    log = f'participant = "{db.log}"' if db.log in db.participants else f'dsn = "{db.log}"'
    lines = ["[log]", log, "", "[participants]"]
    lines += [f'{name} = "{dsn}"' for name, dsn in db.participants.items()]
    lines += ["", "[recovery]", "interval = 5"]
    path = directory / "txmgr.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # DSNs may carry passwords
    return path


def crash_after_decision(db: ExampleDatabases, amount: int) -> None:
    """A coordinator moving ``amount`` dies between its decision and COMMIT PREPARED."""
    spec = {
        "participants": db.participants,
        "log": db.log,
        "statements": {
            "orders": [f"UPDATE example_accounts SET balance = balance - {amount} WHERE id = 1"],
            "billing": [f"UPDATE example_accounts SET balance = balance + {amount} WHERE id = 1"],
        },
        "kill_at": "after_decision",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "txmgr.testing.killed_coordinator", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != -signal.SIGKILL:
        sys.exit(f"the coordinator was to be killed, but exited {proc.returncode}: {proc.stderr}")


def prepared(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT gid FROM pg_prepared_xacts "
                            "WHERE database = current_database()").fetchall()
    return [gid for (gid,) in rows]


def run_daemon_one_pass(config: pathlib.Path) -> bool:
    """Start ``txmgr daemon``, stop it after its first recovery pass; True if all went well."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "txmgr.cli", "daemon", "--config", str(config),
         "--log-format", "json", "--log-level", "debug"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert daemon.stderr is not None
    ok = True
    for line in daemon.stderr:  # one JSON object per line, until the daemon exits
        try:
            record = json.loads(line)
        except ValueError:
            print("  daemon:", line.rstrip())
            continue
        event = record.get("event")
        if event in ("started", "active", "pass", "stopped") or "outcome" in record:
            print("  daemon:", record["message"])
        if event == "pass":  # the first pass is done: SIGTERM ends the daemon cleanly
            daemon.send_signal(signal.SIGTERM)
        elif event in ("standby", "log_unreachable", "error"):
            print("  daemon:", record["message"])
            ok = False  # another daemon is active, or the log is down: give up
            daemon.send_signal(signal.SIGTERM)
    code = daemon.wait()
    print("daemon exit code:", code)
    return ok and code == 0


def main() -> None:
    with example_databases() as db, tempfile.TemporaryDirectory() as tmp:
        for dsn in db.participants.values():
            create_accounts(dsn, {1: 100})
        config = write_config(db, pathlib.Path(tmp))
        print(f"wrote {config.name}:\n{masked(config.read_text())}")

        crash_after_decision(db, 40)
        for name, dsn in db.participants.items():
            print(f"prepared on {name} after the crash:", prepared(dsn))

        print(f"$ txmgr daemon --config {config.name} --log-format json")
        ok = run_daemon_one_pass(config)

        for name, dsn in db.participants.items():
            print(f"{name}: prepared {prepared(dsn)}, balance {balances(dsn)[1]}")
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()

"""The `txmgr` command line, run as a real subprocess against real servers."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import psycopg

from support import START, Bank, transfer


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txmgr.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def config_file(tmp_path: pathlib.Path, participants: dict[str, str], log: str) -> str:
    lines = ["[log]", f'dsn = "{log}"', "", "[participants]"]
    lines += [f'{name} = "{dsn}"' for name, dsn in participants.items()]
    path = tmp_path / "txmgr.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_migrate_is_idempotent(tmp_path: pathlib.Path, make_database: object) -> None:
    log = make_database()  # type: ignore[operator]
    cfg = config_file(tmp_path, {"a": log}, log)
    first = run("migrate", "--config", cfg)
    assert first.returncode == 0, first.stderr
    from txmgr._migrate import head_revision

    assert f"migrated from empty to {head_revision()}" in first.stdout
    second = run("migrate", "--config", cfg)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert "****" in first.stdout  # the DSN is shown masked
    password = psycopg.conninfo.conninfo_to_dict(log).get("password")
    assert not password or str(password) not in first.stdout


def test_recover_finishes_a_killed_coordinator(tmp_path: pathlib.Path, bank: Bank) -> None:
    bank.kill_coordinator("after_decision", transfer(70, "a", "b"))
    cfg = config_file(tmp_path, bank.dsns, bank.log)
    proc = run("recover", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("committed=2 rolled_back=0")
    assert (bank.balance("a"), bank.balance("b")) == (START - 70, START + 70)


def test_recover_exit_code_when_a_participant_is_down(tmp_path: pathlib.Path, bank: Bank) -> None:
    dsns = dict(bank.dsns, c="postgresql://app:hunter2@127.0.0.1:9/c")
    proc = run("recover", "--config", config_file(tmp_path, dsns, bank.log))
    assert proc.returncode == 1
    assert "errors=1" in proc.stdout
    assert "hunter2" not in proc.stdout + proc.stderr


def test_config_error_exit_code(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[log]\n")
    proc = run("recover", "--config", str(path))
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr


def test_missing_config(monkeypatch: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "txmgr.cli", "recover"], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "TXMGR_CONFIG" in proc.stderr

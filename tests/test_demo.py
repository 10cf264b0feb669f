"""`txmgr demo` end to end: it must finish, and its totals must match."""

from __future__ import annotations

import os

import pytest

from txmgr._demo import run_demo


@pytest.mark.skipif(
    bool(os.environ.get("TXMGR_TEST_DSNS", "").strip()),
    reason="the demo starts servers of its own; TXMGR_TEST_DSNS asks for existing ones only",
)
def test_demo_finishes_and_the_totals_match() -> None:
    lines: list[str] = []
    # More threads than the README's default make a lock-order deadlock likely.
    assert run_demo(transfers=400, threads=8, echo=lines.append), lines
    assert lines[-1].startswith("totals match")


def test_demo_without_server_binaries_says_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no server binaries exist at all (no package, no TXMGR_PG_BIN, no
    txmgr[embedded]), `txmgr demo` exits 1 with the three ways to get them, as an
    expected condition, not as a bug ("unexpected …")."""
    from click.testing import CliRunner

    from txmgr.cli import cli
    from txmgr.testing import _binaries

    for finder in ("_from_env", "_from_pg_config", "_from_debian_layout", "_from_pgserver"):
        monkeypatch.setattr(_binaries, finder, lambda: None)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 1, result.output
    assert "txmgr demo: PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found" \
        in result.output
    assert "txmgr[embedded]" in result.output
    assert "unexpected" not in result.output

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

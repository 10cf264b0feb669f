"""``python -m txmgr.paxos.sim --schedules N --seed S``: run the Paxos commit simulation.

Runs N random schedules (seeds S, S+1, …; see :mod:`txmgr.paxos._sim`) and
stops at the first broken invariant, printing its seed and last events; rerun
with ``--schedules 1 --seed <that seed>`` to replay it exactly. Exit status 0
when every schedule passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

from txmgr.paxos._sim import Simulation, SimulationFailed, run_many

__all__ = ["Simulation", "SimulationFailed", "main", "run_many"]


def main(argv: list[str] | None = None) -> int:
    """Run the simulation from the command line; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m txmgr.paxos.sim", description=__doc__)
    parser.add_argument("--schedules", type=int, default=1000, help="how many (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        stats = run_many(args.schedules, args.seed)
    except SimulationFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    took = time.monotonic() - start
    print(
        f"{stats.schedules} schedules passed in {took:.1f}s (seeds {args.seed}.."
        f"{args.seed + args.schedules - 1}): {stats.events} events, {stats.commits} "
        f"transactions committed, {stats.aborts} aborted, {stats.preemptions} preempted "
        f"decisions, {stats.undecided_after_healing} left in doubt by wiped voters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

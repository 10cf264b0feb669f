"""Results: the table, the ratios, the issue's goals, JSON, and the comparison of two runs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "txmgr-benchmark/1"


@dataclass
class Result:
    """One contender in one configuration, over all its rounds."""

    contender: str
    participants: int
    clients: int
    seconds: float = 0.0  # measured wall time, summed over rounds
    committed: int = 0  # transactions that started inside the measured window
    committed_total: int = 0  # every transaction committed, warm-ups included
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed checks (see _workload.check)
    latencies: list[float] = field(default_factory=list)  # seconds, one per transaction

    @property
    def tps(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the latencies, in milliseconds (0 without data)."""
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        del out["latencies"]
        out.update(
            tps=round(self.tps, 1),
            p50_ms=round(self.percentile(0.50), 3),
            p99_ms=round(self.percentile(0.99), 3),
            mean_ms=round(statistics.fmean(self.latencies) * 1000, 3) if self.latencies else 0.0,
        )
        return out


Key = tuple[int, int, str]  # participants, clients, contender


def by_key(results: Iterable[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    return {(r["participants"], r["clients"], r["contender"]): r for r in results}


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every contender's throughput and p50 against every other one of its configuration."""
    out = []
    for r in results:
        for o in results:
            same = (o["participants"], o["clients"]) == (r["participants"], r["clients"])
            if not same or o is r or not o["tps"] or not o["p50_ms"]:
                continue
            out.append({
                "participants": r["participants"], "clients": r["clients"],
                "contender": r["contender"], "versus": o["contender"],
                "tps_ratio": round(r["tps"] / o["tps"], 3),
                "p50_ratio": round(r["p50_ms"] / o["p50_ms"], 3),
            })
    return out


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals that this run measured, each with its number and verdict."""
    res = by_key(results)
    out: list[dict[str, Any]] = []

    def ratio(goal: str, key: Key, other: Key, target: float, *, metric: str = "tps",
              at_most: bool = False) -> None:
        a, b = res.get(key), res.get(other)
        if a is None or b is None or not b[metric]:
            return
        value = a[metric] / b[metric]
        out.append({
            "goal": goal, "participants": key[0], "clients": key[1],
            "value": round(value, 3), "target": target,
            "met": value <= target if at_most else value >= target,
        })

    participant_counts = sorted({k[0] for k in res})
    client_counts = sorted({k[1] for k in res})
    ratio("txmgr-inlog tx/s >= 0.6 x plain", (2, 8, "txmgr-inlog"), (2, 8, "plain"), 0.6)
    for p in participant_counts:
        for c in client_counts:
            ratio("txmgr-inlog tx/s >= 1.25 x sqla-2pc", (p, c, "txmgr-inlog"),
                  (p, c, "sqla-2pc"), 1.25)
            ratio("txmgr-log tx/s >= 1.0 x sqla-2pc", (p, c, "txmgr-log"),
                  (p, c, "sqla-2pc"), 1.0)
    for name in ("txmgr-log", "txmgr-inlog"):
        ratio(f"{name} p50 <= 1.1 x 2pc-par", (3, 1, name), (3, 1, "2pc-par"), 1.1,
              metric="p50_ms", at_most=True)
    # Issue 7, Paxos mode: on the servers of txmgr-log (_servers.PAXOS_PLACEMENT).
    for p in participant_counts:
        ratio("txmgr-paxos tx/s >= 0.8 x txmgr-log", (p, 8, "txmgr-paxos"),
              (p, 8, "txmgr-log"), 0.8)
        for c in client_counts:
            ratio("txmgr-paxos-1down tx/s >= 0.7 x txmgr-paxos", (p, c, "txmgr-paxos-1down"),
                  (p, c, "txmgr-paxos"), 0.7)
    return out


#: The ratios shown apart for Paxos mode (each configuration): this / that.
PAXOS_PAIRS = (("txmgr-paxos", "txmgr-log"), ("txmgr-paxos-1down", "txmgr-paxos"))


def table(results: list[dict[str, Any]]) -> str:
    """One block per configuration: tx/s, p50, p99, and tx/s divided by each column's."""
    lines: list[str] = []
    configs = sorted({(r["participants"], r["clients"]) for r in results})
    for p, c in configs:
        rows = [r for r in results if (r["participants"], r["clients"]) == (p, c)]
        names = [r["contender"] for r in rows]
        width = max(len(n) for n in names) + 1
        lines.append(f"{p} participants, {c} client{'s' if c > 1 else ''} "
                     f"(ratio columns: this row's tx/s / that contender's tx/s)")
        head = f"  {'contender':<{width}}{'tx/s':>8}{'p50 ms':>9}{'p99 ms':>9}  "
        head += "".join(f"{'/' + n:>{max(9, len(n) + 2)}}" for n in names)
        lines.append(head)
        for r in rows:
            line = (f"  {r['contender']:<{width}}{r['tps']:>8.0f}{r['p50_ms']:>9.2f}"
                    f"{r['p99_ms']:>9.2f}  ")
            for o in rows:
                cell = f"{r['tps'] / o['tps']:.2f}" if o["tps"] else "-"
                line += f"{cell:>{max(9, len(o['contender']) + 2)}}"
            flags = []
            if r["errors"]:
                flags.append(f"{r['errors']} errors")
            if r["problems"]:
                flags.append("CHECK FAILED")
            lines.append(line + ("  " + ", ".join(flags) if flags else ""))
        lines.append("")
    return "\n".join(lines)


def goals_text(goal_rows: list[dict[str, Any]]) -> str:
    lines = ["goals (issues 6 and 7):"]
    width = max((len(g["goal"]) for g in goal_rows), default=0)
    for g in goal_rows:
        verdict = "met" if g["met"] else "NOT met"
        lines.append(f"  {g['goal']:<{width}} {g['participants']}p {g['clients']:>2}c: "
                     f"{g['value']:.3f} (target {g['target']})  {verdict}")
    return "\n".join(lines)


def paxos_text(results: list[dict[str, Any]]) -> str:
    """Paxos mode against the default mode, and with one log database down, per
    configuration (empty when the run had no Paxos contender)."""
    res = by_key(results)
    lines = []
    for p, c in sorted({(r["participants"], r["clients"]) for r in results}):
        for name, versus in PAXOS_PAIRS:
            a, b = res.get((p, c, name)), res.get((p, c, versus))
            if a is None or b is None or not b["tps"] or not b["p50_ms"]:
                continue
            lines.append(f"  {p}p {c:>2}c  {name + ' / ' + versus:<34} "
                         f"tx/s {a['tps'] / b['tps']:.2f}  p50 {a['p50_ms'] / b['p50_ms']:.2f}")
    return "\n".join(["Paxos mode (this / that):", *lines]) if lines else ""


def compare_text(new: list[dict[str, Any]], old_path: Path) -> str:
    """tx/s and p50 of this run against an earlier JSON file, row by row."""
    old = by_key(json.loads(old_path.read_text())["results"])
    lines = [f"compared with {old_path} (this run / that run):"]
    for key, r in by_key(new).items():
        o = old.get(key)
        if o is None or not o["tps"] or not o["p50_ms"]:
            continue
        lines.append(f"  {key[0]}p {key[1]:>2}c {key[2]:<12} tx/s {r['tps'] / o['tps']:5.2f}  "
                     f"p50 {r['p50_ms'] / o['p50_ms']:5.2f}")
    return "\n".join(lines)


def document(results: list[dict[str, Any]], settings: dict[str, Any],
             environment: dict[str, Any]) -> dict[str, Any]:
    """The JSON output: everything needed to compare two runs."""
    return {
        "format": FORMAT,
        "settings": settings,
        "environment": environment,
        "results": results,
        "ratios": ratios(results),
        "goals": goals(results),
    }

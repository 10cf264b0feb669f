"""What a torture run is asked to do (:class:`TortureOptions`) and what it found
(:class:`TortureReport`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from txmgr.torture._checker import KNOWN_ISSUES, CheckReport
from txmgr.torture._kinds import kinds_for

__all__ = ["TortureOptions", "TortureReport"]


@dataclass(frozen=True)
class TortureOptions:
    """What to run; the defaults are the CI version's."""

    seconds: float = 60.0
    seed: int | None = None  # None: a random seed, reported
    clients: int = 4
    # Transfers each client runs at once on its one manager; None: 2 in Paxos
    # mode (their commits share accept rounds, which faults then hit), else 1.
    threads: int | None = None
    participants: int = 2
    log: Literal["dedicated", "participant", "paxos"] = "dedicated"
    accounts: int = 10
    daemons: int = 2
    daemon_interval: float = 0.5  # often: recovery races the live coordinators
    log_idle_timeout: float = 5.0  # short, so that failpoint sleeps outlast it
    lock_timeout_ms: int = 2000  # a branch waiting on an in-doubt one gives up
    kinds: tuple[str, ...] = ()  # (): every kind of the log mode (see _kinds.kinds_for)
    workdir: Path | None = None  # None: a temporary directory, removed after a clean run
    keep: bool = False  # keep the work directory even after a clean run
    settle_timeout: float = 120.0  # final recovery gives up after this long
    # "hot": few hot accounts, legs in random order, deadline, retries (_hot.py)
    workload: Literal["bank", "hot"] = "bank"
    deadline: float = 3.0  # hot: each attempt's tm.transaction(timeout=)
    deadlock_interval: float = 0.5  # the daemons' [deadlock] interval
    # "session" / "transaction": clients and daemons reach every server through a
    # real PgBouncer in that pool mode (in front of the fault proxy); "none": direct.
    pooler: Literal["none", "session", "transaction"] = "none"
    # Every server gets a synchronous hot standby; the failover faults promote it
    # (single-log modes, direct connections: see _failover.py).
    standby: bool = False

    def __post_init__(self) -> None:
        if self.participants not in (2, 3):
            raise ValueError("participants must be 2 or 3")
        if self.clients < 1 or self.daemons < 1 or self.accounts < 1:
            raise ValueError("clients, daemons and accounts must be at least 1")
        if self.threads is None:
            object.__setattr__(self, "threads", 2 if self.log == "paxos" else 1)
        elif self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.log not in ("dedicated", "participant", "paxos"):
            raise ValueError("log must be 'dedicated', 'participant' or 'paxos'")
        if self.pooler not in ("none", "session", "transaction"):
            raise ValueError("pooler must be 'none', 'session' or 'transaction' "
                             "(statement pooling is refused by txmgr)")
        if self.workload not in ("bank", "hot"):
            raise ValueError("workload must be 'bank' or 'hot'")
        if not self.seconds > 0:
            raise ValueError("seconds must be positive")
        if self.standby and (self.log == "paxos" or self.pooler != "none"):
            raise ValueError("standby applies to the single-log modes, without a pooler")
        allowed = kinds_for(self.log, standby=self.standby)
        if not self.kinds:
            object.__setattr__(self, "kinds", allowed)  # frozen: set once, here
        misfits = sorted(set(self.kinds) - set(allowed))
        if misfits:
            raise ValueError(f"fault kinds {misfits} do not apply with log={self.log!r}; "
                             f"choose from {', '.join(allowed)}")


@dataclass
class TortureReport:
    seed: int
    options: TortureOptions
    duration: float  # whole run, seconds
    nemesis_seconds: float
    injected: Counter[str]
    effective: Counter[str]
    check: CheckReport
    client_exits: Counter[str]
    daemon_exits: Counter[str]
    clients_killed_at_stop: int
    settle_passes: int
    harness_errors: list[str] = field(default_factory=list)
    workdir: str | None = None
    observations: Counter[str] = field(default_factory=Counter)  # see Nemesis.observations
    acceptor_reads: int = 0  # Paxos mode: log database reads of the decision sampler

    @property
    def ok(self) -> bool:
        """The run passed: no violation, no leftover."""
        return self.check.ok and not self.harness_errors

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the ``--json`` output)."""
        opts = asdict(self.options)
        opts["workdir"] = str(self.options.workdir) if self.options.workdir else None
        return {
            "ok": self.ok,
            "seed": self.seed,
            "options": opts,
            "duration": round(self.duration, 1),
            "nemesis_seconds": round(self.nemesis_seconds, 1),
            "faults": {k: {"injected": self.injected[k], "effective": self.effective[k]}
                       for k in self.options.kinds},
            **self.check.as_dict(),
            "client_exits": dict(self.client_exits),
            "daemon_exits": dict(self.daemon_exits),
            "clients_killed_at_stop": self.clients_killed_at_stop,
            "settle_passes": self.settle_passes,
            "observations": dict(self.observations),
            "acceptor_reads": self.acceptor_reads,
            "harness_errors": self.harness_errors,
            "workdir": self.workdir,
        }

    def text(self) -> str:
        """The report as the text the command prints."""
        c = self.check
        lines = [
            f"torture {'PASSED' if self.ok else 'FAILED'}: seed={self.seed} "
            f"participants={self.options.participants} log={self.options.log} "
            + (f"pooler={self.options.pooler} " if self.options.pooler != "none" else "")
            + ("standby=sync " if self.options.standby else "")
            + f"clients={self.options.clients}x{self.options.threads} "
            f"nemesis={self.nemesis_seconds:.0f}s "
            f"total={self.duration:.0f}s",
            f"transfers: attempted={c.attempted} acked={c.acked} committed={c.committed} "
            f"aborted={c.aborted} unknown={c.unknown} (of which committed: "
            f"{c.unknown_committed})",
            "faults (injected/effective): " + " ".join(
                f"{k}={self.injected[k]}/{self.effective[k]}" for k in self.options.kinds),
            "errors that ended transfers: " + (" ".join(
                f"{k}={n}" for k, n in c.errors.items()) or "none"),
            *(["... caused by: " + " ".join(f"{k}={n}" for k, n in c.causes.items())]
              if c.causes else []),
            *([f"paxos decisions seen chosen in {self.acceptor_reads} acceptor reads: "
               + (" ".join(f"{k}={n}" for k, n in sorted(c.decisions_seen.items()))
                  or "none")] if self.options.log == "paxos" else []),
            *([c.waits.text()] if c.waits else []),
            *(f"observed: {k}: {n}" for k, n in self.observations.items()),
            f"violations: {sum(c.violation_counts().values())} {c.violation_counts() or ''}",
            *(f"known issue (not counted): {error} x{n}, see {KNOWN_ISSUES[error]}"
              for error, n in c.known_issues.items()),
            f"leftovers: prepared={len(c.leftovers.prepared)} "
            f"decision_rows={len(c.leftovers.decisions)}"
            + (f" paxos_slots={len(c.leftovers.slots)}" if self.options.log == "paxos"
               else ""),
            f"password scan: {c.scan.files} files + log tables, {c.scan.bytes} bytes, "
            f"{len(c.scan.hits)} hits",
            f"client exits: {dict(self.client_exits)}; daemon exits: {dict(self.daemon_exits)}",
        ]
        for v in c.violations[:20]:
            lines.append(f"  VIOLATION {v.kind}: {v.detail}")
        for gid in [*c.leftovers.prepared, *c.leftovers.decisions, *c.leftovers.slots][:20]:
            lines.append(f"  LEFTOVER {gid}")
        for err in self.harness_errors:
            lines.append(f"  HARNESS ERROR {err}")
        if self.workdir:
            lines.append(f"work directory (logs, records): {self.workdir}")
        return "\n".join(lines)

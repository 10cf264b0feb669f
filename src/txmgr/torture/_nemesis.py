"""The nemesis: a seeded schedule of faults, and the code that injects them.

:func:`schedule` is a pure function of the seed: an endless sequence of
rounds, each a shuffled list of every fault kind, so that a short run sees
every kind and the same seed replays the same faults on the same targets in
the same order (the timing of the clients around them is the machine's).

Kinds (:data:`KINDS`):

- ``kill_client`` / ``kill_daemon``: SIGKILL one client or recovery daemon;
  the supervisor starts a new one.
- ``restart_participant`` / ``restart_log``: crash the server
  (``pg_ctl stop -m immediate``), keep it down a moment, start it again.
  Every other time ``txmgr status`` runs while it is down (its output is
  scanned for the password).
- ``drop_connections``: close every connection through one proxy.
- ``drop_prepare`` / ``drop_commit_prepared`` / ``drop_log_commit``: lose the
  next ``PREPARE TRANSACTION`` / ``COMMIT PREPARED`` / decision ``COMMIT``
  through a proxy — before the server sees it, after it executed it, or
  after its reply (the next statement then fails).
- ``log_outage``: lose the next decision ``COMMIT`` (before or after the
  log ran it) and keep the log from answering whether ``L`` committed for
  longer than the coordinator waits: it must say ``OutcomeUnknown``.
- ``partition``: the next protocol statement through one proxy vanishes
  (no reply, connection open) for a while; then that proxy's connections
  are reset.
- ``failpoint_crash`` / ``failpoint_raise`` / ``failpoint_sleep``: restart one
  client with a failpoint armed at a random protocol step (the sleep may
  outlast the decision log's idle timeout).
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from txmgr import failpoints
from txmgr.testing.proxy import FaultProxy, Rule
from txmgr.torture._kinds import KINDS
from txmgr.torture._procs import ProcessGroup
from txmgr.transaction import CONFIRM_PATIENCE

__all__ = [
    "DROP_ACTIONS",
    "FAILPOINT_POINTS",
    "KINDS",
    "MAX_TRANSFERS_ENV",
    "Fault",
    "Nemesis",
    "World",
    "schedule",
]


DropAction = Literal["drop_before", "drop_after_forward", "drop_after_reply"]
DROP_ACTIONS: tuple[DropAction, ...] = ("drop_before", "drop_after_forward", "drop_after_reply")
# Points every two-phase transfer passes (before_one_phase is never reached).
FAILPOINT_POINTS = tuple(p for p in failpoints.POINTS if p != "before_one_phase")
#: environment key the nemesis uses to cap an armed client's transfers
MAX_TRANSFERS_ENV = "TXMGR_TORTURE_MAX_TRANSFERS"

_PATTERNS = {
    "drop_prepare": r"^PREPARE TRANSACTION",
    "drop_commit_prepared": r"^COMMIT PREPARED",
    "drop_log_commit": r"^COMMIT\s*;?\s*$",
    "partition": r"^(PREPARE TRANSACTION|COMMIT PREPARED|COMMIT\s*;?\s*$)",
}
_RULE_PATIENCE = 10.0  # seconds a rule may wait for its statement before it is removed


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault of the schedule. ``target`` and ``variant`` are raw draws, taken
    modulo the number of choices, so the schedule does not depend on the setup."""

    number: int
    gap: float  # quiet seconds before it
    kind: str
    target: int
    variant: int
    seconds: float  # down time, partition time, or failpoint sleep

    def pick(self, choices: Sequence[object]) -> int:
        """Index of the target this fault hits, drawn from the seeded schedule."""
        return self.target % len(choices)


def schedule(seed: int, kinds: Sequence[str] = KINDS) -> Iterator[Fault]:
    """The endless fault schedule of ``seed``: shuffled rounds of every kind."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown}; choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    number = 0
    while True:
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            yield Fault(
                number=number,
                gap=round(rng.uniform(0.3, 1.5), 3),
                kind=kind,
                target=rng.randrange(1 << 16),
                variant=rng.randrange(1 << 16),
                seconds=round(rng.uniform(0.2, 2.5), 3),
            )
            number += 1


class Server(Protocol):
    def crash(self) -> None: ...
    def restart(self) -> None: ...
    def is_running(self) -> bool: ...


@dataclass
class World:
    """What the nemesis acts on."""

    clients: ProcessGroup
    daemons: ProcessGroup
    participant_servers: list[Server]
    log_server: Server  # one of the participant servers when the log lives there
    prepare_proxies: list[FaultProxy]  # of the participants that PREPARE (not the log's)
    log_proxy: FaultProxy
    proxies: list[FaultProxy]  # every proxy, once
    daemon_config: Path  # for the CLI probes
    log_dir: Path


class Nemesis:
    """Injects the faults of :func:`schedule` until a deadline (see :meth:`run`)."""

    def __init__(
        self,
        world: World,
        seed: int,
        kinds: Sequence[str] = KINDS,
        client_effects: Callable[[], Counter[str]] = Counter,
    ) -> None:
        self.world = world
        self.seed = seed
        self.kinds = tuple(kinds)
        self.stop = threading.Event()
        self.injected: Counter[str] = Counter()  # faults applied
        self._hits: Counter[str] = Counter()  # … that hit something (a rule fired, …)
        # Failpoints fire inside the clients: only they can tell (exit status, records).
        self._client_effects = client_effects
        self.errors: list[str] = []  # the harness failed to inject (a bug of ours)
        self._probes = 0
        self._log = (world.log_dir / "nemesis.log").open("a", encoding="utf-8")

    def effective(self) -> Counter[str]:
        """Faults that hit something, by kind."""
        counts = Counter({k: n for k, n in self._hits.items() if not k.startswith("failpoint_")})
        counts.update(self._client_effects())
        return Counter({k: n for k, n in counts.items() if k in self.kinds})

    def run(self, seconds: float, overtime: float | None = None) -> None:
        """Inject faults for ``seconds``, and then on until every kind hit something
        at least once — for at most ``overtime`` more seconds (default: ``seconds``,
        at least 120)."""
        deadline = time.monotonic() + seconds
        hard_deadline = deadline + (max(seconds, 120.0) if overtime is None else overtime)
        for fault in schedule(self.seed, self.kinds):
            now = time.monotonic()
            if now >= hard_deadline:
                return
            if now >= deadline and all(self.injected[k] for k in self.kinds):
                counts = self.effective()
                if all(counts[k] for k in self.kinds):
                    return
            if self.stop.wait(fault.gap):
                return
            started = time.monotonic()
            try:
                effective, detail = self._apply(fault)
            except Exception as e:  # keep going: the run reports it and fails
                effective, detail = False, f"ERROR {type(e).__name__}: {e}"
                self.errors.append(f"fault {fault.number} {fault.kind}: {detail}")
            self.injected[fault.kind] += 1
            if effective:
                self._hits[fault.kind] += 1
            verdict = ("armed" if fault.kind.startswith("failpoint_")
                       else "hit" if effective else "miss")
            self._log.write(f"{time.strftime('%H:%M:%S')} #{fault.number} {fault.kind} "
                            f"{verdict} {detail} "
                            f"({time.monotonic() - started:.2f}s)\n")
            self._log.flush()

    def heal(self) -> None:
        """Undo what is still in effect: rules, partitions, stopped servers."""
        for proxy in self.world.proxies:
            proxy.clear_rules()
            proxy.drop_all()  # ends blackholed connections
        for server in {id(s): s for s in [*self.world.participant_servers,
                                          self.world.log_server]}.values():
            if not server.is_running():
                server.restart()
        self._log.close()

    # -- the faults -----------------------------------------------------------------

    def _apply(self, f: Fault) -> tuple[bool, str]:
        w = self.world
        if f.kind == "kill_client":
            slot = f.pick(w.clients.slots)
            return w.clients.kill(slot), f"client {slot}"
        if f.kind == "kill_daemon":
            slot = f.pick(w.daemons.slots)
            return w.daemons.kill(slot), f"daemon {slot}"
        if f.kind == "restart_participant":
            index = f.pick(w.participant_servers)
            return self._restart(w.participant_servers[index], f), f"participant {index}"
        if f.kind == "restart_log":
            return self._restart(w.log_server, f), "log server"
        if f.kind == "drop_connections":
            index = f.pick(w.proxies)
            had = w.proxies[index].connections
            w.proxies[index].drop_all()
            return had > 0, f"proxy {index} ({had} connections)"
        if f.kind in ("drop_prepare", "drop_commit_prepared"):
            index = f.pick(w.prepare_proxies)
            return self._rule(w.prepare_proxies[index], f, f"participant proxy {index}")
        if f.kind == "drop_log_commit":
            return self._rule(w.log_proxy, f, "log proxy")
        if f.kind == "log_outage":
            return self._log_outage(w.log_proxy, f)
        if f.kind == "partition":
            index = f.pick(w.proxies)
            return self._partition(w.proxies[index], f, f"proxy {index}")
        if f.kind.startswith("failpoint_"):
            return self._failpoint(f)
        raise ValueError(f"unknown fault kind {f.kind!r}")

    def _restart(self, server: Server, f: Fault) -> bool:
        if not server.is_running():
            server.restart()  # left down by an earlier failure: nothing to crash
            return False
        server.crash()
        try:
            if f.variant % 2 == 0:
                self._probe_cli()
            self.stop.wait(f.seconds)
        finally:
            server.restart()
        return True

    def _rule(self, proxy: FaultProxy, f: Fault, where: str) -> tuple[bool, str]:
        action = DROP_ACTIONS[f.variant % len(DROP_ACTIONS)]
        rule = proxy.add_rule(_PATTERNS[f.kind], action, times=1)
        try:
            hit = self._wait_for_hit(rule)
        finally:
            proxy.remove_rule(rule)
        return hit, f"{where} {action}"

    def _log_outage(self, proxy: FaultProxy, f: Fault) -> tuple[bool, str]:
        action = DROP_ACTIONS[f.variant % 2]  # before or after the log ran it
        # Every question about a decision's fate (the coordinator's confirm,
        # recovery's status query) dies while the rules hold.
        blind = proxy.add_rule(r"pg_xact_status", "drop_before", times=None)
        lose = proxy.add_rule(_PATTERNS["drop_log_commit"], action, times=1)
        hold = CONFIRM_PATIENCE + 1.0 + f.seconds
        try:
            hit = self._wait_for_hit(lose)
            if hit:
                self.stop.wait(hold)
        finally:
            proxy.remove_rule(lose)
            proxy.remove_rule(blind)
        return hit, f"log proxy {action}, decisions unreadable for {hold:g}s"

    def _partition(self, proxy: FaultProxy, f: Fault, where: str) -> tuple[bool, str]:
        rule = proxy.add_rule(_PATTERNS["partition"], "blackhole", times=1)
        try:
            hit = self._wait_for_hit(rule)
            if hit:
                self.stop.wait(f.seconds)
        finally:
            proxy.remove_rule(rule)
            proxy.drop_all()
        return hit, f"{where} for {f.seconds:g}s"

    def _wait_for_hit(self, rule: Rule) -> bool:
        deadline = time.monotonic() + _RULE_PATIENCE
        while rule.hits == 0:
            if time.monotonic() >= deadline or self.stop.wait(0.02):
                return False
        return True

    def _failpoint(self, f: Fault) -> tuple[bool, str]:
        slot = f.pick(self.world.clients.slots)
        point = FAILPOINT_POINTS[f.variant % len(FAILPOINT_POINTS)]
        if f.kind == "failpoint_crash":
            action = "crash"
        elif f.kind == "failpoint_raise":
            action = "raise"
        else:
            action = f"sleep({round(f.seconds * 2.6, 2)})"  # up to 6.5 s
        self.world.clients.rearm(slot, {
            "TXMGR_FAILPOINTS": f"{point}={action}",
            "TXMGR_FAILPOINTS_SEED": str(self.seed + f.number),
            MAX_TRANSFERS_ENV: "20" if action == "crash" else "4",
        })  # fmt: skip
        # Whether it fired is known only from the client's exit status or records.
        return True, f"client {slot} {point}={action}"

    def _probe_cli(self) -> None:
        """``txmgr status`` while a server is down: its output goes to a scanned file."""
        self._probes += 1
        out = self.world.log_dir / f"cli-status-{self._probes}.log"
        with out.open("wb") as f:
            subprocess.run(
                [sys.executable, "-m", "txmgr.cli", "status", "--json",
                 "--config", str(self.world.daemon_config)],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                timeout=120, check=False,
            )  # fmt: skip

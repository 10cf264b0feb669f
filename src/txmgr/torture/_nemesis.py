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
- ``failover_participant`` / ``failover_log`` (``--standby``): the primary dies,
  its synchronous standby is promoted, the old primary is fenced and a new
  standby cloned (:mod:`txmgr.torture._failover`).

In Paxos mode the kinds aimed at "the log" pick one of its three databases
(``log_outage`` two), and :mod:`txmgr.torture._paxos_faults` adds the faults
that need several: ``stop_log``, ``isolate_log``, ``wipe_log`` and
``two_logs_down``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from txmgr import failpoints
from txmgr.testing.proxy import FaultProxy
from txmgr.torture._failover import Replicated
from txmgr.torture._kinds import ALL_KINDS, FAILOVER, KINDS, PAXOS_ONLY
from txmgr.torture._logdbs import LogDatabase
from txmgr.torture._paxos_faults import PaxosFaults
from txmgr.torture._procs import ProcessGroup, run_cli
from txmgr.torture._rules import ANY_STATEMENT, DROP_ACTIONS, PATTERNS, wait_for_hit
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


# Points every two-phase transfer passes (before_one_phase is never reached).
FAILPOINT_POINTS = tuple(p for p in failpoints.POINTS if p != "before_one_phase")
#: environment key the nemesis uses to cap an armed client's transfers
MAX_TRANSFERS_ENV = "TXMGR_TORTURE_MAX_TRANSFERS"


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
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown}; choose from {', '.join(ALL_KINDS)}")
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
    log_servers: list[Server]  # one (a participant's, with the log inside), or three
    prepare_proxies: list[FaultProxy]  # of the participants that PREPARE (not the log's)
    log_proxies: list[FaultProxy]  # same order as log_servers
    proxies: list[FaultProxy]  # every proxy, once
    daemon_config: Path  # for the CLI probes
    log_dir: Path
    paxos: list[LogDatabase] = field(default_factory=list)  # Paxos mode: the log databases
    participant_dsns: list[str] = field(default_factory=list)  # direct (Paxos observations)
    grace: float = 5.0  # the daemons' Paxos grace (their log idle timeout)
    # --standby: per server, participants' then the log's (same order as the bench)
    replicas: list[Replicated] = field(default_factory=list)
    replica_configs: list[Path] = field(default_factory=list)  # same order as replicas


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
        self.paxos = PaxosFaults(world.paxos, world.clients, world.participant_dsns, self.stop,
                                 self._probe_cli, world.grace) if world.paxos else None
        if self.paxos is None and set(self.kinds) & set(PAXOS_ONLY):
            raise ValueError(f"fault kinds {sorted(set(self.kinds) & set(PAXOS_ONLY))} need "
                             "the three log databases of Paxos mode")
        if not world.replicas and set(self.kinds) & set(FAILOVER):
            raise ValueError(f"fault kinds {sorted(set(self.kinds) & set(FAILOVER))} need "
                             "a standby of every server (standby=True)")

    @property
    def observations(self) -> Counter[str]:
        """What the faults saw beyond hit or miss (Paxos mode: ``two_logs_down``)."""
        return self.paxos.observations if self.paxos is not None else Counter()

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
            if self.paxos is not None:
                for done in self.paxos.restore_due():
                    self._write(f"{time.strftime('%H:%M:%S')} {done}")
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
            self._write(f"{time.strftime('%H:%M:%S')} #{fault.number} {fault.kind} "
                        f"{verdict} {detail} ({time.monotonic() - started:.2f}s)")

    def _write(self, line: str) -> None:
        self._log.write(line + "\n")
        self._log.flush()

    def heal(self) -> None:
        """Undo what is still in effect: rules, partitions, stopped servers, frozen clients."""
        if self.paxos is not None:
            self.paxos.restore_all()
        for proxy in self.world.proxies:
            proxy.clear_rules()
            proxy.drop_all()  # ends blackholed connections
        for server in {id(s): s for s in [*self.world.participant_servers,
                                          *self.world.log_servers]}.values():
            if not server.is_running():
                server.restart()
        self.world.clients.thaw()
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
        if f.kind == "failover_participant":
            index = f.pick(w.participant_servers)
            return self._failover(index)
        if f.kind == "failover_log":
            return self._failover(len(w.participant_servers))
        if f.kind == "stale_replica":
            return self._stale_replica(f.pick(w.replicas))
        if self.paxos is not None:
            applied = self._apply_paxos(f)
            if applied is not None:
                return applied
        if f.kind == "restart_log":
            return self._restart(w.log_servers[0], f), "log server"
        if f.kind == "drop_connections":
            index = f.pick(w.proxies)
            had = w.proxies[index].connections
            w.proxies[index].drop_all()
            return had > 0, f"proxy {index} ({had} connections)"
        if f.kind in ("drop_prepare", "drop_commit_prepared"):
            index = f.pick(w.prepare_proxies)
            return self._rule(w.prepare_proxies[index], f, f"participant proxy {index}")
        if f.kind == "drop_log_commit":
            return self._rule(w.log_proxies[0], f, "log proxy")
        if f.kind == "log_outage":
            return self._log_outage(w.log_proxies[0], f)
        if f.kind == "partition":
            index = f.pick(w.proxies)
            return self._partition(w.proxies[index], f, f"proxy {index}")
        if f.kind.startswith("failpoint_"):
            return self._failpoint(f)
        raise ValueError(f"unknown fault kind {f.kind!r}")

    def _apply_paxos(self, f: Fault) -> tuple[bool, str] | None:
        """The faults aimed at the log, in Paxos mode; None for the others."""
        assert self.paxos is not None
        px = self.paxos
        simple: dict[str, Callable[[Fault], tuple[bool, str]]] = {
            "restart_log": px.restart_log,
            "drop_log_commit": px.drop_accept,
            "log_outage": px.lose_decisions,
            "stop_log": px.stop_log,
            "isolate_log": px.isolate_log,
            "wipe_log": px.wipe_log,
            "two_logs_down": px.two_logs_down,
        }
        if f.kind in simple:
            return simple[f.kind](f)
        if f.kind == "partition":
            # A proxy whose log database is down would wait in vain for a statement.
            w = self.world
            up = px.up_proxies()
            logs = {id(p) for p in w.log_proxies}
            live = [p for p in w.proxies if id(p) not in logs or id(p) in up]
            proxy = live[f.pick(live)]
            index = w.proxies.index(proxy)
            if id(proxy) in logs:  # any statement: registration, accept, read, …
                return self._partition(proxy, f, f"proxy {index} (log)", ANY_STATEMENT)
            return self._partition(proxy, f, f"proxy {index}")
        return None

    def _failover(self, index: int) -> tuple[bool, str]:
        """Fail server ``index`` over to its standby; the faults then act on the new primary."""
        w = self.world
        replica = w.replicas[index]
        old = replica.primary
        if not old.is_running():
            old.restart()  # left down by an earlier failure: bring it back to kill it
        effective, detail = replica.failover()
        for servers in (w.participant_servers, w.log_servers):
            servers[:] = [replica.primary if s is old else s for s in servers]
        return effective, detail

    def _stale_replica(self, index: int) -> tuple[bool, str]:
        """Pause a standby's replay; ``txmgr status`` and ``txmgr recover`` with that
        server's DSN on the standby alone must exit 1 naming a hot standby."""
        w = self.world
        standby = w.replicas[index].standby
        standby.pause_replay()
        refused = []
        try:
            for command in (["status", "--json"], ["recover"]):
                self._probes += 1
                out = w.log_dir / f"cli-replica-{command[0]}-{self._probes}.log"
                status = run_cli(command, w.replica_configs[index], out)
                if status != 1 or "hot standby" not in out.read_text(errors="replace"):
                    # Acting on a standby could roll back a committed branch: a bug.
                    self.errors.append(f"txmgr {command[0]} on a lagging standby of server "
                                       f"{index} exited {status} without refusing "
                                       f"it (see {out.name})")
                else:
                    refused.append(command[0])
        finally:
            standby.resume_replay()
        return len(refused) == 2, f"server {index}'s standby refused by {', '.join(refused)}"

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
        rule = proxy.add_rule(PATTERNS[f.kind], action, times=1)
        try:
            hit = wait_for_hit([rule], self.stop)
        finally:
            proxy.remove_rule(rule)
        return hit, f"{where} {action}"

    def _log_outage(self, proxy: FaultProxy, f: Fault) -> tuple[bool, str]:
        action = DROP_ACTIONS[f.variant % 2]  # before or after the log ran it
        # Every question about a decision's fate (the coordinator's confirm,
        # recovery's status query) dies while the rules hold.
        blind = proxy.add_rule(r"pg_xact_status", "drop_before", times=None)
        lose = proxy.add_rule(PATTERNS["drop_log_commit"], action, times=1)
        hold = CONFIRM_PATIENCE + 1.0 + f.seconds
        try:
            hit = wait_for_hit([lose], self.stop)
            if hit:
                self.stop.wait(hold)
        finally:
            proxy.remove_rule(lose)
            proxy.remove_rule(blind)
        return hit, f"log proxy {action}, decisions unreadable for {hold:g}s"

    def _partition(
        self, proxy: FaultProxy, f: Fault, where: str, pattern: str = PATTERNS["partition"]
    ) -> tuple[bool, str]:
        rule = proxy.add_rule(pattern, "blackhole", times=1)
        try:
            hit = wait_for_hit([rule], self.stop)
            if hit:
                self.stop.wait(f.seconds)
        finally:
            proxy.remove_rule(rule)
            proxy.drop_all()
        return hit, f"{where} for {f.seconds:g}s"

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
        run_cli(["status", "--json"], self.world.daemon_config, out)

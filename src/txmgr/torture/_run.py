"""One torture run: the bench, clients, daemons, the nemesis, then the verdict.

1. Build the bench (:mod:`txmgr.torture._bench`): servers, the bank, the
   decision log (three log databases on servers of their own in Paxos mode),
   a fault proxy per server, a role whose password is a random marker.
2. Start the client processes and the recovery daemons (``txmgr daemon``),
   supervised: whatever exits is started again.
3. The nemesis injects faults for the requested time, and on until every
   kind hit something.
4. Heal: rules off, servers up; stop the clients (SIGTERM, then SIGKILL) and
   the daemons; run ``txmgr status`` and ``txmgr recover``; recovery passes
   until nothing is prepared and no decision row (no Paxos slot) is left, or
   a deadline. In Paxos mode these passes run with ``paxos_grace=0``: no
   coordinator is alive any more, so recovery may decide at once what is
   undecided, and delete unused slots without waiting for them to age.
5. The checker reads everything and judges (:mod:`txmgr.torture._checker`).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from txmgr.config import Config
from txmgr.recovery import Recoverer
from txmgr.torture._acceptors import AcceptorSamples
from txmgr.torture._bench import Bench, build_bench
from txmgr.torture._checker import (
    CheckReport,
    check,
    read_bank,
    read_leftovers,
    read_log_text,
    sample_log_tables,
    scan_for_secret,
)
from txmgr.torture._nemesis import MAX_TRANSFERS_ENV, Nemesis, World
from txmgr.torture._procs import Command, ProcessGroup, Supervisor, run_cli
from txmgr.torture._records import read_records
from txmgr.torture._report import TortureOptions, TortureReport
from txmgr.torture._waits import wait_bound
from txmgr.torture._workload import START_BALANCE

__all__ = ["TortureOptions", "TortureReport", "run_torture"]


def _client_command(bench: Bench, seed: int, records: Path) -> Command:
    def command(
        slot: int, incarnation: int, env: Mapping[str, str] | None
    ) -> tuple[str, list[str], dict[str, str]]:
        extra = dict(env or {"TXMGR_FAILPOINTS": ""})  # never inherit ours
        args = [str(bench.client_spec), "--slot", str(slot), "--incarnation", str(incarnation),
                "--seed", str(seed), "--records", str(records / f"c{slot}.{incarnation}.rec")]
        cap = extra.pop(MAX_TRANSFERS_ENV, None)
        if cap is not None:
            args += ["--max-transfers", cap]
        return "txmgr.torture.client", args, extra

    return command


def _daemon_command(bench: Bench, interval: float) -> Command:
    def command(
        slot: int, incarnation: int, env: Mapping[str, str] | None
    ) -> tuple[str, list[str], dict[str, str]]:
        return "txmgr.cli", ["daemon", "--config", str(bench.daemon_config), "--interval",
                             str(interval), "--log-format", "json"], {}

    return command


def _client_effects(clients: ProcessGroup, records: Path) -> Callable[[], Counter[str]]:
    def effects() -> Counter[str]:
        # A crash failpoint shows as the client's exit status, a raise or a
        # sleep in its records.
        counts: Counter[str] = Counter()
        counts["failpoint_crash"] = clients.armed_exits["exit 77"]
        for key, hits in read_records(sorted(records.glob("*.rec"))).failpoints.items():
            action = key.split("=", 1)[1]
            counts["failpoint_raise" if action == "raise" else "failpoint_sleep"] += hits
        return counts

    return effects


def _cli_final(bench: Bench, logs: Path) -> None:
    """``txmgr status`` and ``txmgr recover`` through the proxies; output scanned later."""
    for command in (["status", "--json"], ["recover"]):
        run_cli(command, bench.daemon_config, logs / f"cli-final-{command[0]}.log",
                timeout=300)


def _settle(config: Config, deadline: float, log: Path) -> tuple[int, list[str]]:
    """Recovery passes until nothing is left; the passes run and the last errors.

    Only once every client and daemon is gone: in Paxos mode with no grace.
    """
    recoverer = Recoverer(config, paxos_grace=0.0)
    passes = 0
    try:
        with log.open("a", encoding="utf-8") as out:
            while True:
                report = recoverer.run_pass()
                passes += 1
                out.write(report.summary() + "\n")
                out.writelines(f"  error: {e}\n" for e in report.errors)
                clean = report.ok and not report.resolutions and report.decisions_pending == 0
                if clean or time.monotonic() >= deadline:
                    return passes, report.errors
                time.sleep(0.2)  # a killed coordinator's L ends when its server notices
    finally:
        recoverer.close()
        if config.paxos_log is not None:
            config.paxos_log.close()


def _verdict(
    bench: Bench, secret: str, options: TortureOptions, workdir: Path,
    samples: AcceptorSamples | None,
) -> CheckReport:
    logs, records = workdir / "logs", workdir / "records"
    scan = scan_for_secret(
        secret,
        [*sorted(logs.glob("*")), *sorted(records.glob("*")),
         *(s.log_file for s in bench.servers)],
        {"decision log tables": read_log_text(bench.log_directs)},
    )
    return check(
        read_bank(bench.direct),
        read_records(sorted(records.glob("*.rec"))),
        read_leftovers(bench.server_dsns(secret), bench.log_directs),
        scan,
        accounts=options.accounts,
        start_balance=START_BALANCE,
        samples=samples,
        wait_bound=(wait_bound(options.deadline, options.deadlock_interval)
                    if options.workload == "hot" else None),
    )


def run_torture(
    options: TortureOptions, echo: Callable[[str], None] = print
) -> TortureReport:
    """Run the torture test and return its report (see the module docstring)."""
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    secret = "tpw" + secrets.token_hex(12)  # the password every client DSN carries
    t0 = time.monotonic()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="txmgr-torture-"))
    logs, records = workdir / "logs", workdir / "records"
    logs.mkdir(parents=True, exist_ok=True)
    records.mkdir(exist_ok=True)
    echo(f"torture: seed={seed}, {options.participants} participants, log {options.log}, "
         f"{options.clients} clients, {options.seconds:g}s of faults; work dir {workdir}")
    harness_errors: list[str] = []
    with ExitStack() as stack:
        bench = build_bench(options, secret, workdir, stack)
        clients = ProcessGroup("client", options.clients,
                               _client_command(bench, seed, records), logs)
        daemons = ProcessGroup("daemon", options.daemons,
                               _daemon_command(bench, options.daemon_interval), logs)
        world = World(
            clients=clients,
            daemons=daemons,
            participant_servers=list(bench.bank_servers),
            log_servers=list(bench.log_servers),
            prepare_proxies=bench.prepare_proxies,
            log_proxies=bench.log_proxies,
            proxies=bench.proxies,
            daemon_config=bench.daemon_config,
            log_dir=logs,
            paxos=bench.paxos,
            participant_dsns=list(bench.direct.values()),
            grace=options.log_idle_timeout,
            replicas=bench.replicas,
            replica_configs=bench.replica_configs,
        )
        nemesis = Nemesis(world, seed, options.kinds, _client_effects(clients, records))
        supervisor = Supervisor([clients, daemons]).start()
        sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torture-sampler")
        # Paxos mode: accepted values four times a second (for the decision
        # check), the tables' text every other second (for the secret scan).
        samples = AcceptorSamples() if bench.paxos else None
        sampled = sampler.submit(
            sample_log_tables, bench.log_directs, logs / "decision-log-samples.txt",
            nemesis.stop, 0.25 if samples else 2.0, samples, 8 if samples else 1)
        t_nemesis = time.monotonic()
        try:
            nemesis.run(options.seconds)
        finally:
            nemesis_seconds = time.monotonic() - t_nemesis
            nemesis.stop.set()
            sampler.shutdown()
            nemesis.heal()
            killed = clients.stop(timeout=30)
            daemons.stop(timeout=15)
            supervisor.close()
            bench.follow_failovers()  # the final recovery and the checker: the primaries
        harness_errors += nemesis.errors
        if sampled.exception() is not None:
            harness_errors.append(f"decision log sampler: {sampled.exception()!r}")
        if supervisor.error is not None:
            harness_errors.append(f"supervisor: {supervisor.error!r}")
        echo(f"torture: faults done after {nemesis_seconds:.0f}s; recovering and checking")
        _cli_final(bench, logs)
        settle_passes, settle_errors = _settle(
            bench.direct_config(), time.monotonic() + options.settle_timeout,
            logs / "final-recovery.log",
        )
        harness_errors += [f"final recovery: {e}" for e in settle_errors]
        verdict = _verdict(bench, secret, options, workdir, samples)
        effective = nemesis.effective()

    report = TortureReport(
        seed=seed,
        options=options,
        duration=time.monotonic() - t0,
        nemesis_seconds=nemesis_seconds,
        injected=nemesis.injected,
        effective=effective,
        check=verdict,
        client_exits=clients.exits,
        daemon_exits=daemons.exits,
        clients_killed_at_stop=killed,
        settle_passes=settle_passes,
        harness_errors=harness_errors,
        observations=nemesis.observations,
        acceptor_reads=samples.reads if samples is not None else 0,
    )
    if options.workdir is None and report.ok and not options.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        report.workdir = str(workdir)
    return report

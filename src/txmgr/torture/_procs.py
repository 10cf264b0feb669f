"""Supervised child processes: the torture clients and the recovery daemons.

A :class:`ProcessGroup` keeps ``count`` processes running: when one exits
(killed by the nemesis, ended by a crash failpoint, or done) the
:class:`Supervisor` starts its next incarnation. The nemesis may also freeze a
group (SIGSTOP, and no new incarnation) and thaw it again. Each incarnation writes its
stdout and stderr to a log file of its own, which the secret scan reads.

Every process is started by the supervisor's thread through
:mod:`txmgr.torture._launch`, so it is killed when that thread ends — also
when the harness itself is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Command", "Incarnation", "ProcessGroup", "Slot", "Supervisor", "run_cli"]

#: (slot, incarnation, armed env or None) -> (module, args, extra env)
Command = Callable[[int, int, Mapping[str, str] | None], tuple[str, list[str], dict[str, str]]]


def run_cli(command: list[str], config: Path, out: Path, *, timeout: float = 120) -> int:
    """``txmgr COMMAND --config CONFIG``, its stdout and stderr in ``out`` (a file the
    secret scan reads); its exit status."""
    with out.open("wb") as f:
        return subprocess.run(
            [sys.executable, "-m", "txmgr.cli", *command, "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        ).returncode


@dataclass
class Incarnation:
    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    armed: Mapping[str, str] | None  # failpoint environment, if the nemesis armed one


@dataclass
class Slot:
    index: int
    current: Incarnation | None = None
    started: int = 0
    pending_env: Mapping[str, str] | None = None  # used by the next incarnation


@dataclass
class ProcessGroup:
    """``count`` copies of a command, restarted whenever one exits."""

    name: str
    count: int
    command: Command
    log_dir: Path
    exits: Counter[str] = field(default_factory=Counter)  # "signal 9", "exit 77", …
    armed_exits: Counter[str] = field(default_factory=Counter)  # exits of armed incarnations
    slots: list[Slot] = field(default_factory=list)
    restarting: bool = True
    frozen: bool = False  # SIGSTOPped by the nemesis: no new incarnation either
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.count)]

    # -- nemesis side -------------------------------------------------------------

    def kill(self, index: int) -> bool:
        """SIGKILL slot ``index``'s process; False if it was not running."""
        with self._lock:
            inc = self.slots[index].current
            if inc is None or inc.proc.poll() is not None:
                return False
            inc.proc.kill()
            return True

    def rearm(self, index: int, env: Mapping[str, str]) -> None:
        """End slot ``index``'s process gently; its next incarnation gets ``env``."""
        with self._lock:
            slot = self.slots[index]
            slot.pending_env = env
            if slot.current is not None and slot.current.proc.poll() is None:
                slot.current.proc.send_signal(signal.SIGTERM)

    def freeze(self) -> int:
        """SIGSTOP every process and start no new one until :meth:`thaw`; how many."""
        with self._lock:
            self.frozen = True
            return self._signal_running(signal.SIGSTOP)

    def thaw(self) -> int:
        """SIGCONT every process and restart as usual again; how many."""
        with self._lock:
            self.frozen = False
            return self._signal_running(signal.SIGCONT)

    def _signal_running(self, signum: int) -> int:
        sent = 0
        for slot in self.slots:
            if slot.current is not None and slot.current.proc.poll() is None:
                slot.current.proc.send_signal(signum)
                sent += 1
        return sent

    def alive(self) -> int:
        with self._lock:
            return sum(1 for s in self.slots if s.current and s.current.proc.poll() is None)

    # -- supervisor side ------------------------------------------------------------

    def tend(self) -> None:
        """Reap exited processes; start the next incarnation of each (while restarting)."""
        with self._lock:
            for slot in self.slots:
                inc = slot.current
                if inc is not None:
                    code = inc.proc.poll()
                    if code is None:
                        continue
                    what = f"signal {-code}" if code < 0 else f"exit {code}"
                    self.exits[what] += 1
                    if inc.armed is not None:
                        self.armed_exits[what] += 1
                    slot.current = None
                if self.restarting and not self.frozen:
                    self._start(slot)

    def _start(self, slot: Slot) -> None:
        slot.started += 1
        env, slot.pending_env = slot.pending_env, None
        module, args, extra = self.command(slot.index, slot.started, env)
        log = self.log_dir / f"{self.name}{slot.index}.{slot.started}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "txmgr.torture._launch", str(os.getpid()), module, *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **extra},
            )  # fmt: skip
        slot.current = Incarnation(slot.started, proc, log, env)

    def stop(self, timeout: float) -> int:
        """No more restarts; SIGTERM everything, SIGKILL what is left after ``timeout``.

        Returns how many processes had to be killed.
        """
        with self._lock:
            self.restarting = False
            procs = [s.current.proc for s in self.slots if s.current is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)  # a frozen one would not act on it
        deadline = time.monotonic() + timeout
        killed = 0
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed += 1
        self.tend()
        return killed

    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob(f"{self.name}*.log"))


class Supervisor:
    """A thread that tends process groups until :meth:`close`.

    It is the only thread that starts processes (see the module docstring), and
    it must outlive them: close it only after every group was stopped.
    """

    def __init__(self, groups: list[ProcessGroup], period: float = 0.1) -> None:
        self._groups = groups
        self._period = period
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torture-supervisor", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                for group in self._groups:
                    group.tend()
                self._done.wait(self._period)
        except BaseException as e:  # reported by the run; the groups stop restarting
            self.error = e

    def close(self) -> None:
        self._done.set()
        self._thread.join()

"""A torture client: a process that runs bank transfers through txmgr until told to stop.

Run by the torture harness as ``python -m txmgr.torture.client SPEC --slot N
--incarnation I --seed S --records FILE [--max-transfers K]``. SPEC is a JSON
file: ``participants`` (name -> DSN), ``log`` (a DSN, a participant's name,
or a list of DSNs: Paxos mode), ``accounts``, ``log_idle_timeout``,
``connect_timeout``, ``threads`` (transfers run at once, on one manager: in
Paxos mode their commits share accept rounds). The harness arms failpoints
through ``TXMGR_FAILPOINTS``, may SIGKILL the process at any moment, and
may freeze it (SIGSTOP) a while.

Every transfer is recorded (:mod:`txmgr.torture._records`) before it starts
and once its outcome is known. SIGTERM ends the loop after the current
transfer. Errors go to stderr — through plain :mod:`logging`, with no
redaction of ours — exactly as an application would print them, so the
harness can scan them for passwords.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NotRequired, TypedDict

from txmgr import failpoints
from txmgr.errors import OutcomeUnknown, TransactionAborted
from txmgr.hooks import Hooks
from txmgr.manager import TransactionManager
from txmgr.paxos import PaxosGid, PaxosLog
from txmgr.torture._hot import plan_hot_transfer, run_hot_transfer
from txmgr.torture._records import RecordWriter
from txmgr.torture._workload import Transfer, plan_transfer, run_transfer_body

__all__ = ["ClientSpec", "main", "run"]

logger = logging.getLogger("txmgr.torture.client")


def _describe(e: BaseException) -> str:
    """The error and its causes, one line: what an application would log."""
    parts: list[str] = []
    seen: BaseException | None = e
    while seen is not None and len(parts) < 5:
        parts.append(f"{type(seen).__name__}: {str(seen).strip()}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


class _VoterHooks(Hooks):
    """Remembers the Paxos voters the gids of each thread's current transfer
    named (the checker judges the acceptors' samples against them)."""

    def __init__(self) -> None:
        self._mine = threading.local()  # hooks run on the committing thread

    @property
    def voters(self) -> str | None:  # "<quorum>:<incarnation>,…"
        return getattr(self._mine, "voters", None)

    @voters.setter
    def voters(self, value: str | None) -> None:
        self._mine.voters = value

    @property
    def decided_at(self) -> float | None:  # monotonic time this thread's last decision began
        return getattr(self._mine, "decided_at", None)

    def before_decision(self, txid: str, lxid: int) -> None:
        self._mine.decided_at = time.monotonic()

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        parsed = PaxosGid.parse(gid)
        if parsed is not None:
            v = parsed.voters
            self.voters = f"{v.quorum}:{','.join(v.incarnations)}"


def _fields(tx_txid: str | None, hooks: _VoterHooks, error: BaseException | None = None
            ) -> list[str]:
    """The ``key=value`` fields of an outcome line (see txmgr.torture._records)."""
    fields = [f"txid={tx_txid}"] if tx_txid else []
    if error is not None and error.__cause__ is not None:
        fields.append(f"cause={type(error.__cause__).__name__}")
    if hooks.voters is not None:
        fields.append(f"voters={hooks.voters}")
    return fields


def _transfer(tm: TransactionManager, t: Transfer, out: RecordWriter, hooks: _VoterHooks) -> str:
    """Run one transfer; record and return its outcome letter (K, X or U)."""
    tid = t.transfer_id
    hooks.voters = None
    try:
        tx = tm.transaction()
    except Exception as e:  # the log could not be read: nothing began
        out.write("A", tid, "-")
        out.write("X", tid, type(e).__name__)
        logger.warning("%s: not started: %s", tid, _describe(e))
        return "X"
    out.write("A", tid, tx.txid)
    try:
        run_transfer_body(tx, t)
    except Exception as e:
        # Nothing is prepared before commit(): the branches roll back (or die
        # with their sessions), whatever rollback() manages to send.
        try:
            tx.rollback()
        finally:
            out.write("X", tid, type(e).__name__)
        logger.warning("%s: aborted in the body: %s", tid, _describe(e))
        return "X"
    try:
        tx.commit()
    except TransactionAborted as e:
        out.write("X", tid, type(e).__name__, *_fields(tx.txid, hooks, e))
        logger.warning("%s: aborted: %s", tid, _describe(e))
        return "X"
    except OutcomeUnknown as e:
        out.write("U", tid, type(e).__name__, *_fields(e.txid or tx.txid, hooks, e))
        logger.warning("%s: outcome unknown: %s", tid, _describe(e))
        return "U"
    except Exception as e:  # not one of txmgr's documented outcomes: keep the traceback
        out.write("U", tid, "unexpected:" + type(e).__name__, *_fields(tx.txid, hooks, e))
        logger.error("%s: unexpected error from commit():\n%s", tid,
                     "".join(traceback.format_exception(e)))
        return "U"
    out.write("K", tid, *_fields(tx.txid, hooks))
    return "K"


def _fired_since(armed: dict[str, str]) -> Callable[[], bool]:
    """A function telling whether an armed failpoint fired since its last call."""
    seen = {name: failpoints.hits(name) for name in armed}

    def fired() -> bool:
        now = {name: failpoints.hits(name) for name in armed}
        changed = now != seen
        seen.update(now)
        return changed

    return fired


class ClientSpec(TypedDict):
    """The JSON file the harness writes for its clients."""

    participants: dict[str, str]
    log: str | list[str]  # a DSN, the participant holding the log, or Paxos DSNs
    accounts: int
    log_idle_timeout: float
    connect_timeout: float
    threads: NotRequired[int]  # default 1
    workload: NotRequired[str]  # "bank" (default) or "hot" (txmgr.torture._hot)
    deadline: NotRequired[float]  # hot: each attempt's tm.transaction(timeout=)


def run(
    spec: ClientSpec,
    *,
    slot: int,
    incarnation: int,
    seed: int,
    records: Path,
    max_transfers: int | None,
    stop: threading.Event,
) -> int:
    """The client loop (``threads`` of them); returns the number of transfers attempted."""
    participants = spec["participants"]
    threads = spec.get("threads", 1)
    armed = dict(failpoints.active())
    log = spec["log"]
    hooks = _VoterHooks()
    tm = TransactionManager(
        participants,
        # A frozen (SIGSTOPped) client counts as dead after the same time in
        # both modes: its liveness lock ends like the default mode's L does.
        PaxosLog(log, connect_timeout=spec["connect_timeout"], pool_max_size=2 * threads + 2,
                 beacon_timeout=spec["log_idle_timeout"])
        if isinstance(log, list) else log,
        pool_min_size=1,
        pool_max_size=threads + 1,
        connect_timeout=spec["connect_timeout"],
        log_idle_timeout=spec["log_idle_timeout"],
        hooks=hooks,
    )
    out = RecordWriter(records)
    names = sorted(participants)
    counts = [0] * threads
    hot = spec.get("workload", "bank") == "hot"

    def loop(k: int) -> None:
        rng = random.Random(f"{seed}/{slot}/{incarnation}" + (f"/{k}" if threads > 1 else ""))
        prefix = f"c{slot}.{incarnation}." + (f"{k}." if threads > 1 else "")
        while not stop.is_set() and (max_transfers is None or sum(counts) < max_transfers):
            counts[k] += 1
            tid = f"{prefix}{counts[k]}"
            before = {name: failpoints.hits(name) for name in armed}
            if hot:
                outcome = run_hot_transfer(tm, plan_hot_transfer(rng, tid, names), out, rng,
                                           spec["deadline"], lambda: hooks.decided_at,
                                           _fired_since(armed), stop.wait)
            else:
                t = plan_transfer(rng, tid, names, spec["accounts"])
                outcome = _transfer(tm, t, out, hooks)
            for name, action in armed.items():
                # (with threads, a hit may be seen by two transfers' windows: the
                # records only need to show that the failpoint fired)
                if failpoints.hits(name) > before[name]:
                    out.write("F", name, action)
            if outcome != "K":
                # A server may be down: do not spin; but keep trying, that is the point.
                stop.wait(rng.uniform(0.02, 0.2))

    try:
        workers = [threading.Thread(target=loop, args=(k,), name=f"transfers-{k}", daemon=True)
                   for k in range(1, threads)]
        for w in workers:
            w.start()
        try:
            loop(0)
        finally:
            stop.set()  # the others finish their transfer and end
            for w in workers:
                w.join()
    finally:
        out.close()
        tm.close()
    return sum(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m txmgr.torture.client")
    parser.add_argument("spec", type=Path, help="JSON file: participants, log, accounts, …")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--incarnation", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--max-transfers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    spec: ClientSpec = json.loads(args.spec.read_text())
    run(spec, slot=args.slot, incarnation=args.incarnation, seed=args.seed,
        records=args.records, max_transfers=args.max_transfers, stop=stop)
    return 0

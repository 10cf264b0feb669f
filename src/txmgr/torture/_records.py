"""What a client process records about its transfers, one fsynced line each.

A client writes ``A <id> <txid>`` before it starts a transfer, then one of

- ``K <id>`` — acknowledged: ``commit()`` returned without an error;
- ``X <id> <error type>`` — aborted: nothing may be committed;
- ``U <id> <error type>`` — outcome unknown (``OutcomeUnknown``, or an
  unexpected error out of ``commit()``): both halves or neither.

Outcome lines may end with ``key=value`` fields: ``txid=`` the transaction's
txid once ``commit()`` is over (in Paxos mode it may differ from the one at
the start), ``cause=`` the type of the error's ``__cause__``, ``voters=`` the
Paxos voters its gids named (``<quorum>:<incarnation>,…``).

``W <id> <attempt> <seconds> <outcome> [faulted=1]`` (the hot workload,
:mod:`txmgr.torture._hot`): one attempt, how long it waited up to its
decision, its outcome (``committed`` or the error type); ``faulted=1`` when a
failpoint fired during it (a fault inside the coordinator, outside the
deadline's contract).

``F <failpoint> <action>`` records a failpoint that fired (raise or sleep; a
crash ends the process before it can write). A transfer with an ``A`` line
and no outcome was cut short (SIGKILL, crash failpoint): it counts as unknown.
Every line is flushed and fsynced before the client goes on, so what the file
says was acknowledged really was.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Attempt", "RecordWriter", "Records", "Voters", "read_records"]


class RecordWriter:
    """Appends record lines to one file, each durable before ``write`` returns
    (thread-safe: a client's threads share it, a line never interleaves)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, *fields: str) -> None:
        with self._lock:
            self._file.write(" ".join(fields) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class Voters:
    """The Paxos voters of one transfer's transaction, as its gids named them."""

    quorum: int
    incarnations: frozenset[str]

    def __str__(self) -> str:
        return f"{self.quorum}:{','.join(sorted(self.incarnations))}"

    @classmethod
    def parse(cls, text: str) -> Voters | None:
        quorum, _, incs = text.partition(":")
        if not quorum.isdigit() or not incs:
            return None
        return cls(int(quorum), frozenset(incs.split(",")))


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a hot-workload transfer (a ``W`` line)."""

    transfer_id: str
    attempt: int
    waited: float  # seconds from its start to its decision (or its error)
    outcome: str  # "committed" or the error type
    faulted: bool = False  # a failpoint fired during it


@dataclass
class Records:
    """Everything the clients recorded, merged."""

    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    aborted: dict[str, str] = field(default_factory=dict)  # id -> error type
    unknown: dict[str, str] = field(default_factory=dict)  # id -> error type or "cut short"
    failpoints: Counter[str] = field(default_factory=Counter)  # "point=action" -> hits
    errors: Counter[str] = field(default_factory=Counter)  # error type -> count
    causes: Counter[str] = field(default_factory=Counter)  # "error<-cause" -> count
    txids: dict[str, str] = field(default_factory=dict)  # id -> txid after commit()
    voters: dict[str, Voters] = field(default_factory=dict)  # id -> Paxos voters
    attempts: list[Attempt] = field(default_factory=list)  # hot workload only

    def finish(self) -> None:
        """Attempts without an outcome line become unknown ("cut short")."""
        for tid in self.attempted - self.acked - self.aborted.keys() - self.unknown.keys():
            self.unknown[tid] = "cut short"


def read_records(paths: Iterable[Path]) -> Records:
    """Merge the record files; a torn last line (the writer was killed) is skipped."""
    records = Records()
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(True):
            if not line.endswith("\n"):
                continue  # torn: the writer died before the line was whole
            parts = line.split()
            if len(parts) < 2:
                continue
            kind, tid = parts[0], parts[1]
            if kind in ("K", "X", "U"):
                extra = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
                parts = [p for p in parts if "=" not in p]
                _outcome_fields(records, tid, parts, extra)
            if kind == "A":
                records.attempted.add(tid)
            elif kind == "K":
                records.acked.add(tid)
            elif kind == "X" and len(parts) >= 3:
                records.aborted[tid] = parts[2]
                records.errors[parts[2]] += 1
            elif kind == "U" and len(parts) >= 3:
                records.unknown[tid] = parts[2]
                records.errors[parts[2]] += 1
            elif kind == "W" and len(parts) >= 5:
                records.attempts.append(Attempt(tid, int(parts[2]), float(parts[3]), parts[4],
                                                "faulted=1" in parts[5:]))
            elif kind == "F" and len(parts) >= 3:
                records.failpoints[f"{parts[1]}={parts[2]}"] += 1
    records.finish()
    return records


def _outcome_fields(records: Records, tid: str, parts: list[str], extra: dict[str, str]) -> None:
    if "txid" in extra:
        records.txids[tid] = extra["txid"]
    if "cause" in extra and len(parts) >= 3:
        records.causes[f"{parts[2]}<-{extra['cause']}"] += 1
    voters = Voters.parse(extra.get("voters", ""))
    if voters is not None:
        records.voters[tid] = voters

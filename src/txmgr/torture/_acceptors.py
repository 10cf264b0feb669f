"""Paxos mode: what the acceptors decided, sampled during the run, against the bank.

While the run goes on, the harness reads every log database's accepted values
a few times a second (:func:`read_accepted`, into :class:`AcceptorSamples`).
A value is *chosen* for a transaction once a quorum of its voters — the
incarnations its gids named, which the clients record — accepted it at the
same ballot; an acceptance, once seen, stays a fact even after the slot is
deleted or the database wiped. So whatever the samples show chosen is what
the participants must show at the end (:func:`judge_decisions`): a chosen
commit means both ledger rows, a chosen abort neither — and never both
values for one transaction. Sampling misses short-lived slots; it catches the
ones that lived long enough to matter: in doubt, waiting for recovery.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import psycopg

from txmgr.torture._records import Records

__all__ = ["AcceptorSamples", "judge_decisions", "read_accepted"]

#: (ballot, "commit" | "abort")
Accepted = tuple[int, str]


@dataclass
class AcceptorSamples:
    """Every (ballot, value) any acceptor was seen holding, by txid and incarnation."""

    held: dict[str, dict[Accepted, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set)))
    reads: int = 0  # acceptor tables read

    def add(self, incarnation: str, txid: str, ballot: int, value: str) -> None:
        self.held[txid][(ballot, value)].add(incarnation)

    def chosen(self, txid: str, quorum: int, voters: Collection[str]) -> set[str]:
        """The values seen accepted at one ballot by ``quorum`` of ``voters``."""
        return {value for (_, value), incs in self.held.get(txid, {}).items()
                if len(incs & set(voters)) >= quorum}


def read_accepted(log: str | psycopg.Connection[Any], samples: AcceptorSamples) -> None:
    """Add one log database's accepted values to ``samples``; ``log`` is its DSN or an
    autocommit connection to it (raises psycopg.Error while it is down)."""
    if isinstance(log, str):
        with psycopg.connect(log, autocommit=True, connect_timeout=5) as conn:
            return read_accepted(conn, samples)
    rows = log.execute(
        "SELECT a.incarnation, p.txid, p.accepted_ballot, p.accepted_value "
        "FROM txmgr_paxos_acceptor a LEFT JOIN txmgr_paxos p ON p.accepted_value IS NOT NULL"
    ).fetchall()
    samples.reads += 1
    for incarnation, txid, ballot, value in rows:
        if txid is not None:
            samples.add(str(incarnation), str(txid), int(ballot), str(value))


def judge_decisions(
    samples: AcceptorSamples, records: Records, committed: Collection[str]
) -> tuple[list[tuple[str, str]], Counter[str]]:
    """(violation kind, detail) for every transfer whose committed state contradicts a
    value its voters chose, and how many chosen values were seen, by value."""
    problems: list[tuple[str, str]] = []
    seen: Counter[str] = Counter()
    for tid, voters in sorted(records.voters.items()):
        txid = records.txids.get(tid)
        if txid is None:
            continue
        values = samples.chosen(txid, voters.quorum, voters.incarnations)
        seen.update(values)
        if len(values) > 1:
            problems.append(("decision", f"transfer {tid} (txid {txid}): both commit and "
                                         "abort were chosen by its voters"))
        elif values == {"commit"} and tid not in committed:
            problems.append(("decision", f"transfer {tid} (txid {txid}): its voters chose "
                                         "commit, yet it has not both rows"))
        elif values == {"abort"} and tid in committed:
            problems.append(("decision", f"transfer {tid} (txid {txid}): its voters chose "
                                         "abort, yet it is committed"))
    return problems, seen

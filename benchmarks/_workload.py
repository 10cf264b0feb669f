"""The accounts workload every contender runs, and the checks after each run.

Each participant database holds ``txmgr_bench_accounts`` (``ACCOUNTS`` rows,
balance 0). One transaction updates one random account in *every*
participant: the first loses ``n - 1``, each other one gains 1. So the sum
over all participants stays 0 whatever commits — unless a transaction commits
on some participants only — and the sum of the second participant grows by
exactly one per committed transaction, which checks each contender's count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

import txmgr

ACCOUNTS_TABLE = "txmgr_bench_accounts"
DECISION_TABLE = "txmgr_bench_decision"  # the hand-written two-phase commits' log
UPDATE = "UPDATE txmgr_bench_accounts SET balance = balance + %s WHERE id = %s"

#: (delta, account id) for each participant, in participant order.
Moves = list[tuple[int, int]]


def participant_names(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def moves(rng: random.Random, participants: int, accounts: int) -> Moves:
    """One transaction's updates: a random account per participant, amounts summing to 0."""
    return [
        (-(participants - 1) if i == 0 else 1, rng.randint(1, accounts))
        for i in range(participants)
    ]


def execute(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


def create_schema(participant_dsns: list[str], log_dsn: str, accounts: int, *,
                  acceptors: Sequence[str] = ()) -> None:
    """(Re)create the benchmark tables; migrate the txmgr log into the log database,
    into the first participant (for "log inside a participant") and into the Paxos
    log databases ``acceptors``."""
    for dsn in participant_dsns:
        execute(dsn, f"DROP TABLE IF EXISTS {ACCOUNTS_TABLE}")
        execute(dsn, f"CREATE TABLE {ACCOUNTS_TABLE} (id int PRIMARY KEY, balance bigint NOT NULL)")
        execute(dsn, f"INSERT INTO {ACCOUNTS_TABLE} SELECT g, 0 FROM generate_series(1, %s) g",
                (accounts,))
        execute(dsn, f"VACUUM ANALYZE {ACCOUNTS_TABLE}")
    execute(log_dsn, f"DROP TABLE IF EXISTS {DECISION_TABLE}")
    execute(log_dsn, f"CREATE TABLE {DECISION_TABLE} (txid text PRIMARY KEY, "
                     "participants text[] NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
    for dsn in [log_dsn, participant_dsns[0], *acceptors]:
        txmgr.migrate(dsn)


@dataclass(frozen=True)
class Snapshot:
    """What the checks compare before and after one contender's run."""

    sums: tuple[int, ...]  # balance sum per participant
    prepared: int  # prepared transactions left on the participants' servers

    @classmethod
    def take(cls, participant_dsns: list[str]) -> Snapshot:
        total = f"SELECT coalesce(sum(balance), 0) FROM {ACCOUNTS_TABLE}"
        sums = tuple(int(execute(d, total)[0][0]) for d in participant_dsns)
        prepared = sum(
            int(execute(d, "SELECT count(*) FROM pg_prepared_xacts "
                           "WHERE database = current_database()")[0][0])
            for d in participant_dsns
        )
        return cls(sums, prepared)


def check(before: Snapshot, after: Snapshot, committed: int) -> list[str]:
    """Problems found after a run that committed ``committed`` transactions."""
    problems = []
    if sum(after.sums) != 0:
        problems.append(f"money not conserved: the balances sum to {sum(after.sums)}, not 0")
    if len(after.sums) > 1 and after.sums[1] - before.sums[1] != committed:
        problems.append(f"{after.sums[1] - before.sums[1]} transactions changed the data, "
                        f"but {committed} were reported committed")
    if after.prepared:
        problems.append(f"{after.prepared} prepared transactions were left behind")
    return problems


def clear_log(log_dsn: str) -> None:
    """Empty the hand-written commits' decision table, so no run inherits a big one."""
    execute(log_dsn, f"TRUNCATE {DECISION_TABLE}")

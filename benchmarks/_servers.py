"""The servers a benchmark starts: one per participant, one for the logs.

Every database lives on a throwaway PostgreSQL server (txmgr.testing.PgServer)
with fsync and full_page_writes on, so commits cost what they cost in
production. Paxos mode's three log databases go on servers that are there
anyway (:data:`PAXOS_PLACEMENT`), so Paxos mode and the default mode with a
dedicated log run on the same hardware.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from txmgr.testing import PgServer

__all__ = ["PAXOS_PLACEMENT", "PRODUCTION", "Databases", "started"]

PRODUCTION = {"fsync": "on", "full_page_writes": "on"}
PAXOS_PLACEMENT = ("acceptor 1 on the dedicated log server, acceptors 2 and 3 on the first "
                   "two participants' servers (a database each); txmgr-paxos-1down: "
                   "acceptor 1 down")


@dataclass
class Databases:
    """DSNs of one benchmark's databases (and the servers, when started here)."""

    participants: list[str]
    log: str
    acceptors: list[str] = field(default_factory=list)  # Paxos mode's log databases
    servers: list[PgServer] = field(default_factory=list)  # participants' first, the log's last


@contextlib.contextmanager
def started(
    participants: int, *, paxos: bool, settings: Mapping[str, str] | None = None
) -> Iterator[Databases]:
    """Start ``participants + 1`` servers (destroyed on exit): participant ``pI`` on
    server I, the dedicated log ``txlog`` on the last one and, with ``paxos``,
    ``txmgr_bench_acc1..3`` placed as :data:`PAXOS_PLACEMENT` says."""
    with contextlib.ExitStack() as stack:
        # in_ram=False: with fsync on, a commit must wait for a disk, as in production
        # (the test harness's RAM file system would make fsync free).
        servers = [stack.enter_context(PgServer(settings={**PRODUCTION, **(settings or {})},
                                                in_ram=False))
                   for _ in range(participants + 1)]
        *holders, log_server = servers
        dsns = [s.create_database(f"p{i}") for i, s in enumerate(holders)]
        acceptors = []
        if paxos:
            placed = [log_server, holders[0], holders[1 % len(holders)]]
            acceptors = [s.create_database(f"txmgr_bench_acc{i + 1}")
                         for i, s in enumerate(placed)]
        yield Databases(dsns, log_server.create_database("txlog"), acceptors, servers)

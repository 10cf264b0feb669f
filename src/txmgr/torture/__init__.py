"""The bank torture test: transfers through txmgr while a nemesis breaks things.

Accounts live in 2 or 3 participant databases on servers of their own;
client processes move money between them through txmgr, each transfer
writing a debit row in one database and a credit row in another. A seeded
nemesis SIGKILLs clients and recovery daemons, crashes and restarts servers,
loses protocol messages through fault proxies and arms failpoints — in Paxos
mode (``--log paxos``) also stops, cuts off and wipes the three log
databases. At the end recovery runs and a checker verifies money,
atomicity, durability, leftovers, Paxos decisions and that no password
leaked. ``--workload hot`` makes the transfers collide on a few hot accounts
in random lock order (distributed deadlocks), each attempt under a deadline,
and the checker bounds every attempt's wait::

    python -m txmgr.torture --minutes 10 --seed 1        # or: txmgr torture …
    python -m txmgr.torture --minutes 5 --seed 3 --log paxos

From Python: ``run_torture(TortureOptions(seconds=60, seed=1))``.
"""

from txmgr.torture._checker import CheckReport, Violation
from txmgr.torture._kinds import PAXOS_KINDS
from txmgr.torture._nemesis import KINDS, Fault, schedule
from txmgr.torture._report import TortureOptions, TortureReport
from txmgr.torture._run import run_torture

__all__ = [
    "KINDS",
    "PAXOS_KINDS",
    "CheckReport",
    "Fault",
    "TortureOptions",
    "TortureReport",
    "Violation",
    "run_torture",
    "schedule",
]

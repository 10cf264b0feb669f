"""A server with a synchronous hot standby, and its failover (``--standby``).

Each server of the bench gets a streaming standby that its primary waits for
(``synchronous_standby_names = '*'``): what a highly available deployment
(Patroni and the like) runs. Two fault proxies stand in front of the pair, and
every client and daemon DSN lists both, ``front`` first, with
``target_session_attrs=read-write``: libpq connects to whichever is the primary,
as a multi-host DSN does in production.

A failover (:meth:`Replicated.failover`) is what a failover manager does:

1. the primary dies (``pg_ctl stop -m immediate``: no checkpoint, no goodbye);
2. the standby is promoted; it has every commit and every ``PREPARE
   TRANSACTION`` its primary acknowledged, because each waited for it;
3. until a new standby streams, the new primary does not wait for one
   (Patroni's ``synchronous_mode`` without ``synchronous_mode_strict``);
4. the old primary is fenced for good: its files are deleted (its log is kept
   for the secret scan), so it can never answer as a second primary;
5. a new standby is cloned from the new primary and becomes synchronous.

The proxies are retargeted on the way (``front`` to the new primary, ``back``
to the new standby), so the DSNs never change, and the faults that act on
``front`` (lost statements, partitions) keep acting on the primary.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from txmgr.testing import PgServer
from txmgr.testing.proxy import FaultProxy

__all__ = ["Replicated"]


def _set_sync(server: PgServer, names: str) -> None:
    server.execute_admin(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
    server.execute_admin("SELECT pg_reload_conf()")


def _wait_synchronous(server: PgServer, timeout: float = 60.0) -> None:
    """Until a standby of ``server`` is synchronous and has flushed all WAL written
    so far: what was committed while none was (after a failover) is then on it too,
    so the next failover loses nothing that was acknowledged."""
    target = server.execute_admin("SELECT pg_current_wal_lsn()")[0][0]
    deadline = time.monotonic() + timeout
    while True:
        rows = server.execute_admin(
            "SELECT count(*) FROM pg_stat_replication "
            "WHERE sync_state = 'sync' AND flush_lsn >= %s::pg_lsn", [target])
        if rows[0][0]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server!r}: no synchronous standby caught up in {timeout:g}s")
        time.sleep(0.05)  # polling a server view: nothing to wait on instead


@dataclass
class Replicated:
    """A primary, its synchronous standby, and the two proxies in front of them."""

    primary: PgServer
    standby: PgServer
    front: FaultProxy  # leads to the primary (after a failover: once retargeted)
    back: FaultProxy  # leads to the standby
    stack: ExitStack  # destroys the servers made by failovers too
    log_dir: Path  # where a fenced primary's server log is kept
    name: str
    failovers: int = 0

    @classmethod
    def start(cls, primary: PgServer, name: str, stack: ExitStack, log_dir: Path) -> Replicated:
        """A standby for the running ``primary`` and the proxies; the primary waits
        for the standby from now on (``synchronous_commit`` is on: the flush)."""
        standby = cls._clone(primary, stack)
        _set_sync(primary, "*")
        _wait_synchronous(primary)
        front = stack.enter_context(FaultProxy("127.0.0.1", primary.port))
        back = stack.enter_context(FaultProxy("127.0.0.1", standby.port))
        return cls(primary, standby, front, back, stack, log_dir, name)

    @staticmethod
    def _clone(primary: PgServer, stack: ExitStack) -> PgServer:
        standby = PgServer.standby_of(primary)
        stack.callback(standby.destroy)
        standby.start()
        return standby

    def failover(self) -> tuple[bool, str]:
        """Kill the primary, promote the standby, fence the old primary, clone a new
        standby. Effective when connections were open to the primary it killed."""
        old, new = self.primary, self.standby
        had = self.front.connections
        old.crash()
        new.promote()
        _set_sync(new, "")  # no standby yet: commits must not wait for one
        self.front.upstream = ("127.0.0.1", new.port)
        # Kept where the secret scan reads the run's logs.
        shutil.copyfile(old.log_file, self.log_dir / f"fenced-{self.name}-{self.failovers}.log")
        old.destroy()  # fenced: it never answers again
        self.primary = new
        self.standby = self._clone(new, self.stack)
        self.back.upstream = ("127.0.0.1", self.standby.port)
        _set_sync(new, "*")
        _wait_synchronous(new)
        self.failovers += 1
        return had > 0, f"{self.name}: promoted its standby ({had} connections to the old primary)"

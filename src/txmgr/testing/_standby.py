"""Make a cluster directory a streaming hot standby of a running server (pg_basebackup).

Used by :meth:`PgServer.standby_of <txmgr.testing.PgServer.standby_of>`; it
replaces ``initdb`` for such a server. The primary needs nothing special:
PostgreSQL's defaults (``wal_level = replica``, ``max_wal_senders = 10``)
and initdb's ``pg_hba.conf`` (replication from 127.0.0.1 with a password)
allow it.
"""

from __future__ import annotations

from psycopg.conninfo import make_conninfo

from ._errors import PgServerError
from ._pgctl import Cluster
from ._runas import chown_tree, run

__all__ = ["clone_primary"]


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def clone_primary(cluster: Cluster, host: str, port: int, user: str, password: str) -> None:
    """Fill ``cluster.data_dir`` with a base backup of ``host:port``, set up to stream
    from it (``standby.signal`` and ``primary_conninfo``, written by ``-R``)."""
    program = cluster.bin_dir / "pg_basebackup"
    if not program.exists():
        raise PgServerError(
            f"{program} not found: a standby needs pg_basebackup from the same "
            "PostgreSQL installation as initdb (set TXMGR_PG_BIN to one that has it)"
        )
    # The password goes through a passfile beside the data directory, never the
    # command line; the standby's walreceiver keeps using it (primary_conninfo
    # names it), and it is deleted with the server's directory.
    passfile = cluster.base / "primary.pgpass"
    fields = (host, str(port), "*", user, password)
    passfile.write_text(":".join(_pgpass_field(f) for f in fields) + "\n")
    passfile.chmod(0o600)
    chown_tree(passfile, cluster.user)
    conninfo = make_conninfo(host=host, port=port, user=user, passfile=str(passfile))
    proc = run(
        [program, "-D", str(cluster.data_dir), "-d", conninfo, "-R", "-X", "stream",
         "-c", "fast", "--no-sync"],
        cluster.user,
        cwd=cluster.base,
        timeout=cluster.timeout + 30,
    )  # fmt: skip
    if proc.returncode != 0:
        cluster.fail("pg_basebackup", proc.stdout + proc.stderr)

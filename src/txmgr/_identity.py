"""Which database a decision log lives in: the cluster's ``system_identifier``
and the database's oid.

A log's id (the ``logid`` every gid carries) is random and stored in the log
database, so any copy of that database carries it too. The id is therefore
bound, in ``txmgr_log_meta``, to the database it was made in; a copy reads a
different binding than the one it holds:

- ``CREATE DATABASE … TEMPLATE log``: same cluster, new database oid;
- a dump restored anywhere: a new oid (and, on another cluster, a new system
  identifier);
- a physical standby, promoted or not: the same cluster identity and oid, so
  a failover of the log to its standby keeps working; but for the same reason
  a ``pg_basebackup`` clone promoted on its own cannot be told apart;
- ``pg_upgrade``: a new system identifier (initdb), the oid kept (since
  PostgreSQL 15): the upgraded log must be adopted with ``--keep-logid``.
"""

from __future__ import annotations

__all__ = ["LIVE_IDENTITY"]

#: Two columns: this cluster's system identifier (bigint) and this database's oid.
#: Readable by any role (pg_control_system() is executable by PUBLIC).
LIVE_IDENTITY = (
    "(SELECT system_identifier FROM pg_control_system()), "
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
)

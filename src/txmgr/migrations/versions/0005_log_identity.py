"""Bind the log's id to the database it lives in (see :mod:`txmgr._identity`).

An existing log is bound to the database it is migrated in: migrate the
original, not a copy (a copy migrated first takes the identity, and the
original then reads as a copy: adopt it with ``txmgr migrate --adopt
--keep-logid``).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

from txmgr._identity import LIVE_IDENTITY

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The same three statements for the default mode's meta row and the Paxos
# acceptor's (a copied acceptor would vote with the original's promises).
UPGRADE: tuple[str, ...] = tuple(
    statement
    for table in ("txmgr_log_meta", "txmgr_paxos_acceptor")
    for statement in (
        "ALTER TABLE " + table + " ADD COLUMN system_identifier bigint, "
        "ADD COLUMN database_oid oid",
        "UPDATE " + table + " SET (system_identifier, database_oid) = "
        "(SELECT " + LIVE_IDENTITY + ")",
        "ALTER TABLE " + table + " ALTER COLUMN system_identifier SET NOT NULL, "
        "ALTER COLUMN database_oid SET NOT NULL",
    )
)
DOWNGRADE: tuple[str, ...] = (
    "ALTER TABLE txmgr_log_meta DROP COLUMN system_identifier, DROP COLUMN database_oid",
    "ALTER TABLE txmgr_paxos_acceptor DROP COLUMN system_identifier, "
    "DROP COLUMN database_oid",
)


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

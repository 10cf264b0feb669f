"""Paxos mode: each slot records its coordinator's liveness lock key.

Recovery tells a dead coordinator from a live one by that lock (see
:mod:`txmgr.paxos._beacon`) instead of waiting out a grace period. The DDL is
:data:`txmgr.paxos._schema.UPGRADE_0004`, frozen there.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

from txmgr.paxos._schema import DOWNGRADE_0004, UPGRADE_0004

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in UPGRADE_0004:
        op.execute(statement)


def downgrade() -> None:
    # Slots registered since then just lose their key: recovery falls back
    # to its grace period for them.
    for statement in DOWNGRADE_0004:
        op.execute(statement)

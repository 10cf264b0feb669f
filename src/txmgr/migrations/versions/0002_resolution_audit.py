"""Audit of branches resolved by hand with `txmgr resolve`.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE txmgr_resolution_audit (
            id bigserial PRIMARY KEY,
            resolved_at timestamptz NOT NULL DEFAULT now(),
            gid text NOT NULL,
            participant text NOT NULL,
            action text NOT NULL CHECK (action IN ('commit', 'rollback')),
            forced boolean NOT NULL,
            log_decision text NOT NULL,
            requested_by text NOT NULL,
            db_user text NOT NULL DEFAULT current_user,
            client_host text,
            reason text
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE txmgr_resolution_audit")

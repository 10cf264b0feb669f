"""Deadlock verdicts: the victims the deadlock detector cancelled, for them to read.

See :mod:`txmgr._verdict`. Rows live for moments (the victim deletes its own)
or at most ten minutes (the detector purges the rest): dropping the table
loses nothing a transaction's outcome depends on.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE txmgr_deadlock_victim (
            txid text PRIMARY KEY,
            detected_at timestamptz NOT NULL DEFAULT now(),
            others text[] NOT NULL,
            relations text[] NOT NULL,
            detail text NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE txmgr_deadlock_victim")

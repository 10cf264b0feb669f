"""Decision log: the log's identity and one row per committed global transaction.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row: the logid that every gid of this log carries, so that recovery
    # never reads an xid of another log against this cluster.
    op.execute(
        """
        CREATE TABLE txmgr_log_meta (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            logid text NOT NULL CHECK (logid ~ '^[0-9a-f]{8}$'),
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "INSERT INTO txmgr_log_meta (logid) "
        "VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 8))"
    )
    # A row exists from the commit of the decision until every branch is
    # committed; rows churn fast, so let autovacuum visit often.
    op.execute(
        """
        CREATE TABLE txmgr_decision (
            txid text PRIMARY KEY CHECK (txid ~ '^[0-9a-f]{16}$'),
            lxid xid8 NOT NULL,
            participants text[] NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.0,
                autovacuum_vacuum_threshold = 1000)
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE txmgr_decision")
    op.execute("DROP TABLE txmgr_log_meta")

"""Paxos mode: the acceptor's identity and one slot per global transaction.

A log database of the default mode may be at this revision or at 0002 (see
:func:`txmgr.log.read_logid`); a Paxos log database needs it. The DDL is
:data:`txmgr.paxos._schema.UPGRADE`, frozen there.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

from txmgr.errors import LogSchemaError
from txmgr.paxos._schema import DOWNGRADE, UPGRADE

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    # A slot may be the only record that an in-doubt branch must commit.
    bind = op.get_bind()
    bind.exec_driver_sql("LOCK TABLE txmgr_paxos IN ACCESS EXCLUSIVE MODE")
    pending = bind.exec_driver_sql("SELECT count(*) FROM txmgr_paxos").scalar()
    if pending:
        raise LogSchemaError(
            f"refusing to downgrade the Paxos log database: it holds {pending} transaction "
            "slot(s) whose branches may not all be finished; run `txmgr recover` until "
            "`txmgr status` shows nothing in doubt, then try again"
        )
    for statement in DOWNGRADE:
        op.execute(statement)

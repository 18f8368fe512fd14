"""the claim index for workers of chosen queues: ix_tasks_claim_queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built CONCURRENTLY, outside the migration's transaction: on a busy table a plain CREATE
    # INDEX would block every submit and claim until it finished. (With --sql the statement
    # is printed as it is; run it outside a transaction block.)
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_claim_queue",
            "tasks",
            ["queue", sa.text("priority DESC NULLS LAST"), "scheduled_at", "id"],
            postgresql_where=sa.text("state = 'pending'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_claim_queue",
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )

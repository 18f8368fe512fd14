"""the finished-task history's index: retention and status without a sequential scan

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built CONCURRENTLY, outside the migration's transaction, as in 0003: on a table that
    # already keeps millions of finished tasks, a plain CREATE INDEX would block every submit
    # and outcome until it finished.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_finished",
            "tasks",
            ["state", "completed_at"],
            postgresql_where=sa.text("completed_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_finished",
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )

"""children of tasks: tasks.parent_id and ix_tasks_parent

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: adding it rewrites nothing, whatever the table's size.
    op.add_column("tasks", sa.Column("parent_id", sa.Uuid(), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_parent",
            "tasks",
            ["parent_id"],
            postgresql_where=sa.text("parent_id IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_parent", table_name="tasks", postgresql_concurrently=True, if_exists=True
        )
    op.drop_column("tasks", "parent_id")

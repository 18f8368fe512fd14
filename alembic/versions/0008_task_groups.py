"""task groups: tasks.group_id, group_index, group_remaining, group_spec and ix_tasks_group

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: adding them rewrites nothing, whatever the table's size.
    op.add_column("tasks", sa.Column("group_id", sa.Uuid(), nullable=True))
    op.add_column("tasks", sa.Column("group_index", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("group_remaining", sa.Integer(), nullable=True))
    op.add_column(
        "tasks",
        sa.Column("group_spec", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_group",
            "tasks",
            ["group_id", "group_index"],
            postgresql_where=sa.text("group_id IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_group", table_name="tasks", postgresql_concurrently=True, if_exists=True
        )
    for column in ("group_spec", "group_remaining", "group_index", "group_id"):
        op.drop_column("tasks", column)

"""unique tasks: tasks.unique_key, tasks.unique_states and ix_tasks_unique

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: adding them rewrites nothing, whatever the table's size.
    op.add_column("tasks", sa.Column("unique_key", sa.Text(), nullable=True))
    op.add_column(
        "tasks", sa.Column("unique_states", postgresql.ARRAY(sa.String(20)), nullable=True)
    )
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_unique",
            "tasks",
            ["unique_key"],
            unique=True,
            postgresql_where=sa.text("unique_key IS NOT NULL AND state = ANY (unique_states)"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_unique", table_name="tasks", postgresql_concurrently=True, if_exists=True
        )
    op.drop_column("tasks", "unique_states")
    op.drop_column("tasks", "unique_key")

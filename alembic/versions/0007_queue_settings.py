"""queue settings: tasks_queues (pause and resume)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per steered queue; every claim reads it, so it stays small.
    op.create_table(
        "tasks_queues",
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_tasks_queues")),
    )


def downgrade() -> None:
    op.drop_table("tasks_queues")

"""cluster-wide limits: tasks_limits, and the stream index of the steered claim

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per limited queue or task name; the claim keeps its book in it.
    op.create_table(
        "tasks_limits",
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("rate", sa.Integer(), nullable=True),
        sa.Column("per_seconds", sa.Float(), nullable=True),
        sa.Column(
            "holders",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "starts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('queue', 'name')", name=op.f("ck_tasks_limits_kind")),
        sa.CheckConstraint(
            "concurrency IS NULL OR concurrency > 0", name=op.f("ck_tasks_limits_concurrency")
        ),
        sa.CheckConstraint(
            "(rate IS NULL AND per_seconds IS NULL) OR (rate > 0 AND per_seconds > 0)",
            name=op.f("ck_tasks_limits_rate"),
        ),
        sa.PrimaryKeyConstraint("kind", "key", name=op.f("pk_tasks_limits")),
    )
    # Built CONCURRENTLY, outside the migration's transaction, as in 0003: a plain CREATE
    # INDEX would block every submit and claim on a busy table until it finished.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_tasks_claim_stream",
            "tasks",
            ["queue", "name", sa.text("priority DESC NULLS LAST"), "scheduled_at", "id"],
            postgresql_where=sa.text("state = 'pending'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_tasks_claim_stream",
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_table("tasks_limits")

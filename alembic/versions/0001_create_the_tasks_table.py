"""create the tasks table

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION tasklib_notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    -- One notification per queue per statement, not per row. TG_ARGV[0] is the channel.
    FOR q IN SELECT DISTINCT queue FROM tasklib_new_rows WHERE state = 'pending' LOOP
        PERFORM pg_notify(TG_ARGV[0], q);
    END LOOP;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("queue", sa.String(length=100), server_default="default", nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "running",
                "completed",
                "failed",
                "cancelled",
                name="taskstate",
                native_enum=False,
                length=16,
            ),
            server_default="pending",
            nullable=False,
        ),
        sa.Column(
            "args", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "errors", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_retries", sa.Integer(), server_default="3", nullable=False),
        sa.Column("timeout_seconds", sa.Float(), nullable=True),
        sa.Column("chain", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "scheduled_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "state <> 'running' OR (worker_id IS NOT NULL AND locked_until IS NOT NULL AND started_at IS NOT NULL)",
            name=op.f("ck_tasks_running_owned"),
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_tasks_state"),
        ),
        sa.CheckConstraint(
            "state NOT IN ('completed', 'failed', 'cancelled') OR completed_at IS NOT NULL",
            name=op.f("ck_tasks_finished_at"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_tasks_attempts")),
        sa.CheckConstraint("max_retries >= 0", name=op.f("ck_tasks_max_retries")),
        sa.CheckConstraint(
            "timeout_seconds IS NULL OR timeout_seconds > 0", name=op.f("ck_tasks_timeout")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index(
        op.f("ix_tasks_claim"),
        "tasks",
        [sa.literal_column("priority DESC"), "scheduled_at", "id"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        op.f("ix_tasks_lease"),
        "tasks",
        ["locked_until"],
        unique=False,
        postgresql_where=sa.text("state = 'running'"),
    )
    # Wakes workers when tasks are inserted; PostgreSQL delivers the NOTIFY on commit only.
    # Written out here, not imported, so that this migration never changes after release.
    op.execute(NOTIFY_FUNCTION)
    op.execute(
        "CREATE TRIGGER tasks_tasklib_notify AFTER INSERT ON tasks "
        "REFERENCING NEW TABLE AS tasklib_new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION tasklib_notify_insert('tasklib_tasks')"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS tasks_tasklib_notify ON tasks")
    op.drop_index(
        op.f("ix_tasks_lease"), table_name="tasks", postgresql_where=sa.text("state = 'running'")
    )
    op.drop_index(
        op.f("ix_tasks_claim"), table_name="tasks", postgresql_where=sa.text("state = 'pending'")
    )
    op.drop_table("tasks")
    op.execute("DROP FUNCTION IF EXISTS tasklib_notify_insert()")

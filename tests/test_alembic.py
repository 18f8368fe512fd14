"""Alembic: the shipped migration, and a host project that autogenerates its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC = [sys.executable, "-m", "alembic"]


def alembic(cwd: Path, url: str, *args: str) -> str:
    env = {**os.environ, "TASKLIB_DATABASE_URL": url, "DATABASE_URL": url}
    proc = subprocess.run(
        [*ALEMBIC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"alembic {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def empty_database(engine: Engine) -> None:
    """The template database holds the tasks table already; these tests start from nothing."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE tasks"))
        conn.execute(text("DROP TABLE tasks_workers"))
        conn.execute(text("DROP TABLE tasks_queues"))
        conn.execute(text("DROP TABLE tasks_limits"))
        conn.execute(text("DROP FUNCTION tasklib_notify_insert()"))


def triggers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars()
        )


def test_shipped_migration_upgrade_check_downgrade(db_url: str, sync_engine: Engine) -> None:
    empty_database(sync_engine)
    alembic(ROOT, db_url, "upgrade", "head")
    assert triggers(sync_engine) == ["tasks_tasklib_notify"]
    out = alembic(ROOT, db_url, "check")  # autogenerate finds no difference with the model
    assert "No new upgrade operations detected" in out
    alembic(ROOT, db_url, "downgrade", "base")
    with sync_engine.connect() as conn:
        assert conn.scalar(text("SELECT to_regclass('tasks')")) is None
        assert conn.scalar(text("SELECT to_regclass('tasks_workers')")) is None


def test_shipped_migration_as_plain_sql(db_url: str) -> None:
    sql = alembic(ROOT, db_url, "upgrade", "head", "--sql")
    assert "CREATE TABLE tasks" in sql
    assert (
        "CREATE INDEX ix_tasks_claim ON tasks (priority DESC, scheduled_at, id) WHERE state = 'pending'"
        in sql
    )
    assert "CREATE TRIGGER tasks_tasklib_notify" in sql
    assert "CREATE TABLE tasks_workers" in sql


HOST_MODELS = """
from sqlalchemy import ForeignKey, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import TaskMixin


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={"pk": "pk_%(table_name)s"})


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Job(TaskMixin, Base):
    __tablename__ = "jobs"
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"))
"""


@pytest.mark.timeout(120)
def test_host_project_autogenerates_the_task_table(
    db_url: str, sync_engine: Engine, tmp_path: Path
) -> None:
    """Exactly the steps docs/alembic.md gives a host app."""
    empty_database(sync_engine)
    (tmp_path / "hostapp.py").write_text(HOST_MODELS)
    alembic(tmp_path, db_url, "init", "-t", "async", "migrations")
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text()
        .replace(
            "target_metadata = None", "from hostapp import Base\ntarget_metadata = Base.metadata"
        )
        .replace(
            "config = context.config\n",
            "config = context.config\nimport os\nconfig.set_main_option('sqlalchemy.url', os.environ['DATABASE_URL'])\n",
        )
    )
    alembic(tmp_path, db_url, "revision", "--autogenerate", "-m", "tasks")
    (migration,) = (tmp_path / "migrations" / "versions").glob("*.py")
    source = migration.read_text()
    assert "op.create_table('jobs'" in source or 'op.create_table("jobs"' in source
    assert "ix_jobs_claim" in source and "ck_jobs_state" in source
    # The one manual step: the NOTIFY trigger, which autogenerate cannot see.
    # The one manual step, at the end of upgrade(): the NOTIFY trigger, which autogenerate
    # cannot see.
    end_of_upgrade = "    # ### end Alembic commands ###"
    migration.write_text(
        source.replace(
            end_of_upgrade,
            "    from tasklib_sqla import notify_trigger_sql\n"
            '    for statement in notify_trigger_sql("jobs"):\n'
            "        op.execute(statement)\n" + end_of_upgrade,
            1,
        )
    )
    alembic(tmp_path, db_url, "upgrade", "head")
    out = alembic(tmp_path, db_url, "check")
    assert "No new upgrade operations detected" in out
    assert triggers(sync_engine) == ["jobs_tasklib_notify"]


def test_migrate_from_python_in_a_checkout(db_url: str, sync_engine: Engine) -> None:
    from tasklib_sqla.migrate import current, downgrade, migrate, migrations_dir

    assert migrations_dir() == ROOT / "alembic"  # a checkout: the repository's own scripts
    empty_database(sync_engine)
    migrate(db_url)
    assert "0010 (head)" in current(db_url)
    assert triggers(sync_engine) == ["tasks_tasklib_notify"]
    downgrade(db_url, "base")
    with sync_engine.connect() as conn:
        assert conn.scalar(text("SELECT to_regclass('tasks')")) is None

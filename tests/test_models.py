"""The schema: constraints, indexes, a host app's own model built from TaskMixin, the FAQ's SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, Integer, String, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import Config, Task, TaskClient, TaskMixin, TaskState, schema_sql
from tests import tasks as t


class HostBase(DeclarativeBase):
    pass


class Tenant(HostBase):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class HostTask(TaskMixin, HostBase):
    """A host app's own task model, with columns of its own."""

    __tablename__ = "app_jobs"
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)


@pytest.fixture
async def host_engine(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    async with engine.begin() as conn:
        await conn.run_sync(HostBase.metadata.create_all)
    yield engine


def test_id_is_known_at_construction() -> None:
    a, b = Task(name="x"), HostTask(name="y")
    assert a.id is not None and b.id is not None and a.id != b.id
    assert a.state is TaskState.PENDING and a.args == {} and a.errors == []


def test_state_is_a_str_enum() -> None:
    assert TaskState.FAILED == "failed"  # type: ignore[comparison-overlap]  # it is a str
    assert Task(name="x", state="running").state == "running"


async def test_host_model_end_to_end(host_engine: AsyncEngine, config: Config) -> None:
    client = TaskClient(config, model=HostTask, engine=host_engine)
    async with AsyncSession(host_engine) as session, session.begin():
        session.add(Tenant(id=1, name="acme"))
        await session.flush()
        rolled_back = client.add(session, t.add, a=1)
        await session.rollback()
    async with AsyncSession(host_engine) as session, session.begin():
        session.add(Tenant(id=1, name="acme"))
        await session.flush()
        task_id = client.add(session, t.add, a=1)
        # The host's own column, set on the row the library added to the session.
        row = await session.get(HostTask, task_id)
        assert row is not None
        row.tenant_id = 1
    assert await client.get(rolled_back) is None
    got = await client.get(task_id)
    assert isinstance(got, HostTask) and got.tenant_id == 1 and got.args == {"a": 1, "b": 1}
    assert await client.is_completed(task_id) is False
    async with AsyncSession(host_engine) as session:
        failed = (await session.scalars(select(HostTask).where(HostTask.state == "failed"))).all()
        assert failed == []
    # The foreign key is the host's: a bad tenant is refused by the database.
    async with AsyncSession(host_engine) as session:
        with pytest.raises(IntegrityError):
            async with session.begin():
                client.add(session, t.add, a=2)
                (await session.get(HostTask, task_id))  # keeps the session busy
                session.add(HostTask(name="tests.add", tenant_id=99))


@pytest.mark.parametrize(
    "values",
    [
        {"state": "sleeping"},
        {"attempts": -1},
        {"max_retries": -1},
        {"timeout_seconds": 0},
        {"state": "running"},  # running without an owner and a lease
        {"state": "completed"},  # finished without completed_at
    ],
)
async def test_check_constraints(engine: AsyncEngine, values: dict[str, Any]) -> None:
    # Raw SQL: the database itself must refuse, whatever the client sends.
    ((column, value),) = values.items()
    async with engine.connect() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(
                text(f"INSERT INTO tasks (name, {column}) VALUES ('x', :v)"), {"v": value}
            )


async def test_claim_plan_uses_partial_index(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tasks (name, state, completed_at) "
                "SELECT 'tests.add', 'completed', now() FROM generate_series(1, 20000)"
            )
        )
        await conn.execute(
            text("INSERT INTO tasks (name) SELECT 'tests.add' FROM generate_series(1, 50)")
        )
        await conn.execute(text("ANALYZE tasks"))
        plan = "\n".join(
            r[0]
            for r in await conn.execute(
                text(
                    "EXPLAIN SELECT id FROM tasks WHERE state = 'pending' AND scheduled_at <= now() "
                    "ORDER BY priority DESC, scheduled_at LIMIT 10 FOR UPDATE SKIP LOCKED"
                )
            )
        )
    assert "ix_tasks_claim" in plan, plan


async def test_faq_sql_snippets_run(engine: AsyncEngine, client: TaskClient[Any]) -> None:
    task_id = await client.submit(t.add, a=1)
    snippets = [
        "SELECT id, name, state, result, error FROM tasks WHERE id = :id",
        "SELECT worker_id, COUNT(*) as locked_tasks FROM tasks WHERE state = 'running' "
        "GROUP BY worker_id",
        "SELECT id, name, locked_until FROM tasks WHERE state = 'running' AND locked_until < NOW()",
        "DELETE FROM tasks WHERE state = 'completed' AND completed_at < NOW() - INTERVAL '30 days'",
        "UPDATE tasks SET state = 'pending', worker_id = NULL, locked_until = NULL "
        "WHERE state = 'running' AND locked_until < NOW()",
    ]
    async with engine.begin() as conn:
        for sql in snippets:
            await conn.execute(text(sql), {"id": task_id} if ":id" in sql else {})
        row = (await conn.execute(text(snippets[0]), {"id": task_id})).one()
    assert row.state == "pending" and row.name == "tests.add"


def test_schema_sql_has_table_indexes_and_trigger() -> None:
    sql = schema_sql(Task)
    assert "CREATE TABLE tasks" in sql
    assert (
        "CREATE INDEX ix_tasks_claim ON tasks (priority DESC, scheduled_at, id) WHERE state = 'pending'"
        in sql
    )
    assert "CREATE TRIGGER tasks_tasklib_notify AFTER INSERT ON tasks" in sql
    assert "CREATE TABLE tasks_workers" in sql
    assert "CREATE TABLE tasks_queues" in sql


async def test_schema_sql_applies_to_an_empty_database(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE tasks, tasks_workers, tasks_queues, tasks_limits"))
        raw = await conn.get_raw_connection()
        await raw.driver_connection.execute(schema_sql(Task))  # type: ignore[union-attr]
        await conn.execute(insert(Task).values(name="x"))
        assert await conn.scalar(select(func.count()).select_from(Task)) == 1


async def test_worker_runs_a_host_models_tasks(host_engine: AsyncEngine, config: Config) -> None:
    """Claiming, finishing, chains and rescue all work on the host's own table."""
    from tasklib_sqla import TaskWorker

    client = TaskClient(config, model=HostTask, engine=host_engine)
    async with AsyncSession(host_engine) as session, session.begin():
        session.add(Tenant(id=1, name="acme"))
        await session.flush()
        tid = client.add(session, t.add.then(t.add, "a", b=100), a=1, b=1)
        (await session.get(HostTask, tid)).tenant_id = 1  # type: ignore[union-attr]
    worker = TaskWorker(
        config, model=HostTask, registry=t.registry, burst=True, handle_signals=False
    )
    stats = await worker.run()
    async with AsyncSession(host_engine) as session:
        jobs = (await session.scalars(select(HostTask).order_by(HostTask.created_at))).all()
    assert [(j.state, j.result, j.tenant_id) for j in jobs] == [
        ("completed", 2, 1),
        ("completed", 102, None),
    ]
    assert stats.completed == 2
    async with host_engine.connect() as conn:  # and the library's own table was never touched
        assert await conn.scalar(select(func.count()).select_from(Task)) == 0

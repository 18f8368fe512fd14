"""Columns of the host's own on a TaskMixin model, set at submit time."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import Date, ForeignKey, MetaData, String, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bench.claim_plans import explain, worker_params
from tasklib_sqla import (
    Config,
    ConfigError,
    TaskArgumentsError,
    TaskMixin,
    TaskRegistry,
    TaskWorker,
    add_task,
    claim_index,
    get_client,
    submit_task,
    submit_tasks,
    task_table_args,
)
from tasklib_sqla.cli import _where
from tasklib_sqla.queries import claim_params
from tasklib_sqla.testing import TaskQueue, TestDatabase
from tests import tasks as t


class HostBase(DeclarativeBase):
    pass


class Tenant(HostBase):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class HostTask(TaskMixin, HostBase):
    __tablename__ = "host_tasks"

    __table_args__ = (*task_table_args("host_tasks"), claim_index("host_tasks", "tenant_id"))

    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), default=None)
    due_on: Mapped[dt.date | None] = mapped_column(Date, default=None)


@pytest.fixture
def tasklib_metadata() -> MetaData:
    return HostBase.metadata


@pytest.fixture
def tasklib_model() -> type[TaskMixin]:
    return HostTask


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


@pytest.fixture
async def tenants(tasklib_database: TestDatabase) -> None:
    engine = create_async_engine(tasklib_database.url)
    async with AsyncSession(engine) as s, s.begin():
        s.add_all([Tenant(id=7, name="acme"), Tenant(id=8, name="globex")])
    await engine.dispose()


async def test_outbox_standalone_and_batch_set_host_columns(
    tasklib: TaskQueue, tasklib_database: TestDatabase, tenants: None
) -> None:
    engine = create_async_engine(tasklib_database.url)
    try:
        async with AsyncSession(engine) as session, session.begin():
            add_task(session, t.add.options(columns={"tenant_id": 7}), a=1)
    finally:
        await engine.dispose()
    day = dt.date(2026, 12, 24)
    await submit_task(t.add.options(columns={"tenant_id": 8, "due_on": day}), a=2)
    await submit_tasks(t.add.options(columns={"tenant_id": 8}), [{"a": 3}, {"a": 4}])

    rows = {r.args["a"]: r for r in await tasklib.asubmitted(t.add)}
    assert {a: r.tenant_id for a, r in rows.items()} == {1: 7, 2: 8, 3: 8, 4: 8}
    assert rows[2].due_on == day and rows[1].due_on is None
    report = await tasklib.arun()
    assert len(report.completed) == 4  # workers run them as any other task


async def test_unknown_columns_are_refused_before_anything_is_written(
    tasklib: TaskQueue, tenants: None
) -> None:
    with pytest.raises(TaskArgumentsError, match=r"no column 'tenant'; its own columns: due_on"):
        await submit_task(t.add.options(columns={"tenant": 7}), a=1)
    with pytest.raises(TaskArgumentsError, match="the library's own column"):
        t.add.options(columns={"queue": "x"})
    await tasklib.aassert_not_submitted(t.add)


async def test_the_database_still_checks_the_values(tasklib: TaskQueue, tenants: None) -> None:
    # A tenant that does not exist: the foreign key refuses the row, as it should.
    with pytest.raises(Exception, match="foreign key"):
        await submit_task(t.add.options(columns={"tenant_id": 99}), a=1)
    await tasklib.aassert_not_submitted(t.add)


async def test_a_worker_restricted_to_one_tenant(
    tasklib: TaskQueue, tasklib_database: TestDatabase, tenants: None
) -> None:
    await submit_tasks(t.add.options(columns={"tenant_id": 7}), [{"a": n} for n in range(3)])
    await submit_tasks(t.add.options(columns={"tenant_id": 8}), [{"a": n} for n in range(4)])
    await submit_task(t.add, a=100)  # no tenant
    config = tasklib.config
    one = TaskWorker(
        config, model=HostTask, registry=t.registry, burst=True, where={"tenant_id": 7}
    )
    stats = await one.run()  # burst: its "anything due?" probe sees its own rows only
    assert stats.completed == 3
    engine = create_async_engine(tasklib_database.url)
    try:
        async with AsyncSession(engine) as s:
            rows = (await s.execute(select(HostTask.tenant_id, HostTask.state))).all()
        by_tenant = {(tenant, str(state)) for tenant, state in rows}
        assert by_tenant == {(7, "completed"), (8, "pending"), (None, "pending")}
        both = TaskWorker(
            config,
            model=HostTask,
            registry=t.registry,
            burst=True,
            where=HostTask.tenant_id.in_([7, 8]),
        )
        assert (await both.run()).completed == 4
    finally:
        await engine.dispose()


async def test_limits_and_pauses_on_a_host_table(
    tasklib: TaskQueue, tasklib_database: TestDatabase, tenants: None
) -> None:
    """A TaskMixin model's own host_tasks_limits and host_tasks_queues, with a tenant pool."""
    assert {"host_tasks_limits", "host_tasks_queues"} <= set(HostBase.metadata.tables)
    client = get_client()
    await client.set_limit(name=t.add, rate=2, per=1)
    await client.pause_queue("mail")
    await submit_tasks(t.add.options(columns={"tenant_id": 7}), [{"a": n} for n in range(5)])
    await submit_task(t.add.options(queue="mail", columns={"tenant_id": 7}), a=9)
    await submit_task(t.async_add.options(columns={"tenant_id": 7}), a=1, b=2)
    await submit_task(t.async_add.options(columns={"tenant_id": 8}), a=1, b=2)
    worker = TaskWorker(
        tasklib.config, model=HostTask, registry=t.registry, burst=True, where={"tenant_id": 7}
    )
    # Burst mode waits for what a limit holds back (it is due): 5 starts at 2 a second.
    stats = await asyncio.wait_for(worker.run(), 20)
    assert stats.completed == 6
    engine = create_async_engine(tasklib_database.url)
    try:
        async with AsyncSession(engine) as s:
            rows = (
                await s.execute(select(HostTask.queue, HostTask.tenant_id, HostTask.state))
            ).all()
            starts = (
                await s.execute(
                    text(
                        "SELECT count(*) FROM host_tasks a JOIN host_tasks b ON b.name = a.name "
                        "AND b.started_at >= a.started_at "
                        "AND b.started_at < a.started_at + interval '1 second' "
                        "WHERE a.name = 'tests.add' GROUP BY a.id ORDER BY 1 DESC LIMIT 1"
                    )
                )
            ).scalar()
    finally:
        await engine.dispose()
    left = {(q, tenant, str(state)) for q, tenant, state in rows if str(state) != "completed"}
    assert left == {("mail", 7, "pending"), ("default", 8, "pending")}
    assert starts == 2  # never more than 2 starts of tests.add in any second


def test_where_names_real_columns() -> None:
    with pytest.raises(ConfigError, match=r"\['tenant'\] are not columns of 'host_tasks'"):
        TaskWorker(Config(), model=HostTask, registry=t.registry, where={"tenant": 1})
    assert _where(HostTask, ["tenant_id=7"]) == {"tenant_id": 7}
    with pytest.raises(ConfigError, match="COLUMN=VALUE"):
        _where(HostTask, ["tenant=7"])
    with pytest.raises(ConfigError, match="invalid literal"):
        _where(HostTask, ["tenant_id=seven"])


async def test_the_restricted_claim_reads_the_tenant_index(
    tasklib: TaskQueue, tasklib_database: TestDatabase, tenants: None
) -> None:
    """Another tenant's backlog of 20,000 rows: the claim goes straight to its own rows."""
    engine = create_async_engine(tasklib_database.url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO host_tasks (id, name, args, tenant_id) "
                    "SELECT gen_random_uuid(), 'tests.add', '{\"a\": 1}', 8 "
                    "FROM generate_series(1, 20000)"
                )
            )
            await conn.execute(text("ANALYZE host_tasks"))
        worker = TaskWorker(
            tasklib.config, model=HostTask, registry=t.registry, where={"tenant_id": 7}
        )
        async with engine.connect() as conn:
            params = {**worker_params(()), **claim_params(sorted(t.registry.names), [])}
            plan = await explain(conn, worker._queries.claim, params)
    finally:
        await engine.dispose()
    assert "ix_host_tasks_claim_by_tenant_id" in plan, plan
    assert "Seq Scan" not in plan, plan

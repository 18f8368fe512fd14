"""TaskContext: a task's knowledge of itself, and children that record their parent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tasklib_sqla import (
    CONTEXT,
    TaskArgumentsError,
    TaskContext,
    TaskDefinition,
    TaskDefinitionError,
    TaskRegistry,
    submit_task,
)
from tasklib_sqla.testing import TaskQueue, TestDatabase
from tests import tasks as t


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


async def test_a_task_sees_its_own_id_attempt_and_worker(tasklib: TaskQueue) -> None:
    task_id = await submit_task(t.ctx_info.options(queue="mail"), fail_first=True)
    report = await tasklib.arun(check=False)
    (row,) = report.completed
    assert row.attempts == 2
    assert row.result == {
        "id": str(task_id),
        "name": "tests.ctx_info",
        "queue": "mail",
        "attempt": 2,
        "max_retries": 2,
        "worker_id": row.worker_id,
        "is_last_attempt": False,
        "waited": True,
    }
    assert row.worker_id.startswith("pytest-")


@pytest.mark.parametrize(
    "spawner",
    [t.ctx_spawn, t.ctx_spawn_thread, t.ctx_spawn_child],
    ids=["async", "sync on a thread", "timed sync in a child process"],
)
async def test_children_submitted_through_the_context_record_their_parent(
    tasklib: TaskQueue, spawner: TaskDefinition[..., str]
) -> None:
    parent_id = await submit_task(spawner, n=7)
    await tasklib.arun()
    child = await tasklib.aassert_submitted(t.add, a=7)
    assert child.parent_id == parent_id and child.state == "completed" and child.result == 8
    parent = await tasklib.aassert_submitted(spawner)
    assert parent.parent_id is None
    assert str(child.id) in parent.result


async def test_a_chains_next_step_records_the_step_before(tasklib: TaskQueue) -> None:
    first_id = await submit_task(t.add.then(t.add, "a"), a=1, b=1)
    await tasklib.arun()
    rows = await tasklib.asubmitted(t.add)
    (second,) = [r for r in rows if r.id != first_id]
    assert second.parent_id == first_id and second.result == 3


async def test_the_context_is_not_an_argument(tasklib: TaskQueue) -> None:
    with pytest.raises(TaskArgumentsError, match="TaskContext, which the worker passes"):
        await submit_task(t.ctx_spawn, n=1, ctx=CONTEXT)
    await tasklib.aassert_not_submitted(t.ctx_spawn)  # refused before anything was written
    # Not stored either: the arguments hold only what the caller gave.
    assert t.ctx_spawn.dump_args((), {"n": 1}) == '{"n":1}'


def test_the_context_parameter_needs_the_context_default() -> None:
    reg = TaskRegistry()
    with pytest.raises(TaskDefinitionError, match="default CONTEXT"):

        @reg.task(name="bad.ctx")
        def bad(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError, match="more than one"):

        @reg.task(name="bad.two")
        def two(a: TaskContext = CONTEXT, b: TaskContext = CONTEXT) -> None: ...


async def test_a_direct_call_gets_a_placeholder_that_says_so() -> None:
    with pytest.raises(RuntimeError, match="no task context here"):
        await t.ctx_spawn(1)


async def test_add_puts_a_child_in_the_callers_transaction(
    tasklib: TaskQueue, tasklib_database: TestDatabase
) -> None:
    parent = uuid.uuid4()
    ctx = TaskContext(
        id=parent,
        name="tests.ctx_spawn",
        queue="default",
        attempt=1,
        max_retries=3,
        worker_id="w",
        scheduled_at=None,
        started_at=datetime.now(UTC),
    )
    engine = create_async_engine(tasklib_database.url)
    try:
        async with AsyncSession(engine) as session:
            async with session.begin():
                ctx.add(session, t.add, a=5)
                await session.rollback()
            async with session.begin():
                child_id = ctx.add(session, t.add, a=6)
    finally:
        await engine.dispose()
    child = await tasklib.aassert_submitted(t.add, a=6)
    assert child.id == child_id and child.parent_id == parent
    await tasklib.aassert_not_submitted(t.add, a=5)

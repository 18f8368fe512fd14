"""Inspecting and managing tasks, standalone and through a caller's session; init() and globals."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import tasklib_sqla
from tasklib_sqla import (
    Config,
    ConfigError,
    Task,
    TaskClient,
    TaskNotFoundError,
    TaskState,
    cancel_task,
    get_task,
    is_completed,
    retry_task,
    submit_task,
)
from tasklib_sqla import client as client_module
from tests import tasks as t


@pytest.fixture
def global_client(config: Config, engine: AsyncEngine) -> Iterator[TaskClient[Any]]:
    saved = client_module._client
    yield tasklib_sqla.init(config, engine=engine)
    client_module._client = saved


async def mark(engine: AsyncEngine, task_id: uuid.UUID, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == task_id).values(**values))


async def test_standalone_functions_need_init(config: Config) -> None:
    saved = client_module._client
    client_module._client = None
    try:
        with pytest.raises(ConfigError, match="init"):
            await submit_task(t.add, a=1)
        with pytest.raises(ConfigError, match="init"):
            await get_task(uuid.uuid4())
    finally:
        client_module._client = saved


async def test_get_task_and_is_completed(
    global_client: TaskClient[Any], engine: AsyncEngine
) -> None:
    task_id = await submit_task(t.add, a=1, b=2)
    task = await get_task(task_id)
    assert task is not None and task.state == "pending" and task.result is None
    assert await is_completed(task_id) is False
    await mark(engine, task_id, state=TaskState.COMPLETED, result=3, completed_at=text("now()"))
    task = await get_task(str(task_id))  # ids as strings work too
    assert task is not None and task.state is TaskState.COMPLETED and task.result == 3
    assert task.is_finished
    assert await is_completed(task_id) is True
    assert await get_task(uuid.uuid4()) is None
    with pytest.raises(TaskNotFoundError):
        await is_completed(uuid.uuid4())
    # A malformed id names no task, like an unknown one: None, and not-found for is_completed.
    assert await get_task("not-a-uuid") is None
    with pytest.raises(TaskNotFoundError):
        await is_completed("not-a-uuid")
    assert await tasklib_sqla.cancel_task("not-a-uuid") is False
    assert await tasklib_sqla.retry_task("") is False


async def test_with_async_session_sees_uncommitted_task(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        task_id = tasklib_sqla.add_task(session, t.add, a=1)
        task = await get_task(task_id, session=session)  # no init() needed with a session
        assert task is not None and task.state == "pending"
        assert await is_completed(task_id, session=session) is False


def test_with_sync_session(sync_engine: Engine) -> None:
    with Session(sync_engine) as session, session.begin():
        task_id = tasklib_sqla.add_task(session, t.add, a=1)
        session.flush()
        task = get_task(task_id, session=session)  # a plain call, no await
        assert task is not None and task.args == {"a": 1, "b": 1}
        assert is_completed(task_id, session=session) is False
        assert cancel_task(task_id, session=session) is True
        assert get_task(task_id, session=session).state == "cancelled"
        assert retry_task(task_id, session=session) is True
        assert session.scalar(select(Task.state).where(Task.id == task_id)) == "pending"


async def test_cancel_and_retry(client: TaskClient[Any], engine: AsyncEngine) -> None:
    task_id = await client.submit(t.add, a=1)
    assert await client.retry(task_id) is False  # pending: nothing to retry
    assert await client.cancel(task_id) is True
    assert await client.cancel(task_id) is False  # already cancelled
    row = await client.get(task_id)
    assert row is not None and row.state == "cancelled" and row.completed_at is not None

    failed = await client.submit(t.always_fails, message="x")  # max_retries=2
    await mark(
        engine,
        failed,
        state=TaskState.FAILED,
        attempts=3,
        error="boom",
        completed_at=text("now()"),
        worker_id="w1",
    )
    assert await client.retry(failed) is True
    row = await client.get(failed)
    assert row is not None
    assert (row.state, row.attempts, row.max_retries, row.error) == ("pending", 3, 3, "boom")
    assert row.completed_at is None and row.worker_id is None


async def test_purge(client: TaskClient[Any], engine: AsyncEngine) -> None:
    old = await client.submit(t.add, a=1)
    new = await client.submit(t.add, a=2)
    pending = await client.submit(t.add, a=3)
    await mark(
        engine, old, state=TaskState.COMPLETED, completed_at=text("now() - interval '31 days'")
    )
    await mark(engine, new, state=TaskState.COMPLETED, completed_at=text("now()"))
    assert await client.purge(timedelta(days=30)) == 1
    assert await client.get(old) is None
    assert await client.get(new) is not None and await client.get(pending) is not None
    with pytest.raises(ValueError, match="finished"):
        await client.purge(timedelta(days=1), states=frozenset({TaskState.PENDING}))

"""Unique tasks: one row per key while its holder is in one of the unique states."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tasklib_sqla import (
    Config,
    Task,
    TaskArgumentsError,
    TaskClient,
    TaskWorker,
    add_task,
    add_tasks,
    insert_task,
)
from tests import tasks as t


async def count(engine: AsyncEngine) -> int:
    async with AsyncSession(engine) as s:
        return int(await s.scalar(select(func.count()).select_from(Task)) or 0)


async def drain(config: Config) -> None:
    await TaskWorker(config, registry=t.registry, burst=True, handle_signals=False).run()


async def test_a_second_submit_returns_the_first_task(
    client: TaskClient[Any], engine: AsyncEngine, config: Config
) -> None:
    fn = t.add.options(unique_key="nightly")
    first = await client.submit(fn, a=1)
    second = await client.submit(fn, a=2)  # other arguments, same key: the same task
    assert second == first and await count(engine) == 1
    other = await client.submit(t.async_add.options(unique_key="nightly"), a=1, b=1)
    assert other != first  # keys are per task name
    await drain(config)
    # Finished, the key is free again (default unique states: pending and running).
    third = await client.submit(fn, a=3)
    assert third != first and await count(engine) == 3


async def test_keys_made_of_chosen_arguments(client: TaskClient[Any], engine: AsyncEngine) -> None:
    fn = t.add.options(unique_on=["a"])
    one = await client.submit(fn, a=1, b=1)
    assert await client.submit(fn, a=1, b=2) == one  # b is not part of the key
    assert await client.submit(fn, a=2, b=1) != one
    async with AsyncSession(engine) as s:
        keys = sorted((await s.scalars(select(Task.unique_key))).all(), key=str)
    assert keys == ['tests.add:{"a":1}', 'tests.add:{"a":2}']


async def test_unique_states_can_cover_finished_tasks(
    client: TaskClient[Any], engine: AsyncEngine, config: Config
) -> None:
    fn = t.add.options(unique_key="once", unique_states=["pending", "running", "completed"])
    first = await client.submit(fn, a=1)
    await drain(config)
    assert await client.submit(fn, a=1) == first  # completed still holds the key
    assert await count(engine) == 1


async def test_a_batch_gets_the_holders_ids(client: TaskClient[Any], engine: AsyncEngine) -> None:
    fn = t.add.options(unique_on=["a"])
    held = await client.submit(fn, a=1)
    handles = await client.submit_many(fn, [{"a": 1}, {"a": 2}, {"a": 2}, {"a": 3}])
    assert handles[0] == held and handles[1] == handles[2] and handles[3] not in handles[:3]
    assert await count(engine) == 3


def test_in_a_sync_session_the_key_is_checked_at_once(sync_engine: Engine) -> None:
    fn = t.add.options(unique_key="outbox")
    with Session(sync_engine) as s, s.begin():
        first = add_task(s, fn, a=1)
        assert add_task(s, fn, a=2) == first  # seen in the same transaction
        more = add_tasks(s, fn, [{"a": 3}])
        assert more == [first]
    with Session(sync_engine) as s:
        assert s.scalar(select(func.count()).select_from(Task)) == 1
    with Session(sync_engine) as s, s.begin():  # a rollback leaves nothing behind
        add_task(s, t.add.options(unique_key="gone"), a=1)
        s.rollback()
    with Session(sync_engine) as s:
        assert s.scalar(select(func.count()).select_from(Task)) == 1


async def test_in_an_async_session_insert_task_checks_the_key(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    fn = t.add.options(unique_key="async-outbox")
    held = await client.submit(fn, a=1)
    async with AsyncSession(engine) as s, s.begin():
        with pytest.raises(TaskArgumentsError, match="await insert_task"):
            add_task(s, fn, a=2)
        assert await insert_task(s, fn, a=2) == held
        fresh = await insert_task(s, t.add.options(unique_key="new"), a=1)
        plain = await insert_task(s, t.add, a=5)  # not unique: inserted now all the same
    assert await count(engine) == 3
    assert fresh != held and plain not in (fresh, held)


async def test_fifty_concurrent_submitters_make_one_row(
    db_url: str, config: Config, engine: AsyncEngine
) -> None:
    racing = create_async_engine(db_url, pool_size=50, max_overflow=0)
    try:
        c: TaskClient[Task] = TaskClient(config, engine=racing)
        fn = t.add.options(unique_on=["a"])
        # Every submitter holds a connection first, so that all INSERTs race at once.
        conns = [await racing.connect() for _ in range(50)]
        for conn in conns:
            await conn.close()
        handles = await asyncio.gather(*(c.submit(fn, a=7, b=n) for n in range(50)))
    finally:
        await racing.dispose()
    assert len(set(handles)) == 1
    assert await count(engine) == 1


def test_a_key_held_by_an_uncommitted_transaction_waits_for_it(
    sync_engine: Engine, config: Config
) -> None:
    """The second submitter waits for the first's transaction: its key is taken on commit."""
    fn = t.add.options(unique_key="pending-commit")
    got: list[uuid.UUID] = []
    with Session(sync_engine) as s, s.begin():
        first = add_task(s, fn, a=1)
        client: TaskClient[Task] = TaskClient(config)
        waiter = threading.Thread(target=lambda: got.append(client.submit_sync(fn, a=2)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not got  # blocked on the unique index
    waiter.join(10)
    assert got == [first]


def test_options_are_checked() -> None:
    with pytest.raises(TaskArgumentsError, match="not both"):
        t.add.options(unique_key="k", unique_on=["a"])
    with pytest.raises(TaskArgumentsError, match="unknown: \\['c'\\]"):
        t.add.options(unique_on=["c"])
    with pytest.raises(TaskArgumentsError, match="unique_states must be among"):
        t.add.options(unique_key="k", unique_states=["done"])
    with pytest.raises(TaskArgumentsError, match="needs unique_key or unique_on"):
        t.add.options(unique_states=["pending"])

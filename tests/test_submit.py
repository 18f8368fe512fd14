"""Submitting: inside the caller's transaction (async and sync sessions), standalone, batches."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from tasklib_sqla import (
    Config,
    Task,
    TaskArgumentsError,
    TaskClient,
    TaskState,
    add_task,
    add_tasks,
)
from tasklib_sqla.urls import asyncpg_dsn
from tests import tasks as t


async def count_tasks(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(Task)) or 0)


async def test_add_task_async_commit_and_rollback(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        task_id = add_task(session, t.add, a=2, b=3)
        assert isinstance(task_id, uuid.UUID)  # known before any flush
        await session.rollback()
    assert await count_tasks(engine) == 0

    async with AsyncSession(engine) as session, session.begin():
        task_id = add_task(session, t.add, a=2, b=3)
    async with AsyncSession(engine) as session:
        row = await session.get(Task, task_id)
        assert row is not None
        assert row.name == "tests.add"
        assert row.args == {"a": 2, "b": 3}
        assert row.state is TaskState.PENDING
        assert row.max_retries == 3
        assert row.attempts == 0


def test_add_task_sync_session(sync_engine: Engine) -> None:
    with Session(sync_engine) as session:
        add_task(session, t.add, a=1)
        session.flush()  # written, but the transaction is still open...
        session.rollback()  # ...and rolled back
    with Session(sync_engine) as session, session.begin():
        task_id = add_task(session, t.add, 1)  # positional arguments bind by name
    with Session(sync_engine) as session:
        row = session.get(Task, task_id)
        assert row is not None and row.args == {"a": 1, "b": 1}
        assert session.scalar(select(func.count()).select_from(Task)) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": "5"}, "valid integer"),  # strict: no str -> int coercion
        ({"a": 1.5}, "valid integer"),
        ({}, "Field required"),
        ({"a": 1, "c": 2}, "Extra inputs"),
        ({"a": True}, "valid integer"),
    ],
)
async def test_invalid_arguments_write_nothing(
    engine: AsyncEngine, kwargs: dict[str, Any], match: str
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(TaskArgumentsError, match=match):
            add_task(session, t.add, **kwargs)
        assert not session.new
    assert await count_tasks(engine) == 0


async def test_non_json_arguments_are_a_value_error(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    class NotJson:
        pass

    with pytest.raises(ValueError, match="not JSON-serializable"):
        await client.submit(t.echo, data={"key": NotJson()})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        await client.submit(t.echo, data={"key": float("nan")})
    with pytest.raises(ValueError, match="valid dictionary or instance of Order"):
        await client.submit(
            t.rich,
            when=datetime.now(UTC),
            ident=uuid.uuid4(),
            color=t.Color.RED,
            point=t.Point(1, 2),
            order=NotJson(),  # type: ignore[arg-type]  # mypy catches it before the runtime does
        )
    with pytest.raises(TypeError, match="@task"):
        await client.submit(print)  # type: ignore[arg-type]
    assert await count_tasks(engine) == 0


async def test_rich_types_round_trip(client: TaskClient[Any], engine: AsyncEngine) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.uuid4()
    task_id = await client.submit(
        t.rich,
        when=when,
        ident=ident,
        color=t.Color.BLUE,
        point=t.Point(3, 4),
        order=t.Order(sku="abc", quantity=2),
    )
    row = await client.get(task_id)
    assert row is not None
    assert row.args == {
        "when": "2026-01-02T03:04:05Z",
        "ident": str(ident),
        "color": "blue",
        "point": {"x": 3, "y": 4},
        "order": {"sku": "abc", "quantity": 2},
    }
    # What the worker does: the stored JSON validates back into the declared types.
    async with engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT args::text FROM tasks WHERE id = :id"), {"id": task_id}
        )
    kwargs = t.rich.load_args(stored)
    assert kwargs == {
        "when": when,
        "ident": ident,
        "color": t.Color.BLUE,
        "point": t.Point(3, 4),
        "order": t.Order(sku="abc", quantity=2),
    }


async def test_submission_options(client: TaskClient[Any], engine: AsyncEngine) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    later = await client.submit(t.add.options(run_at=at), a=1)
    delayed = await client.submit(t.add.options(delay=60, queue="slow", priority=7), a=2)
    plain = await client.submit(t.add, a=3)
    async with engine.connect() as conn:
        rows = {
            r.id: r
            for r in await conn.execute(
                text("SELECT id, queue, priority, scheduled_at, now() AS db_now FROM tasks")
            )
        }
    assert rows[later].scheduled_at == at
    d = rows[delayed]
    assert d.queue == "slow" and d.priority == 7
    assert timedelta(seconds=59) < d.scheduled_at - d.db_now <= timedelta(seconds=60)
    assert rows[plain].scheduled_at <= rows[plain].db_now
    assert rows[plain].queue == "default"
    with pytest.raises(ValueError, match="not both"):
        t.add.options(delay=1, run_at=at)
    with pytest.raises(ValueError, match="timezone-aware"):
        t.add.options(run_at=datetime(2030, 1, 1))


async def test_option_names_never_collide_with_parameters(client: TaskClient[Any]) -> None:
    @t.registry.task(name="tests.collide")
    def collide(queue: str, delay: int, priority: int) -> str:
        return queue

    task_id = await client.submit(collide.options(queue="q2"), queue="mine", delay=3, priority=4)
    row = await client.get(task_id)
    assert row is not None
    assert row.args == {"queue": "mine", "delay": 3, "priority": 4}
    assert row.queue == "q2"


async def test_submit_many_is_one_statement_all_or_nothing(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    ids = await client.submit_many(t.add, [{"a": i} for i in range(500)])
    assert len(set(ids)) == 500
    assert await count_tasks(engine) == 500
    with pytest.raises(TaskArgumentsError):
        await client.submit_many(t.add, [{"a": 1}, {"a": "bad"}])
    assert await count_tasks(engine) == 500


async def test_a_batch_writes_the_rows_single_submits_write(client: TaskClient[Any]) -> None:
    # A batch travels as two arrays (ids, arguments) with the shared settings sent once: each
    # row must still come out as a submit of its own would write it.
    later = t.sleep_async.options(queue="q3", priority=7, delay=timedelta(seconds=60))
    single = await client.submit(later, seconds=0.25)
    batch = await client.submit_many(later, [{"seconds": 0.25}, {"seconds": 1.5}])
    at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    pinned = await client.submit_many(t.add.options(run_at=at), [{"a": 1}, {"a": 2, "b": 3}])
    ids: list[uuid.UUID] = [single, *batch, *pinned]
    rows = [await client.get(tid) for tid in ids]
    assert all(r is not None for r in rows)
    one, first, second, p1, p2 = cast(list[Task], rows)
    for row in (first, second):
        for field in ("name", "queue", "priority", "max_retries", "timeout_seconds", "chain"):
            assert getattr(row, field) == getattr(one, field), field
        assert (row.state, row.attempts, row.errors, row.parent_id) == (
            TaskState.PENDING,
            0,
            [],
            None,
        )
        # The database's clock, 60 s ahead, for every row alike.
        assert abs((row.scheduled_at - one.scheduled_at).total_seconds()) < 5
        assert row.scheduled_at > row.created_at + timedelta(seconds=55)
    assert (first.args, second.args) == ({"seconds": 0.25}, {"seconds": 1.5})
    assert (one.queue, one.priority, one.timeout_seconds) == ("q3", 7, 0.5)
    assert (p1.scheduled_at, p2.scheduled_at) == (at, at)
    assert (p1.args, p2.args) == ({"a": 1, "b": 1}, {"a": 2, "b": 3})


@pytest.mark.parametrize(
    ("fn", "bad"),
    [
        (t.add, {"a": "bad"}),
        (t.add, {"a": 1, "c": 2}),
        (t.sleep_async, {"seconds": float("nan")}),
        (t.echo, {"data": {"text": "a\x00b"}}),
        (t.ctx_info, {"fail_first": True, "ctx": None}),
    ],
)
async def test_a_batch_refuses_what_a_single_submit_refuses(
    client: TaskClient[Any], engine: AsyncEngine, fn: Any, bad: dict[str, Any]
) -> None:
    with pytest.raises(TaskArgumentsError) as single:
        await client.submit(fn, **bad)
    good = {"a": 1} if fn is t.add else None
    calls = [good, bad] if good else [bad]
    with pytest.raises(TaskArgumentsError) as batched:
        await client.submit_many(fn, calls)
    assert str(batched.value) == str(single.value)
    assert await count_tasks(engine) == 0


async def test_add_tasks_in_session(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        ids = add_tasks(session, t.add, [{"a": i, "b": i} for i in range(10)])
    assert len(ids) == 10
    assert await count_tasks(engine) == 10


async def listen(db_url: str, channel: str = "tasklib_tasks") -> tuple[Any, asyncio.Queue[str]]:
    got: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    await conn.add_listener(channel, lambda *a: got.put_nowait(a[3]))
    return conn, got


async def test_notify_is_sent_on_commit_only(db_url: str, engine: AsyncEngine) -> None:
    conn, got = await listen(db_url)
    try:
        async with AsyncSession(engine) as session:
            add_task(session, t.add.options(queue="q1"), a=1)
            await session.flush()
            await asyncio.sleep(0.2)
            assert got.empty()  # flushed, not committed: nothing delivered
            await session.rollback()
        await asyncio.sleep(0.2)
        assert got.empty()
        async with AsyncSession(engine) as session, session.begin():
            add_tasks(session, t.add.options(queue="q2"), [{"a": i} for i in range(50)])
        assert await asyncio.wait_for(got.get(), 2) == "q2"
        await asyncio.sleep(0.2)
        assert got.empty()  # one notification per statement and queue, not one per row
    finally:
        await conn.close()


async def test_config_retry_default_applies(engine: AsyncEngine, config: Config) -> None:
    client: TaskClient[Task] = TaskClient(config.replace(default_max_retries=7), engine=engine)
    task_id = await client.submit(t.add, a=1)
    fixed = await client.submit(t.always_fails, message="x")  # max_retries=2 on the task
    rows = {r.id: r.max_retries for r in [await client.get(task_id), await client.get(fixed)] if r}
    assert rows == {task_id: 7, fixed: 2}


async def test_chains_are_stored_by_every_submit_path(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    chain = t.add.then(t.async_add, "a", b=5)
    expected = [
        {
            "name": "tests.async_add",
            "arg": "a",
            "args": {"b": 5},
            "queue": "default",
            "priority": 0,
            "max_retries": 3,
            "timeout_seconds": None,
        }
    ]
    async with AsyncSession(engine) as session, session.begin():
        in_session = add_task(session, chain, a=1)
    standalone = await client.submit(chain, a=2)
    (batched,) = await client.submit_many(chain, [{"a": 3}])
    plain = await client.submit(t.add, a=4)
    for tid in (in_session, standalone, batched):
        row = await client.get(tid)
        assert row is not None and row.chain == expected
    row = await client.get(plain)
    assert row is not None and row.chain is None
    async with AsyncSession(engine) as session, session.begin():
        orm_plain = add_task(session, t.add, a=5)
    async with engine.connect() as conn:  # SQL NULL, not JSON null, for tasks without a chain
        nulls = await conn.scalar(
            text("SELECT count(*) FROM tasks WHERE chain IS NULL AND id IN (:a, :b)"),
            {"a": plain, "b": orm_plain},
        )
    assert nulls == 2

"""Task handles: ``await handle.result()`` wakes on the worker's notification, typed."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklib_sqla import (
    Config,
    Task,
    TaskCancelledError,
    TaskClient,
    TaskFailedError,
    TaskHandle,
    TaskNotFoundError,
    TaskWorker,
)
from tasklib_sqla.queries import rescue_params
from tests import tasks as t


@pytest.fixture
async def running_worker(config: Config) -> AsyncIterator[TaskWorker]:
    """A worker that keeps running (not burst) while the test waits on results."""
    w = TaskWorker(
        Config(database_url=config.database_url, base_retry_delay_seconds=0.0, retry_jitter=0.0),
        registry=t.registry,
        handle_signals=False,
    )
    run = asyncio.create_task(w.run())
    yield w
    w.stop()
    await run


async def test_result_returns_the_value_as_its_declared_type(
    client: TaskClient[Any], running_worker: TaskWorker
) -> None:
    h = await client.submit(t.async_add, a=1, b=2)
    assert isinstance(h, uuid.UUID) and isinstance(h, TaskHandle)
    assert await h.result(timeout=10) == 3
    order = await (await client.submit(t.make_order, sku="x", quantity=2)).result(timeout=10)
    assert isinstance(order, t.Order) and order == t.Order(sku="x", quantity=2)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert await (await client.submit(t.stamp, when=when)).result(timeout=10) == when
    # A task that already finished answers at once, from its row.
    assert await h.result(timeout=1) == 3


async def test_the_handle_is_the_id(client: TaskClient[Any]) -> None:
    h = await client.submit(t.async_add, a=1, b=2)
    row = await client.get(h)
    assert row is not None and row.id == h and str(row.id) == str(h) and hash(row.id) == hash(h)
    plain = pickle.loads(pickle.dumps(h))
    assert type(plain) is uuid.UUID and plain == h
    again = t.async_add.handle(str(h))
    assert again == h and repr(again) == f"TaskHandle('{h}', task='tests.async_add')"


async def test_a_waiter_wakes_on_the_notification_without_polling(
    client: TaskClient[Any], running_worker: TaskWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    read = client.finished

    async def counted(task_id: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read(task_id)

    monkeypatch.setattr(client, "finished", counted)
    h = await client.submit(t.make_order, sku="slow", quantity=1, seconds=1.5)
    started = time.monotonic()
    order = await h.result(timeout=10)
    waited = time.monotonic() - started
    assert order.sku == "slow" and 1.4 < waited < 3.0
    # One read before waiting, one after the notification (the retry of a first read
    # made while the task was pending is the only other one allowed).
    assert reads <= 3, reads


async def test_failed_and_cancelled_tasks_raise(
    client: TaskClient[Any], running_worker: TaskWorker
) -> None:
    failing = await client.submit(t.always_fails.options(), message="boom")
    with pytest.raises(TaskFailedError) as info:
        await failing.result(timeout=20)
    err = info.value
    assert err.task_id == failing and err.error is not None and "boom" in err.error
    assert [e["type"] for e in err.errors] == ["RuntimeError"] * len(err.errors)
    assert "boom" in str(err)

    later = await client.submit(t.async_add.options(delay=60), a=1, b=1)
    waiting = asyncio.create_task(later.result(timeout=10))
    await asyncio.sleep(0.3)
    assert await client.cancel(later)
    with pytest.raises(TaskCancelledError):
        await waiting


async def test_timeout_and_unknown_ids(client: TaskClient[Any]) -> None:
    h = await client.submit(t.async_add, a=1, b=1)  # no worker runs
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.3 s"):
        await h.result(timeout=0.3)
    assert time.monotonic() - started < 1.0
    with pytest.raises(TaskNotFoundError):
        await client.handle(t.async_add, uuid.uuid4()).result(timeout=5)


async def test_a_task_failed_by_the_rescuer_wakes_its_waiter(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    h = await client.submit(t.async_add.options(), a=1, b=1)
    async with engine.begin() as conn:  # a dead worker's task, its attempts spent
        await conn.execute(
            update(Task)
            .where(Task.id == h)
            .values(
                state="running",
                worker_id="dead",
                attempts=Task.max_retries + 1,
                locked_until=text("now() - interval '1 minute'"),
                started_at=text("now() - interval '2 minutes'"),
            )
        )
    waiting = asyncio.create_task(h.result(timeout=10))
    await asyncio.sleep(0.3)
    w = TaskWorker(config, registry=t.registry, handle_signals=False)
    async with engine.connect() as conn:
        await conn.execute(w._queries.rescue, rescue_params(0.0, 2.0, 60.0, config.results_channel))
        await conn.commit()
    with pytest.raises(TaskFailedError, match="stopped renewing its lease"):
        await waiting


async def test_many_waits_share_one_listen_connection(
    client: TaskClient[Any], running_worker: TaskWorker, engine: AsyncEngine
) -> None:
    handles = await client.submit_many(
        t.make_order, [{"sku": str(n), "quantity": n, "seconds": 0.5} for n in range(30)]
    )

    async def listening() -> int:
        async with engine.connect() as conn:
            return int(
                await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND query LIKE 'LISTEN \"tasklib_tasks_done\"%'"
                    )
                )
            )

    waits = asyncio.gather(*(h.result(timeout=20) for h in handles))
    await asyncio.sleep(0.2)
    assert await listening() == 1
    results = await waits
    assert [r.quantity for r in results] == list(range(30))
    for _ in range(50):  # the last wait closed it
        if await listening() == 0:
            break
        await asyncio.sleep(0.02)
    assert await listening() == 0


def test_result_sync_and_a_waiter_in_another_process(
    db_url: str, config: Config, tmp_path: Any
) -> None:
    """The submitter waits with result_sync; a second process waits on the same task by id."""
    client: TaskClient[Task] = TaskClient(config)
    h = client.submit_sync(t.make_order, sku="far", quantity=4, seconds=1.0)
    script = (
        "import asyncio, sys\n"
        "from tasklib_sqla import Config, init\n"
        "from tests import tasks as t\n"
        f"init(Config(database_url={db_url!r}))\n"
        f"order = t.make_order.handle({str(h)!r}).result_sync(timeout=30)\n"
        "print(type(order).__name__, order.sku, order.quantity)\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "tasklib_sqla", "worker", "tests.tasks:registry", "--burst"],
        env={**os.environ, "TASKLIB_DATABASE_URL": db_url},
    )
    try:
        order = h.result_sync(timeout=30)
        assert order == t.Order(sku="far", quantity=4)
        out, _ = other.communicate(timeout=30)
        assert other.returncode == 0 and out.strip() == "Order far 4"
    finally:
        for p in (other, worker):
            if p.poll() is None:
                p.kill()
            p.wait(10)

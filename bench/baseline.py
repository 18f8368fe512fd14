"""The baseline: the same work on the same table, written by hand with plain asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg

INSERT_ONE = "INSERT INTO tasks (id, name, args, max_retries) VALUES ($1, $2, $3::jsonb, 3)"
INSERT_MANY = """
INSERT INTO tasks (id, name, args, max_retries)
SELECT id, name, args, 3 FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS t(id, name, args)
"""
CLAIM = """
UPDATE tasks SET state = 'running', worker_id = $1, attempts = attempts + 1, started_at = now(),
       locked_until = now() + interval '10 minutes'
WHERE id IN (
    SELECT id FROM tasks
    WHERE state = 'pending' AND scheduled_at <= now() AND name = ANY($2::text[])
    ORDER BY priority DESC, scheduled_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
RETURNING id, args::text AS args
"""
COMPLETE = """
UPDATE tasks SET state = 'completed', completed_at = now(), locked_until = NULL, result = v.result
FROM unnest($1::uuid[], $2::jsonb[]) AS v(id, result)
WHERE tasks.id = v.id AND tasks.worker_id = $3 AND tasks.state = 'running'
"""


async def submit_one(pool: asyncpg.Pool, name: str, n: int) -> None:
    # Through a pool, one connection acquired per submit, as an application does it.
    for i in range(n):
        await pool.execute(INSERT_ONE, uuid.uuid4(), name, json.dumps({"n": i}))


INSERT_USER = "INSERT INTO bench_users (email) VALUES ($1) RETURNING id"


async def app_txn(pool: asyncpg.Pool, name: str, n: int, with_task: bool) -> None:
    """The outbox's floor: the app transaction of ``A1-outbox`` (one row of its own) by hand,
    with or without the same task INSERT as ``submit_one``; BEGIN and COMMIT are round trips
    here too, as they are through SQLAlchemy."""
    for i in range(n):
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchval(INSERT_USER, f"user{i}@example.com")
            if with_task:
                await conn.execute(INSERT_ONE, uuid.uuid4(), name, json.dumps({"n": i}))


async def submit_many(conn: asyncpg.Connection, name: str, n: int, per_call: int) -> None:
    for start in range(0, n, per_call):
        count = min(per_call, n - start)
        await conn.execute(
            INSERT_MANY,
            [uuid.uuid4() for _ in range(count)],
            [name] * count,
            [json.dumps({"n": start + i}) for i in range(count)],
        )


Body = Callable[[str], Awaitable[str]]


def bodies(kind: str, concurrency: int) -> Body:
    """The no-op (or probe) body for each task, run the way the library runs it."""
    if kind == "sync":
        pool = ThreadPoolExecutor(concurrency)

        def noop(_args: str) -> str:
            return "null"

        async def in_thread(args: str) -> str:
            return await asyncio.get_running_loop().run_in_executor(pool, noop, args)

        return in_thread

    async def noop_async(args: str) -> str:
        if kind == "probe":
            return json.dumps((time.time() - json.loads(args)["sent"]) * 1000.0)
        return "null"

    return noop_async


async def drain(
    pool: asyncpg.Pool,
    name: str,
    kind: str,
    concurrency: int,
    batch: int,
    wake: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Claim, run, complete, until nothing is due (or, with ``wake``, until ``stop``)."""
    worker = f"baseline-{uuid.uuid4().hex[:8]}"
    body = bodies(kind, concurrency)
    limit = min(concurrency, batch)
    done = 0
    while True:
        if wake is not None:
            wake.clear()  # before claiming, so a NOTIFY that lands meanwhile is not lost
        rows = await pool.fetch(CLAIM, worker, [name], limit)
        if rows:
            results = await asyncio.gather(*(body(r["args"]) for r in rows))
            await pool.execute(COMPLETE, [r["id"] for r in rows], results, worker)
            done += len(rows)
            continue
        if wake is None or stop is None or stop.is_set():
            return done
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), 1.0)


async def listen_and_drain(
    dsn: str, name: str, stop: asyncio.Event, ready: Callable[[], Any]
) -> int:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    listener = await asyncpg.connect(dsn)
    wake = asyncio.Event()

    def on_notify(*_: Any) -> None:
        wake.set()

    await listener.add_listener("tasklib_tasks", on_notify)
    ready()

    async def stopper() -> None:
        await stop.wait()
        wake.set()

    s = asyncio.create_task(stopper())
    try:
        return await drain(pool, name, "probe", 10, 10, wake, stop)
    finally:
        s.cancel()
        await listener.close()
        await pool.close()

"""Periodic tasks run by the ordinary workers: no scheduler process to deploy.

    TASKLIB_DATABASE_URL=postgresql://postgres@127.0.0.1/mydb python -m examples.periodic 5

Starts a worker for the given number of seconds (default 5). ``heartbeat`` runs every second,
``tidy`` every day at 03:00 in Paris, skipping missed nights; ``invoice_run`` on the first of
each month at 06:00 UTC, catching up once if no worker ran at that moment. Start as many
workers as you like: each tick is inserted, and run, once.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import create_async_engine

from tasklib_sqla import CONTEXT, Config, Schedule, TaskContext, TaskRegistry, TaskWorker, metadata
from tasklib_sqla.urls import async_url

tasks = TaskRegistry()


@tasks.task(name="examples.heartbeat", schedule="* * * * * *")  # seconds: the sixth field
async def heartbeat(ctx: TaskContext = CONTEXT) -> str:
    assert ctx.scheduled_at is not None
    late = (datetime.now(UTC) - ctx.scheduled_at).total_seconds()
    print(f"tick {ctx.scheduled_at:%H:%M:%S}, started {late * 1000:.0f} ms after it", flush=True)
    return "ok"


@tasks.task(name="examples.tidy", schedule=Schedule("0 3 * * *", tz="Europe/Paris"))
async def tidy() -> None:
    print("tidying up", flush=True)


@tasks.task(
    name="examples.invoice_run",
    schedule=Schedule("0 6 1 * *", missed="run_once", args={"dry_run": False}),
)
async def invoice_run(dry_run: bool) -> None:
    print("invoicing", "(dry run)" if dry_run else "", flush=True)


async def main(seconds: float) -> None:
    config = Config.from_env()
    engine = create_async_engine(async_url(config.database_url))
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    await engine.dispose()
    worker = TaskWorker(config, registry=tasks, handle_signals=False)
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(seconds)
    worker.stop()
    await running


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0))

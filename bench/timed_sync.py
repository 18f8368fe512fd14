"""What a timeout costs a synchronous task: untimed (a thread) against timed (a warm child).

    python -m bench.timed_sync [--tasks 40]

Runs ``tasks`` trivial ``def`` tasks with a burst worker at concurrency 4, once without a
timeout (thread pool) and once with one (child processes, kept warm by the worker), and prints
the wall time of each run, worker start included; twice each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench import db
from tasklib_sqla import Config, TaskClient, TaskRegistry, TaskWorker

registry = TaskRegistry()


@registry.task(name="bench.sync_untimed")
def untimed(n: int) -> int:
    return n


@registry.task(name="bench.sync_timed", timeout_seconds=10.0)
def timed(n: int) -> int:
    return n


async def main(tasks: int) -> None:
    await db.create_database()
    url = db.bench_url()
    config = Config(database_url=url)
    engine = create_async_engine(url)
    client: TaskClient[Any] = TaskClient(config, engine=engine)
    try:
        # Twice each, alternating: the first worker of the process pays one-time start-up costs.
        for label, fn in (("untimed (thread)", untimed), ("timed (child)", timed)) * 2:
            async with engine.begin() as conn:
                await conn.execute(text("TRUNCATE tasks"))
            await client.submit_many(fn, [{"n": i} for i in range(tasks)])
            worker = TaskWorker(
                config, registry=registry, burst=True, handle_signals=False, concurrency=4
            )
            started = time.monotonic()
            stats = await worker.run()
            took = time.monotonic() - started
            print(f"{label:17} {stats.completed} tasks in {took:.2f} s", flush=True)
    finally:
        await engine.dispose()


if __name__ == "__main__":  # the children import this module: it must not run again there
    parser = argparse.ArgumentParser(prog="python -m bench.timed_sync")
    parser.add_argument("--tasks", type=int, default=40)
    asyncio.run(main(parser.parse_args().tasks))

"""Tasks for the multi-process tests; workers import this module through the CLI."""

from __future__ import annotations

import asyncio
import os
import signal

from sqlalchemy import text

from tasklib_sqla import TaskRegistry, get_client

registry = TaskRegistry()


@registry.task(name="mp.record")
async def record(n: int) -> int:
    # side_effects.n is a primary key: a second run of the same task would fail here.
    async with get_client().engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO side_effects (n, pid) VALUES (:n, :pid)"),
            {"n": n, "pid": os.getpid()},
        )
    return n


@registry.task(name="mp.slow_record")
async def slow_record(n: int, seconds: float) -> int:
    async with get_client().engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO started (n, pid) VALUES (:n, :pid)"), {"n": n, "pid": os.getpid()}
        )
    await asyncio.sleep(seconds)
    return await record.fn(n)


@registry.task(name="mp.kill_worker", max_retries=1)
def kill_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@registry.task(name="mp.stamp_start", queue="steered")
async def stamp_start(n: int, seconds: float) -> int:
    """Records when it started (the database's clock), then takes ``seconds``."""
    async with get_client().engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO starts (n, at, pid) VALUES (:n, clock_timestamp(), :pid)"),
            {"n": n, "pid": os.getpid()},
        )
    await asyncio.sleep(seconds)
    return n

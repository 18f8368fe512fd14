"""Tasks for the multi-process tests; workers import this module through the CLI."""

from __future__ import annotations

import asyncio
import os
import signal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from tasklib_sqla import SESSION, TaskRegistry, get_client

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


@registry.task(name="mp.slow_echo", max_retries=20)
async def slow_echo(n: int, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return n


@registry.task(name="mp.merge", max_retries=20, transactional=True)
async def merge(ns: list[int], g: int, session: AsyncSession = SESSION) -> list[int]:
    """A group's follow-up: records that it ran, in the worker's transaction (exactly once,
    so that a second row could only come from a second follow-up)."""
    await session.execute(text("INSERT INTO merged (g, ns) VALUES (:g, :ns)"), {"g": g, "ns": ns})
    return ns

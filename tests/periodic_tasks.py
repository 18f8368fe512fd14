"""Periodic tasks for the tests: each run records its tick in ``runs``."""

from __future__ import annotations

import os

from sqlalchemy import text

from tasklib_sqla import CONTEXT, Schedule, TaskContext, TaskRegistry, get_client

registry = TaskRegistry()


async def _record(ctx: TaskContext) -> None:
    async with get_client().engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO runs (name, tick, pid) VALUES (:name, :tick, :pid)"),
            {"name": ctx.name, "tick": ctx.scheduled_at, "pid": os.getpid()},
        )


@registry.task(name="periodic.every_second", schedule="* * * * * *")
async def every_second(ctx: TaskContext = CONTEXT) -> None:
    await _record(ctx)


minutes = TaskRegistry()


@minutes.task(name="periodic.skip", schedule=Schedule("* * * * *"))
async def skip(ctx: TaskContext = CONTEXT) -> None:
    await _record(ctx)


@minutes.task(name="periodic.run_once", schedule=Schedule("* * * * *", missed="run_once"))
async def run_once(ctx: TaskContext = CONTEXT) -> None:
    await _record(ctx)


@minutes.task(
    name="periodic.report",
    schedule=Schedule("30 8 * * 1-5", tz="Europe/Paris", args={"kind": "daily"}),
)
async def report(kind: str) -> str:
    return kind

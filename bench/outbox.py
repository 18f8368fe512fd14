"""Where the marginal cost of ``add_task`` in an application transaction comes from.

    python -m bench.outbox [--transactions 1000]

Times a one-row application transaction (SQLAlchemy AsyncSession) alone and with: a second row
of its own table, a task through ``add_task`` (ORM), the same task as a Core INSERT on the
session's connection, and ``add_task`` with the NOTIFY trigger dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from bench import db
from bench.tasks import noop_async
from bench.users import BenchUser
from tasklib_sqla import Task, add_task
from tasklib_sqla.submit import _batch_json, _insert_statement, task_values

Extra = Callable[[AsyncSession, int], Awaitable[None]]


async def nothing(session: AsyncSession, i: int) -> None:
    return None


async def own_row(session: AsyncSession, i: int) -> None:
    session.add(BenchUser(email=f"second{i}@example.com"))


async def orm_task(session: AsyncSession, i: int) -> None:
    add_task(session, noop_async, n=i)


async def core_task(session: AsyncSession, i: int) -> None:
    conn = await session.connection()
    batch = _batch_json([task_values(noop_async, (), {"n": i})])
    await conn.execute(_insert_statement(Task), {"batch": batch})


async def rate(engine: AsyncEngine, extra: Extra, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        async with AsyncSession(engine) as session, session.begin():
            session.add(BenchUser(email=f"user{i}@example.com"))
            await extra(session, i)
    return n / (time.perf_counter() - started)


async def main(n: int) -> None:
    await db.create_database()
    engine = create_async_engine(db.bench_url())
    variants: list[tuple[str, Extra]] = [
        ("+ a second row of the app's own table", own_row),
        ("+ add_task (ORM row)", orm_task),
        ("+ the task as a Core INSERT", core_task),
    ]
    await rate(engine, orm_task, n // 5)  # warm-up
    for label, extra in variants:
        base = await rate(engine, nothing, n)
        print(
            f"{label:<45} +{(base / await rate(engine, extra, n) - 1) * 100:.0f}% per transaction"
        )
    async with engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER tasks_tasklib_notify ON tasks"))
    base = await rate(engine, nothing, n)
    print(
        f"{'+ add_task, NOTIFY trigger dropped':<45} +{(base / await rate(engine, orm_task, n) - 1) * 100:.0f}% per transaction"
    )
    await engine.dispose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.outbox")
    p.add_argument("--transactions", type=int, default=1000)
    asyncio.run(main(p.parse_args().transactions))

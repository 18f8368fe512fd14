"""Where the marginal cost of ``add_task`` in an application transaction comes from.

    python -m bench.outbox [--transactions 1000]

Times a one-row application transaction (SQLAlchemy AsyncSession) alone and with: a second row
of its own table, a ``SELECT 1`` (one more round trip), a task through ``add_task`` (ORM), the
same task as a Core INSERT on the session's connection, and ``add_task`` with the NOTIFY
trigger dropped; then the same transaction by hand on asyncpg with and without the baseline's
task INSERT, the floor any client pays for that statement. ``bench/pgbench/`` holds the same
two transactions for ``pgbench`` (a C client), on the bench database this leaves behind.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from bench import baseline, db
from bench.tasks import noop_async
from bench.users import BenchUser
from tasklib_sqla import Task, add_task
from tasklib_sqla.submit import _single_insert, _single_params, task_values

Extra = Callable[[AsyncSession, int], Awaitable[None]]


async def nothing(session: AsyncSession, i: int) -> None:
    return None


async def own_row(session: AsyncSession, i: int) -> None:
    session.add(BenchUser(email=f"second{i}@example.com"))


async def orm_task(session: AsyncSession, i: int) -> None:
    add_task(session, noop_async, n=i)


async def core_task(session: AsyncSession, i: int) -> None:
    conn = await session.connection()
    row = task_values(noop_async, (), {"n": i})
    await conn.execute(_single_insert(Task, ()), _single_params(row, ()))


async def round_trip(session: AsyncSession, i: int) -> None:
    await session.execute(text("SELECT 1"))


async def rate(engine: AsyncEngine, extra: Extra, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        async with AsyncSession(engine) as session, session.begin():
            session.add(BenchUser(email=f"user{i}@example.com"))
            await extra(session, i)
    return n / (time.perf_counter() - started)


async def by_hand(n: int) -> str:
    """The floor without Python's share: the same transaction by hand on asyncpg, with and
    without the baseline's task INSERT (best of three each, alternating)."""
    pool = await asyncpg.create_pool(db.dsn(db.bench_url()), min_size=1, max_size=1)
    try:
        await baseline.app_txn(pool, "bench.noop_async", n // 5, True)  # warm-up
        best = {False: float("inf"), True: float("inf")}
        for _ in range(3):
            for with_task in (False, True):
                started = time.perf_counter()
                await baseline.app_txn(pool, "bench.noop_async", n, with_task)
                best[with_task] = min(best[with_task], time.perf_counter() - started)
    finally:
        await pool.close()
    return (
        f"{'by hand on asyncpg: + the same task INSERT':<45} "
        f"+{(best[True] / best[False] - 1) * 100:.0f}% per transaction "
        f"({best[False] / n * 1000:.2f} ms without it, {best[True] / n * 1000:.2f} ms with it)"
    )


async def main(n: int) -> None:
    await db.create_database()
    engine = create_async_engine(db.bench_url())
    variants: list[tuple[str, Extra]] = [
        ("+ a second row of the app's own table", own_row),
        ("+ SELECT 1 (a round trip, nothing written)", round_trip),
        ("+ add_task (ORM row)", orm_task),
        ("+ the task as a Core INSERT", core_task),
    ]
    await rate(engine, orm_task, n // 5)  # warm-up
    for label, extra in variants:
        base = await rate(engine, nothing, n)
        print(
            f"{label:<45} +{(base / await rate(engine, extra, n) - 1) * 100:.0f}% per transaction"
        )
    print(await by_hand(n))
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

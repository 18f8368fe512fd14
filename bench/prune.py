"""Retention on a large table: how long pruning takes, the longest it holds a lock, and what it
costs claims running beside it.

    uv run --extra test python -m bench.prune [--rows 1000000] [--steady]

Fills the bench database with ``rows`` completed tasks finished two days ago, then measures
claim throughput (batches of 100 no-ops inserted, claimed with the worker's own claim statement
and marked completed, in a loop) alone, and again while ``retention.prune`` deletes every old
row. Each prune batch is one statement; its mean time is the longest a row lock is held.

``--steady`` measures the usual case instead: a history kept by the default retention (7 days
of completed tasks, 30 of failed ones, 2% of them failed, finished evenly over those days) and
one hourly round of pruning, which finds an hour's worth of rows to delete; and the time of
``tasklib-sqla status`` on that table, whose "last hour" figures read the same history.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import db
from tasklib_sqla.admin import queue_status
from tasklib_sqla.config import Config
from tasklib_sqla.models import Task
from tasklib_sqla.queries import WorkerQueries
from tasklib_sqla.retention import prune


async def fill_old(conn: asyncpg.Connection, n: int) -> None:
    await conn.execute(
        """
        INSERT INTO tasks (name, state, args, result, attempts, started_at, completed_at,
                           worker_id, scheduled_at, created_at)
        SELECT 'bench.noop_async', 'completed', jsonb_build_object('n', g), 'null', 1,
               now() - interval '2 days', now() - interval '2 days', 'w',
               now() - interval '2 days', now() - interval '2 days'
        FROM generate_series(1, $1) g
        """,
        n,
    )
    await conn.execute("VACUUM ANALYZE tasks")


async def fill_steady(conn: asyncpg.Connection, n: int) -> None:
    """``n`` finished tasks as the default retention keeps them, oldest first in the heap:
    completed ones over the last 7 days and an hour, failed ones (every 50th) over 30 days and
    an hour; so one round of pruning finds about an hour's worth of each to delete."""
    await conn.execute(
        """
        INSERT INTO tasks (name, state, args, result, attempts, started_at, completed_at,
                           worker_id, scheduled_at, created_at)
        SELECT 'bench.noop_async', s.state, jsonb_build_object('n', g), 'null', 1, s.at, s.at,
               'w', s.at, s.at
        FROM generate_series(1, $1) g,
             LATERAL (SELECT CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END AS state,
                             now() - (1 - g::float / $1)
                                 * CASE WHEN g % 50 = 0 THEN interval '721 hours'
                                        ELSE interval '169 hours' END AS at) s
        """,
        n,
    )
    await conn.execute("VACUUM ANALYZE tasks")


async def relation_sizes(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """The task table's heap and each of its indexes, largest first."""
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)) AS pretty
        FROM pg_class c
        WHERE c.oid = 'tasks'::regclass
           OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'tasks'::regclass)
        ORDER BY pg_relation_size(c.oid) DESC
        """
    )
    return [(r["relname"], r["pretty"]) for r in rows]


async def claim_loop(url: str, stop: asyncio.Event, latencies: list[float]) -> int:
    """Claim batches of 100 due no-ops and mark them completed, until ``stop``; tasks done."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    q = WorkerQueries.for_model(Task)
    from datetime import timedelta

    params: dict[str, Any] = {
        "names": ["bench.noop_async"],
        "queues": [],
        "owner": "bench",
        "lease": timedelta(minutes=10),
        "limit": 100,
    }
    done = 0
    conn = await asyncpg.connect(db.dsn(url))
    try:
        async with engine.connect() as sa:
            while not stop.is_set():
                await conn.execute(
                    "INSERT INTO tasks (name) SELECT 'bench.noop_async' FROM generate_series(1, 100)"
                )
                started = time.perf_counter()
                rows = (await sa.execute(q.claim, params)).all()
                await conn.execute(
                    "UPDATE tasks SET state = 'completed', completed_at = now(), "
                    "locked_until = NULL WHERE id = ANY($1::uuid[])",
                    [r.id for r in rows],
                )
                latencies.append(time.perf_counter() - started)
                done += len(rows)
    finally:
        await conn.close()
        await engine.dispose()
    return done


async def measure_claims(url: str, seconds: float) -> tuple[float, float]:
    stop = asyncio.Event()
    latencies: list[float] = []
    task = asyncio.create_task(claim_loop(url, stop, latencies))
    await asyncio.sleep(seconds)
    stop.set()
    done = await task
    return done / seconds, statistics.quantiles(latencies, n=100)[98] * 1000


async def prune_beside_claims(
    engine: AsyncEngine, url: str, retention: dict[str, float]
) -> tuple[dict[str, int], float, float, float]:
    """One round of ``retention.prune`` with the claim loop running beside it: the deleted
    counts, the seconds it took, and the claims' tasks/s and p99 (ms) meanwhile."""
    stop = asyncio.Event()
    latencies: list[float] = []
    claims = asyncio.create_task(claim_loop(url, stop, latencies))
    started = time.perf_counter()
    counts = await prune(engine, Task, retention)
    took = time.perf_counter() - started
    stop.set()
    done = await claims
    assert counts is not None
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else 0.0
    return counts, took, done / took, p99


async def steady(rows: int) -> None:
    await db.create_database()
    url = db.bench_url()
    conn = await asyncpg.connect(db.dsn(url))
    try:
        await fill_steady(conn, rows)
        sizes = await relation_sizes(conn)
    finally:
        await conn.close()
    print(f"{rows:,} finished tasks kept by the default retention (2% failed)")
    print("  " + ", ".join(f"{name} {pretty}" for name, pretty in sizes))
    engine = create_async_engine(url, pool_size=2)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        await queue_status(engine, Task)
        timings.append(time.perf_counter() - started)
    print(f"status:               {statistics.median(timings) * 1000:.1f} ms (median of 5)")
    alone, alone_p99 = await measure_claims(url, 5.0)
    print(f"claims alone:         {alone:,.0f} tasks/s, p99 claim+finish {alone_p99:.1f} ms")
    counts, took, rate, p99 = await prune_beside_claims(
        engine, url, Config(database_url=url).retention
    )
    await engine.dispose()
    deleted = sum(v for k, v in counts.items() if k != "workers")
    print(
        f"one round of pruning: {deleted:,} rows ({counts}) in {took * 1000:,.0f} ms; "
        f"claims meanwhile {rate:,.0f} tasks/s, p99 claim+finish {p99:.1f} ms"
    )


async def main(rows: int) -> None:
    await db.create_database()
    url = db.bench_url()
    conn = await asyncpg.connect(db.dsn(url))
    try:
        await fill_old(conn, rows)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('tasks'))")
        sizes = await relation_sizes(conn)
    finally:
        await conn.close()
    print(f"{rows:,} completed tasks, two days old; table with indexes: {size}")
    print("  " + ", ".join(f"{name} {pretty}" for name, pretty in sizes))
    alone, alone_p99 = await measure_claims(url, 5.0)
    print(f"claims alone:         {alone:,.0f} tasks/s, p99 claim+finish {alone_p99:.1f} ms")

    engine = create_async_engine(url, pool_size=2)
    counts, took, during, p99 = await prune_beside_claims(engine, url, {"completed": 86400.0})
    await engine.dispose()
    batches = max(1, counts["completed"] // 1000)
    print(
        f"prune:                {counts['completed']:,} rows in {took:.1f} s "
        f"({counts['completed'] / took:,.0f} rows/s), {batches:,} batches of 1,000, "
        f"{took / batches * 1000:.1f} ms each on average (pauses of 50 ms between them included)"
    )
    print(
        f"claims while pruning: {during:,.0f} tasks/s ({during / alone:.2f} x alone), "
        f"p99 claim+finish {p99:.1f} ms"
    )
    conn = await asyncpg.connect(db.dsn(url))
    try:
        sizes = await relation_sizes(conn)
        started = time.monotonic()
        await conn.execute("VACUUM tasks")
        vacuumed = time.monotonic() - started
        after = await relation_sizes(conn)
    finally:
        await conn.close()
    print("after the prune: " + ", ".join(f"{name} {pretty}" for name, pretty in sizes))
    print(
        f"VACUUM after the prune: {vacuumed:.1f} s; then: "
        + ", ".join(f"{n} {p}" for n, p in after)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.prune")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steady", action="store_true", help="one hourly round, not a backlog")
    ns = parser.parse_args()
    asyncio.run(steady(ns.rows) if ns.steady else main(ns.rows))

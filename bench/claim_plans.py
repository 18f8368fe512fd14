"""The worker's real claim statement (and its idle probe) under backlogs it must not scan.

    python -m bench.claim_plans [--rows 200000] [--steered]

For each backlog — finished rows; pending rows in another queue; pending rows of a name the
worker does not register; rows scheduled in the future — it prints the claim's time per
call against an empty table, the probe's, and the EXPLAIN (ANALYZE) of the claim as the
worker compiles it, with its real parameters, for a worker of one queue and one of every queue.
Then the same for the steered claim (a queue paused, a name limited), with two more backlogs:
a paused queue's and that of a name whose rate limit is used up.
Each claim runs in a transaction that is rolled back, so the table stays as built.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from bench import db
from tasklib_sqla.models import Task
from tasklib_sqla.queries import WorkerQueries, claim_params

NAMES = ["bench.noop_async"]
BACKLOGS = (
    "empty",
    "finished",
    "other_queue",
    "unknown_name",
    "future",
    "future_idle",
    "future_higher",
)
#: The steered claim's cases (a queue paused, a name limited): the same backlogs, and a paused
#: queue's and an exhausted limit's backlog, which only the steered claim meets.
#: The levelled claim (chosen while later tasks sit above due ones): its case, and what it
#: costs where the plain claim would do.
LEVELLED_BACKLOGS = ("empty", "finished", "other_queue", "future", "future_higher")
STEERED_BACKLOGS = (
    "empty",
    "finished",
    "other_queue",
    "unknown_name",
    "future",
    "future_higher",
    "paused_queue",
    "limited_name",
)
#: A steered worker also runs ``bench.limited``, whose rate limit is used up.
STEERED_NAMES = ["bench.noop_async", "bench.limited"]


@dataclass
class Measure:
    backlog: str
    queues: tuple[str, ...]
    #: Which claim: "plain" (nothing paused or limited) or "steered".
    claim: str
    claim_ms: float
    probe_ms: float
    plan: str
    probe_plan: str


async def fill(conn: AsyncConnection, backlog: str, rows: int) -> None:
    """The backlog, plus 1,000 due tasks the worker can claim (the rolled-back claims' input).

    ``future_idle`` is the idle worker's view: rows scheduled in the future and nothing due;
    ``future_higher``, rows scheduled in the future at a higher priority than the due tasks.
    """
    await conn.exec_driver_sql("TRUNCATE tasks")
    fills = {
        "finished": "INSERT INTO tasks (name, state, attempts, started_at, completed_at, worker_id) "
        "SELECT 'bench.noop_async', 'completed', 1, now(), now(), 'old' FROM generate_series(1, %s)",
        "other_queue": "INSERT INTO tasks (name, queue, scheduled_at) "
        "SELECT 'bench.noop_async', 'other', now() - interval '1 hour' FROM generate_series(1, %s)",
        "unknown_name": "INSERT INTO tasks (name, scheduled_at) "
        "SELECT 'not.registered', now() - interval '1 hour' FROM generate_series(1, %s)",
        "future": "INSERT INTO tasks (name, scheduled_at) "
        "SELECT 'bench.noop_async', now() + interval '1 day' FROM generate_series(1, %s)",
    }
    fills["future_idle"] = fills["future"]
    # Scheduled for later at a higher priority than the due tasks: the claim's order (priority
    # first) puts them before the due ones.
    fills["future_higher"] = (
        fills["future"]
        .replace("(name, ", "(priority, name, ")
        .replace("SELECT 'bench", "SELECT 5, 'bench")
    )
    # Earlier than the due tasks: the plain claim's index order would walk them first.
    fills["paused_queue"] = fills["other_queue"].replace("'other'", "'paused'")
    fills["limited_name"] = fills["unknown_name"].replace("not.registered", "bench.limited")
    if backlog in fills:
        await conn.exec_driver_sql(fills[backlog] % int(rows))
    if backlog != "future_idle":
        await conn.exec_driver_sql(
            "INSERT INTO tasks (name, scheduled_at) "
            "SELECT 'bench.noop_async', now() - interval '1 minute' FROM generate_series(1, 1000)"
        )
    await conn.commit()
    await conn.exec_driver_sql("ANALYZE tasks")
    await conn.commit()


async def steer(conn: AsyncConnection) -> None:
    """Queue 'paused' paused; 'bench.limited' limited to 1 start an hour, spent just now."""
    await conn.exec_driver_sql("TRUNCATE tasks_queues, tasks_limits")
    await conn.exec_driver_sql("INSERT INTO tasks_queues (queue, paused) VALUES ('paused', true)")
    await conn.exec_driver_sql(
        "INSERT INTO tasks_limits (kind, key, rate, per_seconds, starts) VALUES ('name', "
        "'bench.limited', 1, 3600, jsonb_build_array(jsonb_build_array("
        "extract(epoch FROM now())::float8, 1)))"
    )
    await conn.commit()


def worker_params(
    queues: Sequence[str], limit: int = 100, names: Sequence[str] = NAMES
) -> dict[str, Any]:
    return {
        **claim_params(names, queues),
        "owner": "plans",
        "lease": timedelta(minutes=10),
        "limit": limit,
    }


async def explain(conn: AsyncConnection, statement: Any, params: dict[str, Any]) -> str:
    """EXPLAIN (ANALYZE) of the statement exactly as the worker sends it; rolled back."""
    compiled = statement.compile(dialect=conn.dialect)
    values = compiled.construct_params(params)
    ordered = tuple(values[name] for name in compiled.positiontup or ())
    sql = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, BUFFERS OFF) " + str(compiled)
    rows = (await conn.exec_driver_sql(sql, ordered)).all()
    await conn.rollback()
    return "\n".join(r[0] for r in rows)


async def claim_plan(url: str, queues: Sequence[str] = (), steered: bool = False) -> str:
    """EXPLAIN (ANALYZE) of the worker's claim on the table as it is (rolled back).

    ``steered``: the claim a worker runs while a queue is paused or a name limited.
    """
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
            if steered:
                params = worker_params(queues, names=STEERED_NAMES)
                return await explain(conn, queries.claim_steered, params)
            return await explain(conn, queries.claim, worker_params(queues))
    finally:
        await engine.dispose()


async def time_ms(conn: AsyncConnection, statement: Any, params: dict[str, Any], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await conn.execute(statement, params)
        times.append((time.perf_counter() - start) * 1000)
        await conn.rollback()
    return statistics.median(times)


async def measure(
    url: str, rows: int, repeats: int = 30, only_steered: bool = False
) -> list[Measure]:
    # As the worker's connections are set (worker.worker_engine): one generic plan per statement.
    engine = create_async_engine(
        url,
        connect_args={"server_settings": {"plan_cache_mode": "force_generic_plan", "jit": "off"}},
    )
    out = []
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("TRUNCATE tasks_queues, tasks_limits")
            await conn.commit()
            for backlog in () if only_steered else BACKLOGS:
                await fill(conn, backlog, rows)
                out += await _measure_claims(conn, backlog, repeats, steered=False)
                if backlog in LEVELLED_BACKLOGS:
                    out += await _measure_claims(conn, backlog, repeats, levelled=True)
            await steer(conn)
            for backlog in STEERED_BACKLOGS:
                await fill(conn, backlog, rows)
                out += await _measure_claims(conn, backlog, repeats, steered=True)
    finally:
        await engine.dispose()
    return out


async def _measure_claims(
    conn: AsyncConnection,
    backlog: str,
    repeats: int,
    *,
    steered: bool = False,
    levelled: bool = False,
) -> list[Measure]:
    out = []
    names = STEERED_NAMES if steered else NAMES
    for queues in ((), ("default",)):
        queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
        claim = (
            queries.claim_steered
            if steered
            else (queries.claim_levelled if levelled else queries.claim)
        )
        any_due = queries.any_due
        p = worker_params(queues, names=names)
        probe = claim_params(names, queues)
        out.append(
            Measure(
                backlog,
                queues,
                "steered" if steered else ("levelled" if levelled else "plain"),
                await time_ms(conn, claim, p, repeats),
                await time_ms(conn, any_due, probe, repeats),
                await explain(conn, claim, p),
                await explain(conn, any_due, probe),
            )
        )
    return out


def render(measures: list[Measure], rows: int) -> str:
    empty = {(m.claim, m.queues): m.claim_ms for m in measures if m.backlog == "empty"}
    lines = [
        f"| claim | backlog ({rows:,} rows) | worker's queues | claim 100, ms | × empty "
        "| probe, ms |",
        "|---|---|---|---:|---:|---:|",
    ]
    for m in measures:
        q = ", ".join(m.queues) or "all"
        ratio = m.claim_ms / empty[m.claim, m.queues]
        lines.append(
            f"| {m.claim} | {m.backlog} | {q} | {m.claim_ms:.2f} | {ratio:.2f} | {m.probe_ms:.2f} |"
        )
    return "\n".join(lines)


async def main(rows: int, only_steered: bool) -> None:
    await db.create_database()
    measures = await measure(db.bench_url(), rows, only_steered=only_steered)
    print(render(measures, rows))
    for m in measures:
        print(f"\n### {m.claim} claim, {m.backlog}, queues {list(m.queues) or 'all'}")
        print(f"```\n{m.plan}\n```")
        print(f"probe:\n```\n{m.probe_plan}\n```")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.claim_plans")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--steered", action="store_true", help="the steered claim's cases only")
    ns = parser.parse_args()
    asyncio.run(main(ns.rows, ns.steered))

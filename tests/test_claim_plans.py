"""The worker's real claim statement and idle probe do not walk backlogs they cannot take.

Each case fills the table with 20,000 rows of one kind of backlog plus 1,000 due tasks, then
reads the EXPLAIN (ANALYZE) of the statements exactly as the worker compiles and sends them.
`python -m bench.claim_plans` measures the same at 200,000 rows, with timings.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bench.claim_plans import (
    BACKLOGS,
    STEERED_BACKLOGS,
    STEERED_NAMES,
    explain,
    fill,
    steer,
    worker_params,
)
from tasklib_sqla import Config, TaskWorker
from tasklib_sqla.models import Task
from tasklib_sqla.queries import WorkerQueries, claim_params
from tasklib_sqla.runner import ClaimedTask
from tests import tasks as t

ROWS = 20_000


@pytest.fixture
async def conn(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as c:
        yield c


def walked(plan: str) -> int:
    """The most rows any node of the plan read and threw away."""
    return max((int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)), default=0)


def walked_tasks(plan: str) -> int:
    """The most rows a scan of the task table read and threw away (the steered claim also
    filters its own small CTEs, which is no walk)."""
    most, node = 0, ""
    for line in plan.splitlines():
        if "->" in line or not line.startswith(" "):
            node = line
        removed = re.search(r"Rows Removed by Filter: (\d+)", line)
        if removed and re.search(r" on tasks\b(?!_)", node):
            most = max(most, int(removed.group(1)))
    return most


@pytest.mark.parametrize("backlog", ["finished", "other_queue", "future"])
@pytest.mark.parametrize("queues", [(), ("default",)], ids=["all queues", "queue default"])
async def test_claim_and_probe_stay_on_their_index(
    conn: AsyncConnection, backlog: str, queues: tuple[str, ...]
) -> None:
    await fill(conn, backlog, ROWS)
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    index = "ix_tasks_claim_queue" if queues else "ix_tasks_claim "

    claim = await explain(conn, queries.claim, worker_params(queues))
    assert "Seq Scan" not in claim, claim
    assert f"Index Scan using {index}" in claim, claim
    assert "Update on tasks (actual rows=100" in claim, claim
    assert walked(claim) < 100, claim

    probe = await explain(conn, queries.any_due, claim_params(["bench.noop_async"], queues))
    assert "Seq Scan on tasks " not in probe, probe
    assert walked_tasks(probe) < 100, probe


@pytest.mark.parametrize("backlog", [b for b in STEERED_BACKLOGS if b != "empty"])
@pytest.mark.parametrize("queues", [(), ("default",)], ids=["all queues", "queue default"])
async def test_the_steered_claim_skips_what_it_cannot_take(
    conn: AsyncConnection, backlog: str, queues: tuple[str, ...]
) -> None:
    """With a queue paused and a name at its limit, the claim reads each (queue, name,
    priority) level once: a backlog of a paused queue, of an exhausted limit, of a name nobody
    runs or of tasks scheduled for later (above the due ones, too) is not walked, and the
    batch is still full."""
    await steer(conn)
    await fill(conn, backlog, ROWS)
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    params = worker_params(queues, names=STEERED_NAMES)

    claim = await explain(conn, queries.claim_steered, params)
    assert "Seq Scan on tasks " not in claim, claim
    assert "Index Only Scan using ix_tasks_claim_stream" in claim, claim  # the levels
    if backlog in ("unknown_name", "limited_name"):  # names share a queue: read by stream
        assert "Index Scan using ix_tasks_claim_stream" in claim, claim
    assert re.search(r"Update on tasks( \w+)? \(actual rows=100 ", claim), claim
    assert walked_tasks(claim) < 100, claim
    # Each level's read fixes its priority, so scheduled_at bounds its range: later tasks,
    # above the due ones too, are not walked (an index scan's skipped entries show in no row
    # count, see the levelled claim's test).
    level = (
        r"Index Cond: .*priority = open_levels(_\d+)?\.priority\) AND \(scheduled_at <= now\(\)\)"
    )
    assert re.search(level, claim), claim

    probe = await explain(conn, queries.any_due, claim_params(STEERED_NAMES, queues))
    assert "Seq Scan on tasks " not in probe, probe
    assert walked_tasks(probe) < 100, probe


@pytest.mark.parametrize("backlog", [*(b for b in BACKLOGS if b != "empty"), "paused_queue"])
@pytest.mark.parametrize("queues", [(), ("default",)], ids=["all queues", "queue default"])
async def test_the_idle_probe_reads_one_row_per_priority_level(
    conn: AsyncConnection, backlog: str, queues: tuple[str, ...]
) -> None:
    """The probe an idle worker polls with (and burst mode's last question) is a bounded index
    probe per (queue, name, priority) level: 20,000 rows scheduled for later, at the due tasks'
    priority or above, or of a paused queue, are not read through."""
    await steer(conn)  # queue 'paused' paused
    await fill(conn, backlog, ROWS)
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    params = claim_params(["bench.noop_async"], queues)
    probe = await explain(conn, queries.any_due, params)
    assert "Seq Scan on tasks " not in probe, probe
    assert walked_tasks(probe) < 100, probe
    due = await conn.scalar(queries.any_due, params)
    await conn.rollback()
    assert (due is None) == (backlog == "future_idle")


async def test_the_idle_probe_finds_a_due_task_below_levels_of_later_ones(
    conn: AsyncConnection,
) -> None:
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, priority, scheduled_at) SELECT 'bench.noop_async', g % 5, "
        "now() + interval '1 hour' FROM generate_series(1, 5000) g"
    )
    await conn.commit()
    queries = WorkerQueries.for_model(Task)
    params = claim_params(["bench.noop_async"], ())
    assert await conn.scalar(queries.any_due, params) is None
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, priority) VALUES ('bench.noop_async', 2), ('other.name', 9)"
    )
    await conn.commit()
    assert await conn.scalar(queries.any_due, params) is not None
    await conn.exec_driver_sql("DELETE FROM tasks WHERE priority = 2 AND scheduled_at <= now()")
    await conn.commit()
    assert await conn.scalar(queries.any_due, params) is None  # 'other.name' is not ours
    await conn.exec_driver_sql("INSERT INTO tasks (name, priority) VALUES ('bench.noop_async', 0)")
    await conn.commit()
    assert await conn.scalar(queries.any_due, params) is not None  # the lowest level
    await conn.exec_driver_sql("INSERT INTO tasks_queues (queue, paused) VALUES ('default', true)")
    await conn.commit()
    assert await conn.scalar(queries.any_due, params) is None  # a paused queue's tasks wait


async def test_an_idle_worker_polls_with_the_probe_and_claims_what_falls_due(
    conn: AsyncConnection, config: Config
) -> None:
    """Beside 20,000 tasks scheduled for later, an idle worker's polls ask the probe and skip
    the claim; a task that falls due by the clock alone (no notification) is still run."""
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, priority, args, scheduled_at) SELECT 'tests.noop', 5, '{}', "
        "now() + interval '1 day' FROM generate_series(1, 20000)"
    )
    await conn.commit()
    worker = TaskWorker(
        config.replace(poll_interval_seconds=0.1),
        registry=t.registry,
        handle_signals=False,
    )
    calls = {"claim": 0, "probe": 0}
    claim, probe = worker._claim, worker._anything_due

    async def counted_claim(params: dict[str, Any], limit: int) -> list[ClaimedTask]:
        calls["claim"] += 1
        return await claim(params, limit)

    async def counted_probe(params: dict[str, Any]) -> bool:
        calls["probe"] += 1
        return await probe(params)

    worker._claim = counted_claim  # type: ignore[method-assign]
    worker._anything_due = counted_probe  # type: ignore[method-assign]
    run = asyncio.create_task(worker.run())
    try:
        # Started once it listens (its LISTENs are the listener's last statements) and has
        # claimed for that: from then on only polls come.
        # This database's listeners only: another suite may run on the same server.
        listening = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %queues%'"
        )
        for _ in range(100):
            if await conn.scalar(listening):
                break
            await asyncio.sleep(0.05)
        await conn.rollback()
        await asyncio.sleep(0.3)
        calls.update(claim=0, probe=0)
        await asyncio.sleep(1.5)
        assert calls["claim"] == 0, calls
        assert calls["probe"] >= 5, calls
        # Due in 0.5 s: the submit's notification wakes a claim that finds nothing yet, then a
        # poll's probe sees it due.
        await conn.exec_driver_sql(
            "INSERT INTO tasks (name, args, scheduled_at) "
            "VALUES ('tests.noop', '{}', now() + interval '0.5 s')"
        )
        await conn.commit()
        for _ in range(100):
            if worker.stats.completed:
                break
            await asyncio.sleep(0.05)
        assert worker.stats.completed == 1
    finally:
        worker.stop()
        await run


@pytest.mark.parametrize("backlog", ["future_higher", "finished", "other_queue", "future"])
@pytest.mark.parametrize("queues", [(), ("default",)], ids=["all queues", "queue default"])
async def test_the_levelled_claim_passes_over_later_tasks_above_due_ones(
    conn: AsyncConnection, backlog: str, queues: tuple[str, ...]
) -> None:
    """20,000 tasks scheduled for later at a higher priority than the 1,000 due ones: the
    plain claim reads through them on every claim, the levelled one reads each priority from
    its earliest task and takes a full batch; the other backlogs cost it nothing either."""
    await fill(conn, backlog, ROWS)
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    claim = await explain(conn, queries.claim_levelled, worker_params(queues))
    assert "Seq Scan on tasks " not in claim, claim
    assert re.search(r"Update on tasks( \w+)? \(actual rows=100 ", claim), claim
    assert walked_tasks(claim) < 100, claim
    # Rows an index scan skips by a condition that does not bound its range (scheduled_at
    # after a priority it does not fix) show in no row count: the plain claim's walk through
    # later tasks is invisible here. The levelled claim's reads fix the priority, so
    # scheduled_at bounds their range; what else they filter on (the queue, when the planner
    # prefers ix_tasks_claim because the table holds one queue) shows as rows removed.
    level = r"Index Cond: .*priority = levels(_\d+)?\.priority\) AND \(scheduled_at <= now\(\)\)"
    assert re.search(level, claim), claim


@pytest.mark.parametrize("queues", [(), ("a", "b")], ids=["all queues", "queues a, b"])
async def test_the_levelled_claim_takes_tasks_in_claim_order(
    conn: AsyncConnection, queues: tuple[str, ...]
) -> None:
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, queue, priority, scheduled_at) VALUES "
        "('bench.noop_async', 'a', 9, now() + interval '1 hour'), "
        "('bench.noop_async', 'a', 0, now() - interval '3 s'), "
        "('bench.noop_async', 'b', 5, now() - interval '1 s'), "
        "('bench.noop_async', 'a', 5, now() - interval '2 s'), "
        "('bench.noop_async', 'b', 0, now() - interval '4 s'), "
        "('other.name', 'b', 7, now() - interval '4 s')"
    )
    await conn.commit()
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    rows = (await conn.execute(queries.claim_levelled, worker_params(queues, limit=3))).all()
    await conn.commit()
    got = (
        await conn.exec_driver_sql(
            "SELECT queue, priority FROM tasks WHERE state = 'running' ORDER BY queue, priority"
        )
    ).all()
    assert len(rows) == 3
    # Both priority-5 rows, then the older priority-0 one; later and other names stay.
    assert [tuple(r) for r in got] == [("a", 5), ("b", 0), ("b", 5)]


async def drain_own_beside(
    conn: AsyncConnection, config: Config, caplog: pytest.LogCaptureFixture, backlog: str
) -> int:
    """Insert the ``backlog`` (SQL) and 300 due tasks of the worker's own, drain them with a
    burst worker logging at INFO (it must complete exactly the 300); the pending rows left."""
    await conn.exec_driver_sql(backlog)
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, args) SELECT 'tests.noop', '{}' FROM generate_series(1, 300)"
    )
    await conn.commit()
    caplog.set_level(logging.INFO, logger="tasklib_sqla.worker")
    worker = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    assert (await worker.run()).completed == 300
    return int(await conn.scalar(text("SELECT count(*) FROM tasks WHERE state = 'pending'")))


async def test_a_worker_below_later_tasks_of_a_higher_priority_claims_level_by_level(
    conn: AsyncConnection, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    left = await drain_own_beside(
        conn,
        config,
        caplog,
        "INSERT INTO tasks (name, priority, args, scheduled_at) SELECT 'tests.noop', 5, '{}', "
        "now() + interval '1 day' FROM generate_series(1, 20000)",
    )
    assert "higher priority than due ones: claiming level by level" in caplog.text
    assert left == 20000


async def test_a_queue_worker_claims_in_priority_order_across_its_queues(
    conn: AsyncConnection,
) -> None:
    """Each queue is read on its own; the batch is still the best `limit` rows of them all."""
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, queue, priority, scheduled_at) VALUES "
        "('bench.noop_async', 'a', 0, now() - interval '3 s'), "
        "('bench.noop_async', 'b', 5, now() - interval '1 s'), "
        "('bench.noop_async', 'a', 5, now() - interval '2 s'), "
        "('bench.noop_async', 'b', 0, now() - interval '4 s'), "
        "('bench.noop_async', 'c', 9, now())"
    )
    await conn.commit()
    queries = WorkerQueries.for_model(Task, by_queue=True)
    rows = (await conn.execute(queries.claim, worker_params(["a", "b"], limit=3))).all()
    await conn.commit()
    got = (
        await conn.exec_driver_sql(
            "SELECT queue, priority FROM tasks WHERE state = 'running' ORDER BY started_at, id"
        )
    ).all()
    assert len(rows) == 3
    # Both priority-5 rows, then the older of the priority-0 ones; queue c is not ours.
    assert sorted(map(tuple, got)) == [("a", 5), ("b", 0), ("b", 5)]


async def test_a_worker_beside_tasks_it_does_not_run_switches_to_the_steered_claim(
    conn: AsyncConnection, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 pending tasks of a name no worker registers, older than the worker's own: the
    plain claim would read past all of them every time; the worker notices and switches."""
    left = await drain_own_beside(
        conn,
        config,
        caplog,
        "INSERT INTO tasks (name, scheduled_at) SELECT 'not.registered', now() - interval '1 h' "
        "FROM generate_series(1, 20000)",
    )
    assert (
        "names this worker does not run (not.registered): claiming level by level with the "
        "steered claim" in caplog.text
    )
    assert left == 20000


async def test_a_worker_with_every_name_claims_with_the_plain_claim(
    conn: AsyncConnection, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, args) SELECT 'tests.noop', '{}' FROM generate_series(1, 50)"
    )
    await conn.commit()
    caplog.set_level(logging.INFO, logger="tasklib_sqla.worker")
    worker = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    assert (await worker.run()).completed == 50
    assert "names this worker does not run" not in caplog.text
    assert "level by level" not in caplog.text

"""The worker's real claim statement and idle probe do not walk backlogs they cannot take.

Each case fills the table with 20,000 rows of one kind of backlog plus 1,000 due tasks, then
reads the EXPLAIN (ANALYZE) of the statements exactly as the worker compiles and sends them.
`python -m bench.claim_plans` measures the same at 200,000 rows, with timings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bench.claim_plans import STEERED_NAMES, explain, fill, steer, worker_params
from tasklib_sqla import Config, TaskWorker
from tasklib_sqla.models import Task
from tasklib_sqla.queries import WorkerQueries, claim_params
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
    assert "Seq Scan" not in probe, probe
    assert f"Index Scan using {index}" in probe, probe
    assert walked(probe) < 100, probe


@pytest.mark.parametrize(
    "backlog", ["finished", "other_queue", "unknown_name", "future", "paused_queue", "limited_name"]
)
@pytest.mark.parametrize("queues", [(), ("default",)], ids=["all queues", "queue default"])
async def test_the_steered_claim_skips_what_it_cannot_take(
    conn: AsyncConnection, backlog: str, queues: tuple[str, ...]
) -> None:
    """With a queue paused and a name at its limit, the claim probes each (queue, name) pair
    once: a backlog of a paused queue, of an exhausted limit or of a name nobody runs is not
    walked, and the batch is still full."""
    await steer(conn)
    await fill(conn, backlog, ROWS)
    queries = WorkerQueries.for_model(Task, by_queue=bool(queues))
    params = worker_params(queues, names=STEERED_NAMES)

    claim = await explain(conn, queries.claim_steered, params)
    assert "Seq Scan on tasks " not in claim, claim
    assert "Index Only Scan using ix_tasks_claim_stream" in claim, claim  # the streams
    if backlog in ("unknown_name", "limited_name"):  # names share a queue: read by stream
        assert "Index Scan using ix_tasks_claim_stream" in claim, claim
    assert re.search(r"Update on tasks( \w+)? \(actual rows=100 ", claim), claim
    assert walked_tasks(claim) < 100, claim

    probe = await explain(conn, queries.any_due_steered, claim_params(STEERED_NAMES, queues))
    assert "Seq Scan on tasks " not in probe, probe
    assert walked_tasks(probe) < 100, probe


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


async def test_a_worker_beside_tasks_it_does_not_run_claims_stream_by_stream(
    conn: AsyncConnection, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 pending tasks of a name no worker registers, older than the worker's own: the
    plain claim would read past all of them every time; the worker notices and switches."""
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, scheduled_at) SELECT 'not.registered', now() - interval '1 h' "
        "FROM generate_series(1, 20000)"
    )
    await conn.exec_driver_sql(
        "INSERT INTO tasks (name, args) SELECT 'tests.noop', '{}' FROM generate_series(1, 300)"
    )
    await conn.commit()
    caplog.set_level(logging.INFO, logger="tasklib_sqla.worker")
    worker = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    assert (await worker.run()).completed == 300
    assert "names this worker does not run (not.registered): claiming stream by stream" in (
        caplog.text
    )
    left = await conn.scalar(text("SELECT count(*) FROM tasks WHERE state = 'pending'"))
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
    assert "stream by stream" not in caplog.text

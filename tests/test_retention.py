"""Retention: workers delete old finished tasks, one worker at a time, in batches."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.claim_plans import explain
from tasklib_sqla import Config, Task, TaskClient, TaskState
from tasklib_sqla.admin import last_hour
from tasklib_sqla.dashboard import per_minute
from tasklib_sqla.retention import _delete_old, prune
from tests import tasks as t
from tests.test_worker import worker


async def seed(client: TaskClient[Any], engine: AsyncEngine) -> dict[str, list[uuid.UUID]]:
    """25 old completed, 3 old failed, 2 old cancelled, 2 recent completed, 2 pending."""
    groups: dict[str, list[uuid.UUID]] = {}
    for label, n in (("old_completed", 25), ("old_failed", 3), ("old_cancelled", 2)):
        groups[label] = [await client.submit(t.add, a=i) for i in range(n)]
    groups["recent"] = [await client.submit(t.add, a=i) for i in range(2)]
    groups["pending"] = [await client.submit(t.add.options(delay=3600), a=i) for i in range(2)]
    async with engine.begin() as conn:
        for label, state, age in (
            ("old_completed", TaskState.COMPLETED, "2 days"),
            ("old_failed", TaskState.FAILED, "2 days"),
            ("old_cancelled", TaskState.CANCELLED, "2 days"),
            ("recent", TaskState.COMPLETED, "1 second"),
        ):
            await conn.execute(
                update(Task)
                .where(Task.id.in_(groups[label]))
                .values(state=state, completed_at=func.now() - text(f"interval '{age}'"))
            )
    return groups


async def remaining(engine: AsyncEngine) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        return set((await conn.scalars(select(Task.id))).all())


async def test_a_worker_prunes_by_state_and_age(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    groups = await seed(client, engine)
    day = 86400.0
    c = config.replace(
        retain_completed_seconds=day,
        retain_failed_seconds=None,  # kept for ever
        retain_cancelled_seconds=day,
        prune_interval_seconds=0.2,
        poll_interval_seconds=60.0,
    )
    w = worker(c, queues=["nothing-here"])  # claims nothing: only the pruner acts
    run = asyncio.create_task(w.run())
    try:
        for _ in range(100):
            if w.stats.pruned >= 27:
                break
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await run
    left = await remaining(engine)
    assert w.stats.pruned == 27
    assert left == {*groups["old_failed"], *groups["recent"], *groups["pending"]}


async def test_only_one_worker_prunes_at_a_time(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    groups = await seed(client, engine)
    policy = {"completed": 86400.0}
    async with engine.connect() as holder:  # another worker is pruning right now
        await holder.scalar(select(func.pg_advisory_lock(func.hashtext("tasklib_prune:tasks"))))
        assert await prune(engine, Task, policy) is None
        assert groups["old_completed"][0] in await remaining(engine)
        await holder.scalar(select(func.pg_advisory_unlock(func.hashtext("tasklib_prune:tasks"))))
    # Free again: batches of 10 delete all 25, and the recent ones stay.
    assert await prune(engine, Task, policy, batch=10, pause=0) == {"completed": 25, "workers": 0}
    assert not set(groups["old_completed"]) & await remaining(engine)


def test_retention_settings_from_the_environment() -> None:
    c = Config.from_env(
        {
            "TASKLIB_RETAIN_FAILED_SECONDS": "forever",
            "TASKLIB_RETAIN_COMPLETED_SECONDS": "3600",
            "TASKLIB_PRUNE_INTERVAL_SECONDS": "0",
        }
    )
    assert c.retention == {"completed": 3600.0, "cancelled": 7 * 86400.0}
    assert c.prune_interval_seconds == 0


async def test_registry_rows_of_long_dead_workers_are_removed(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for wid, seen in (("dead", "2 hours"), ("recently-dead", "5 minutes"), ("alive", "0")):
            await conn.execute(
                text(
                    "INSERT INTO tasks_workers (id, host, pid, concurrency, version,"
                    " lease_seconds, last_seen_at)"
                    f" VALUES (:id, 'h', 1, 1, 'v', 60, now() - interval '{seen}')"
                ),
                {"id": wid},
            )
    # With every state kept for ever, the registry is still cleaned up.
    assert await prune(engine, Task, {}) == {"workers": 1}
    async with engine.connect() as conn:
        left = set((await conn.scalars(text("SELECT id FROM tasks_workers"))).all())
    assert left == {"recently-dead", "alive"}


async def test_retention_and_status_read_the_history_by_its_index(engine: AsyncEngine) -> None:
    """With a week of finished tasks kept (20,000, 2% failed), a round of retention reads
    only the rows it deletes, and status and the dashboard's chart only the last hour's,
    through ix_tasks_finished: no sequential scan of the history, whose size the default
    retention multiplies."""
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO tasks (name, state, attempts, started_at, completed_at, worker_id) "
                "SELECT 'tests.add', CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, "
                "1, now() - g * interval '30 seconds', now() - g * interval '30 seconds', 'w' "
                "FROM generate_series(1, 20000) g"
            )
        )
        await conn.execute(text("ANALYZE tasks"))
        await conn.commit()
        # Six days kept: the oldest 2,720 rows (of 6.9 days), 1 in 50 of them failed, are due.
        for state, due in (("completed", 2666), ("failed", 54), ("cancelled", 0)):
            plan = await explain(
                conn, _delete_old(Task, state), {"age": 6 * 86400.0, "batch": 1000}
            )
            assert "Seq Scan" not in plan, plan
            assert "Rows Removed by Filter" not in plan, plan
            history = re.search(r"ix_tasks_finished(?: on tasks \w+)? \(actual rows=(\d+) ", plan)
            assert history and int(history.group(1)) <= due + 10, plan  # the due rows at most
            assert re.search(r"pk_tasks(?: on tasks)? \(actual rows=", plan), plan
        for last_hour_query in (last_hour(Task), per_minute(Task)):  # status, dashboard
            plan = await explain(conn, last_hour_query, {})
            assert "Seq Scan" not in plan, plan
            assert "ix_tasks_finished" in plan, plan
            assert "Rows Removed by Filter" not in plan, plan

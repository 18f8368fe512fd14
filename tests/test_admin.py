"""Operators' view: queue_status / `tasklib-sqla status` and `tasklib-sqla healthcheck`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklib_sqla import Config, Task, TaskClient, TaskState
from tasklib_sqla.admin import health_on, health_problems, queue_status, render_status
from tests import tasks as t
from tests.test_worker import worker


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasklib_sqla", *args],
        env={**os.environ, "TASKLIB_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def seed(client: TaskClient[Any], engine: AsyncEngine) -> None:
    """2 due and 1 future pending in default, 1 completed and 1 failed in mail, 1 unserved."""
    await client.submit(t.add, a=1)
    await client.submit(t.add, a=2)
    await client.submit(t.add.options(delay=3600), a=3)
    done = await client.submit(t.add.options(queue="mail"), a=4)
    bad = await client.submit(t.add.options(queue="mail"), a=5)
    async with engine.begin() as conn:
        await conn.execute(
            update(Task)
            .where(Task.id == done)
            .values(state=TaskState.COMPLETED, completed_at=func.now(), result=5)
        )
        await conn.execute(
            update(Task)
            .where(Task.id == bad)
            .values(state=TaskState.FAILED, completed_at=func.now(), error="E: x")
        )
        await conn.execute(
            text("INSERT INTO tasks (name, queue) VALUES ('nobody.runs_this', 'default')")
        )


async def test_status_counts_queues_and_names_nobody_serves(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    await seed(client, engine)
    st = await queue_status(engine, Task)
    by_queue = {q.queue: q for q in st.queues}
    assert (by_queue["default"].pending, by_queue["default"].due) == (4, 3)
    assert by_queue["default"].oldest_due_seconds is not None
    assert (by_queue["mail"].completed, by_queue["mail"].failed) == (1, 1)
    assert st.failed_last_hour == 1 and st.throughput_per_minute["1m"] == 1.0
    assert st.workers == [] and health_problems(st, need_worker=True) == ["no live worker"]
    # No worker is alive: every pending name is unserved.
    assert st.unserved == {"tests.add": 3, "nobody.runs_this": 1}
    text_view = render_status(st)
    assert "QUEUES" in text_view and "WORKERS (0 alive)" in text_view
    assert "nobody.runs_this: 1" in text_view


async def test_a_large_table_has_its_history_sampled_and_the_rest_counted(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Above exact_limit rows, the finished tasks are estimated from a sample (the same one
    each time); pending and running ones are still counted exactly."""
    await seed(client, engine)  # 4 pending in default (3 due), 1 completed, 1 failed in mail
    async with engine.begin() as conn:
        for queue, state, n in (("default", "completed", 6000), ("mail", "failed", 3000)):
            await conn.execute(
                text(
                    "INSERT INTO tasks (id, name, queue, state, args, completed_at) "
                    "SELECT gen_random_uuid(), 'tests.add', :queue, :state, '{}', now() "
                    "FROM generate_series(1, :n)"
                ),
                {"queue": queue, "state": state, "n": n},
            )
        await conn.execute(
            update(Task)
            .where(Task.id.in_(select(Task.id).where(Task.state == "pending").limit(1)))
            .values(
                state=TaskState.RUNNING,
                worker_id="w",
                attempts=1,
                started_at=func.now(),
                locked_until=func.now() + text("interval '1 minute'"),
            )
        )
        await conn.execute(text("ANALYZE tasks"))
    exact = await queue_status(engine, Task)
    by_queue = {q.queue: q for q in exact.queues}
    assert not exact.estimated and "~" not in render_status(exact)
    assert (by_queue["default"].completed, by_queue["mail"].failed) == (6000, 3001)
    assert (by_queue["default"].pending, by_queue["default"].running) == (3, 1)

    sampled = await queue_status(engine, Task, exact_limit=5000, sample_rows=3000)
    assert sampled.estimated
    again = await queue_status(engine, Task, exact_limit=5000, sample_rows=3000)

    def finished(st: Any) -> list[tuple[str, int, int, int]]:
        return [(q.queue, q.completed, q.failed, q.cancelled) for q in st.queues]

    assert finished(again) == finished(sampled)  # the same sample each time
    for q in sampled.queues:
        one = by_queue[q.queue]
        assert (q.pending, q.due, q.running) == (one.pending, one.due, one.running)
        for state in ("completed", "failed"):
            want = getattr(one, state)
            assert abs(getattr(q, state) - want) <= max(0.35 * want, 50), (q.queue, state)
    assert sampled.queues[0].completed != 6000 or sampled.queues[1].failed != 3001  # sampled
    text_view = render_status(sampled)
    assert "~" in text_view and "estimated from a sample" in text_view


async def test_status_sees_live_workers_and_what_they_serve(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    await seed(client, engine)
    w = worker(config.replace(poll_interval_seconds=60.0), queues=["mail"])
    run = asyncio.create_task(w.run())
    try:
        for _ in range(100):
            st = await queue_status(engine, Task)
            if st.workers:
                break
            await asyncio.sleep(0.05)
        (seen,) = st.workers
        assert (seen.id, seen.queues, seen.concurrency) == (w.worker_id, ["mail"], 10)
        # The worker serves tests.add in "mail" only: the ones in "default" are still unserved.
        assert st.unserved == {"tests.add": 3, "nobody.runs_this": 1}
        assert health_problems(st, need_worker=True) == []
    finally:
        w.stop()
        await run
    assert (await queue_status(engine, Task)).workers == []  # a clean stop deregisters


async def test_cli_status_json_and_text(
    client: TaskClient[Any], engine: AsyncEngine, db_url: str
) -> None:
    await seed(client, engine)
    out = cli("status", "--json", url=db_url)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {q["queue"] for q in data["queues"]} == {"default", "mail"}
    assert data["unserved"]["nobody.runs_this"] == 1
    out = cli("status", url=db_url)
    assert out.returncode == 0 and out.stdout.startswith("QUEUES"), out.stderr


async def test_cli_healthcheck(config: Config, db_url: str) -> None:
    sick = cli("healthcheck", url=db_url)
    assert (sick.returncode, sick.stdout) == (1, "unhealthy: no live worker\n")
    assert cli("healthcheck", "--no-worker", url=db_url).returncode == 0
    w = worker(config.replace(poll_interval_seconds=60.0))
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(1.0)
        ok = await asyncio.to_thread(cli, "healthcheck", url=db_url)
        assert (ok.returncode, ok.stdout) == (0, "ok: 1 workers alive\n"), ok.stdout
    finally:
        w.stop()
        await run
    missing = cli("healthcheck", url=db_url.rsplit("/", 1)[0] + "/no_such_database")
    assert missing.returncode == 1
    assert missing.stdout.startswith("unhealthy:") and "does not exist" in missing.stdout
    assert "Traceback" not in missing.stderr


async def test_healthcheck_reads_no_history(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """A readiness probe runs the healthcheck every few seconds in every pod: it must read a
    row of the table and the running tasks, not the finished ones (the status overview counts
    them all). Counted by the server in the probe's own transaction."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tasks (id, name, queue, state, args, completed_at) "
                "SELECT gen_random_uuid(), 'tests.add', 'default', 'completed', '{}', now() "
                "FROM generate_series(1, 5000)"
            )
        )
        await conn.execute(text("ANALYZE tasks"))
    await client.submit(t.slow_async, seconds=2.0)
    read = text(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
        "WHERE relname = 'tasks'"
    )
    w = worker(config.replace(poll_interval_seconds=60.0))
    run = asyncio.create_task(w.run())
    try:
        for _ in range(50):  # registered, and holding the pending task
            await asyncio.sleep(0.1)
            if (await queue_status(engine, Task)).running:
                break
        async with engine.begin() as conn:
            # The backend's counts not yet sent to the statistics (earlier transactions'
            # among them), before and after: the difference is the probe's.
            before = await conn.scalar(read)
            problems, workers = await health_on(conn, Task, need_worker=True)
            probe_read = await conn.scalar(read) - before
            # What the same counter shows for a count of every row.
            await conn.scalar(select(func.count()).select_from(Task))
            count_read = await conn.scalar(read) - before - probe_read
    finally:
        w.stop()
        await run
    assert (problems, len(workers), workers[0].running) == ([], 1, 1)
    assert probe_read <= 10
    assert count_read >= 5000


def test_durations() -> None:
    from datetime import timedelta

    import pytest

    from tasklib_sqla.admin import parse_duration

    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("7d") == timedelta(days=7)
    for bad in ("soon", "-1h", "nan"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


async def test_cli_tasks_list_pages_show_retry_cancel(
    client: TaskClient[Any], engine: AsyncEngine, db_url: str
) -> None:
    ids = [str(await client.submit(t.add, a=i)) for i in range(5)]
    first = cli("tasks", "list", "--limit", "3", url=db_url)
    assert first.returncode == 0, first.stderr
    cursor = first.stdout.strip().splitlines()[-1].split("--after ", 1)[1]
    second = cli("tasks", "list", "--limit", "3", "--after", cursor, "--json", url=db_url)
    page2 = [json.loads(line)["id"] for line in second.stdout.splitlines()]
    page1 = [line.split()[0] for line in first.stdout.splitlines()[1:4]]
    assert sorted(page1 + page2) == sorted(ids) and len(set(page1 + page2)) == 5  # no overlap
    assert cli("tasks", "list", "--state", "failed", url=db_url).stdout.strip() == "(no tasks)"
    shown = json.loads(cli("tasks", "show", ids[0], url=db_url).stdout)
    assert (shown["id"], shown["args"], shown["state"]) == (ids[0], {"a": 0, "b": 1}, "pending")
    assert cli("tasks", "show", "nope", url=db_url).returncode == 1
    assert cli("tasks", "cancel", ids[1], url=db_url).stdout == f"cancelled {ids[1]}\n"
    assert cli("tasks", "retry", ids[1], url=db_url).stdout == f"retried {ids[1]}\n"
    again = cli("tasks", "retry", ids[1], url=db_url)  # pending now: nothing to retry
    assert (again.returncode, again.stdout) == (1, f"not retried: {ids[1]}\n")
    assert "not a cursor" in cli("tasks", "list", "--after", "x", url=db_url).stderr


async def test_cli_purge_deletes_old_finished_tasks_in_batches(
    client: TaskClient[Any], engine: AsyncEngine, db_url: str
) -> None:
    ids = [await client.submit(t.add, a=i) for i in range(25)]
    async with engine.begin() as conn:
        await conn.execute(
            update(Task)
            .where(Task.id.in_(ids[:20]))
            .values(state=TaskState.COMPLETED, completed_at=func.now() - text("interval '2 days'"))
        )
        await conn.execute(
            update(Task)
            .where(Task.id.in_(ids[20:22]))
            .values(state=TaskState.COMPLETED, completed_at=func.now())
        )
    out = cli("tasks", "purge", "--older-than", "1d", "--batch", "7", url=db_url)
    assert (out.returncode, out.stdout) == (0, "deleted 20 tasks\n"), out.stderr
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM tasks")) == 5
    refused = cli("tasks", "purge", "--older-than", "1d", "--state", "pending", url=db_url)
    assert refused.returncode == 2 and "only finished tasks" in refused.stderr

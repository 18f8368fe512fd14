"""Cluster-wide limits: at most N running, at most N starts per period, across every worker.

Peaks are read from the task rows: a task runs from ``started_at`` (its claim) to
``completed_at`` (its finish). A claim that lets a task take a freed place runs after the finish
that freed it has committed, so these intervals are exactly what the limit governs.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tasklib_sqla import Config, TaskClient, TaskWorker
from tasklib_sqla.admin import queue_status, render_status
from tasklib_sqla.cli import main
from tasklib_sqla.limits import settings, target
from tasklib_sqla.models import Task
from tasklib_sqla.queries import WorkerQueries
from tests import mp_tasks
from tests import tasks as t
from tests.test_multiprocess import Workers, scalar, wait_for

#: The most tasks running at once, from the rows' [started_at, completed_at] intervals; at a tie
#: the end counts first (a place freed and taken in the same instant). A claim's started_at is
#: its transaction's now(), taken before the statement's snapshot: a claim that began as the
#: finish freeing its place was being written, and saw it written, gets a started_at a few ms
#: before that finish's completed_at though it started the task after it (a CI run measured a
#: peak of 2 for a limit of 1 that way). So starts count 50 ms late: two tasks truly running
#: together overlap by far more (the tasks of these tests run 100 ms or longer).
PEAK_RUNNING = """
SELECT coalesce(max(running), 0) FROM (
    SELECT sum(delta) OVER (ORDER BY at, delta) AS running FROM (
        SELECT started_at + interval '50 milliseconds' AS at, 1 AS delta FROM tasks
        WHERE {where}
        UNION ALL
        SELECT completed_at, -1 FROM tasks WHERE {where}
    ) events
) peaks
"""

#: The most starts (claims) in any window of ``per`` seconds, [start, start + per).
PEAK_STARTS = """
SELECT coalesce(max(n), 0) FROM (
    SELECT count(*) OVER (
        ORDER BY started_at RANGE BETWEEN CURRENT ROW
        AND interval '{per} seconds' - interval '1 microsecond' FOLLOWING
    ) AS n FROM tasks WHERE {where}
) w
"""


def test_limit_settings_are_checked() -> None:
    assert target("mail", None) == ("queue", "mail")
    assert target(None, "tests.add") == ("name", "tests.add")
    assert settings(3, None, None) == (3, None, None)
    assert settings(None, 10, timedelta(minutes=1)) == (None, 10, 60.0)
    for queue, name in ((None, None), ("a", "b"), ("", None), ("x" * 101, None)):
        with pytest.raises(ValueError):
            target(queue, name)
    for concurrency, rate, per in (
        (None, None, None),
        (0, None, None),
        (True, None, None),
        (2.5, None, None),
        (None, 5, None),
        (None, None, 1.0),
        (None, 5, 0),
        (None, -1, 1.0),
    ):
        with pytest.raises(ValueError):
            settings(concurrency, rate, per)  # type: ignore[arg-type]


async def test_set_list_and_remove_a_limit(client: TaskClient[Any], engine: AsyncEngine) -> None:
    ids = [await client.submit(t.add.options(queue="mail"), a=n) for n in range(3)]
    async with engine.begin() as conn:  # two of them running already
        await conn.execute(
            text(
                "UPDATE tasks SET state = 'running', worker_id = 'w', attempts = 1, "
                "started_at = now(), locked_until = now() + interval '1 minute' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids[:2]},
        )
    await client.set_limit(queue="mail", concurrency=5)
    await client.set_limit(name=t.add, rate=10, per=timedelta(seconds=30))
    limits = {(lim.kind, lim.key): lim for lim in await client.limits()}
    assert limits[("queue", "mail")].concurrency == 5
    assert limits[("queue", "mail")].running == 2  # tasks running already count
    assert limits[("name", "tests.add")].rate == 10
    assert limits[("name", "tests.add")].per_seconds == 30.0
    assert limits[("name", "tests.add")].recent_starts == 2  # started in the last period
    async with engine.connect() as conn:
        held = await conn.scalar(
            text("SELECT jsonb_array_length(holders) FROM tasks_limits WHERE key = 'mail'")
        )
    assert held == 2
    await client.set_limit(queue="mail", rate=1, per=1)  # replaces: no concurrency any more
    [mail] = [lim for lim in await client.limits() if lim.key == "mail"]
    assert (mail.concurrency, mail.rate, mail.per_seconds) == (None, 1, 1.0)
    assert await client.remove_limit(queue="mail") is True
    assert await client.remove_limit(queue="mail") is False
    assert [lim.key for lim in await client.limits()] == ["tests.add"]


async def test_status_shows_paused_queues_and_limits(
    client: TaskClient[Any], engine: AsyncEngine
) -> None:
    await client.pause_queue("mail")
    await client.set_limit(queue="payments", concurrency=5)
    await client.set_limit(name=t.add, rate=100, per=60)
    st = await queue_status(engine, Task)
    assert st.paused == ["mail"]
    assert [(lim.kind, lim.key, lim.concurrency, lim.rate) for lim in st.limits] == [
        ("name", "tests.add", None, 100),
        ("queue", "payments", 5, None),
    ]
    text_ = render_status(st)
    assert "PAUSED (no worker claims from them): mail" in text_
    assert "LIMITS (across every worker)" in text_
    assert st.as_dict()["limits"][1]["key"] == "payments"  # the JSON of `status --json`


async def peak(engine: AsyncEngine, sql: str, where: str, per: float = 0.0) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(sql.format(where=where, per=per))))


async def test_a_concurrency_limit_holds_across_two_workers(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    await client.set_limit(queue="slow", concurrency=3)
    await client.submit_many(
        t.slow_async.options(queue="slow"), [{"seconds": 0.2} for _ in range(12)]
    )
    await client.submit_many(t.add, [{"a": n} for n in range(20)])
    workers = [
        TaskWorker(config, registry=t.registry, concurrency=10, burst=True, handle_signals=False)
        for _ in range(2)
    ]
    started = time.monotonic()
    stats = await asyncio.gather(*(w.run() for w in workers))
    elapsed = time.monotonic() - started
    assert sum(s.completed for s in stats) == 32
    assert await peak(engine, PEAK_RUNNING, "queue = 'slow'") == 3
    # Four rounds of three, 0.2 s each: held back, not serialized to one at a time.
    assert 0.8 <= elapsed < 4.0, elapsed


async def test_a_rate_limit_holds_in_any_window(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    await client.set_limit(name=t.add, rate=4, per=0.5)
    await client.submit_many(t.add, [{"a": n} for n in range(16)])
    await client.submit_many(t.async_add, [{"a": n, "b": 1} for n in range(10)])
    worker = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    started = time.monotonic()
    assert (await worker.run()).completed == 26
    elapsed = time.monotonic() - started
    assert await peak(engine, PEAK_STARTS, "name = 'tests.add'", per=0.5) == 4
    # 16 starts at 4 per half second: the last window opens 1.5 s after the first.
    assert 1.5 <= elapsed < 5.0, elapsed
    # Other names are not held back: more of them start within half a second than 'add' may.
    assert await peak(engine, PEAK_STARTS, "name = 'tests.async_add'", per=0.5) > 4


async def claim(conn: AsyncConnection, limit: int = 100) -> list[tuple[str, str]]:
    statement = WorkerQueries.for_model(Task).claim_steered
    params = {
        "names": ["pay", "mail"],
        "owner": "w",
        "lease": timedelta(minutes=1),
        "limit": limit,
    }
    rows = (await conn.execute(statement, params)).all()
    await conn.commit()
    return sorted((r.queue, r.name) for r in rows)


async def test_a_claim_honours_a_queue_and_a_name_limit_together(engine: AsyncEngine) -> None:
    """Rows of a limited name in a limited queue count against both, in one statement."""
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO tasks (name, queue) SELECT CASE WHEN i % 3 = 0 THEN 'pay' "
                "ELSE 'mail' END, CASE WHEN i % 2 = 0 THEN 'q1' ELSE 'default' END "
                "FROM generate_series(1, 60) i"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO tasks_limits (kind, key, concurrency, rate, per_seconds) "
                "VALUES ('queue', 'q1', 5, NULL, NULL), ('name', 'pay', NULL, 4, 60)"
            )
        )
        await conn.commit()
        # A task refused by one limit may still spend a place in the ranking of the other (the
        # safe side), so the names' share can take a second claim: claim until nothing comes.
        taken = await claim(conn)
        while more := await claim(conn):
            taken += more
        assert sum(1 for q, _ in taken if q == "q1") == 5
        assert sum(1 for _, n in taken if n == "pay") == 4
        assert sum(1 for q, n in taken if (q, n) == ("default", "mail")) == 20
        assert await claim(conn) == []  # nothing has ended: no room anywhere
        await conn.execute(
            text(
                "UPDATE tasks SET state = 'completed', completed_at = now() WHERE id IN "
                "(SELECT id FROM tasks WHERE queue = 'q1' AND state = 'running' AND name = 'mail'"
                " LIMIT 2)"
            )
        )
        await conn.commit()
        # Two places free in q1; 'pay' has no starts left, so both go to 'mail'.
        assert await claim(conn) == [("q1", "mail"), ("q1", "mail")]


async def test_a_running_worker_follows_a_new_limit(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    slow_poll = Config(database_url=config.database_url, poll_interval_seconds=30.0)
    w = TaskWorker(slow_poll, registry=t.registry, concurrency=10, handle_signals=False)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(1.0)  # listening
        await client.set_limit(queue="slow", concurrency=1)
        await asyncio.sleep(0.5)  # the notification, then the worker's read of the limits
        await client.submit_many(
            t.slow_async.options(queue="slow"), [{"seconds": 0.1} for _ in range(5)]
        )
        deadline = time.monotonic() + 10
        while await peak(
            engine, "SELECT count(*) FROM tasks WHERE {where}", "state <> 'completed'"
        ):
            assert time.monotonic() < deadline, "limited tasks did not all run"
            await asyncio.sleep(0.05)
        assert await peak(engine, PEAK_RUNNING, "queue = 'slow'") == 1
        await client.remove_limit(queue="slow")
        await asyncio.sleep(0.5)
        await client.submit_many(
            t.slow_async.options(queue="slow"), [{"seconds": 0.5} for _ in range(5)]
        )
        # No limit any more: one claim takes all five, and they run side by side.
        deadline = time.monotonic() + 3
        running = 0
        while running < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            async with engine.connect() as conn:
                running = await conn.scalar(
                    text("SELECT count(*) FROM tasks WHERE state = 'running'")
                )
        assert running == 5
    finally:
        w.stop()
        await run


def test_the_cli_sets_lists_and_removes_limits(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--database-url", db_url]
    assert main(["limits", "set", "--queue", "mail", "--concurrency", "5", *url]) == 0
    assert main(["limits", "set", "--name", "send", "--rate", "100", "--per", "60", *url]) == 0
    assert main(["limits", "list", *url]) == 0
    assert main(["limits", "remove", "--queue", "mail", *url]) == 0
    assert main(["limits", "remove", "--queue", "mail", *url]) == 1
    assert main(["limits", "set", "--queue", "mail", *url]) == 2
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[:2] == ["limited queue mail", "limited name send"]
    assert lines[2].split() == ["kind", "key", "concurrency", "running", "rate", "started"]
    assert lines[3].split() == ["name", "send", "-", "0", "100/60s", "0"]
    assert lines[4].split() == ["queue", "mail", "5", "0", "-", "-"]
    assert lines[5:] == ["removed the limit on queue mail"]
    assert "no limit on queue mail" in out.err
    assert "a limit needs concurrency=" in out.err


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_limits_hold_across_three_worker_processes(
    db_url: str, sync_engine: Engine, client: TaskClient[Any], engine: AsyncEngine, tmp_path: Path
) -> None:
    """Queue 'steered': at most 3 running; its task name: at most 5 starts per second; three
    worker processes of concurrency 2 (6 places) share them."""
    with sync_engine.begin() as conn:
        conn.execute(text("CREATE TABLE starts (n int, at timestamptz, pid int)"))
    await client.set_limit(queue="steered", concurrency=3)
    await client.set_limit(name=mp_tasks.stamp_start, rate=5, per=1.0)
    await client.submit_many(mp_tasks.stamp_start, [{"n": n, "seconds": 0.3} for n in range(30)])
    workers = Workers(db_url, tmp_path)
    try:
        # Two places each: a peak of 3 running needs two processes at least, whichever
        # worker is quickest to take freed room.
        for _ in range(3):
            workers.start("--concurrency", "2")
        wait_for(
            lambda: (
                scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state <> 'completed'") == 0
            ),
            60,
            "every limited task to run",
        )
    finally:
        workers.stop_all()
    where = "name = 'mp.stamp_start'"
    assert await peak(engine, PEAK_RUNNING, where) == 3
    assert await peak(engine, PEAK_STARTS, where, per=1.0) <= 5
    pids = scalar(sync_engine, "SELECT count(DISTINCT pid) FROM starts")
    assert pids >= 2, "the limit was shared by one worker only"
    assert scalar(sync_engine, "SELECT count(DISTINCT n) FROM starts") == 30

"""Pausing and resuming queues: every worker skips a paused queue from its next claim."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklib_sqla import Config, TaskClient, TaskWorker
from tasklib_sqla.cli import main
from tests import mp_tasks
from tests import tasks as t
from tests.test_multiprocess import Workers, scalar, wait_for


async def states(engine: AsyncEngine) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT queue, string_agg(DISTINCT state, ',') FROM tasks GROUP BY queue")
            )
        ).all()
    return {q: s for q, s in rows}


async def test_a_paused_queue_is_skipped_and_resumed(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    await client.submit_many(t.add.options(queue="mail"), [{"a": n} for n in range(3)])
    await client.submit(t.add, a=1)
    await client.pause_queue("mail")
    assert await client.paused_queues() == ["mail"]
    burst = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    stats = await burst.run()  # its probe skips the paused queue too: it ends
    assert stats.completed == 1
    assert await states(engine) == {"default": "completed", "mail": "pending"}
    await client.resume_queue("mail")
    assert await client.paused_queues() == []
    again = TaskWorker(config, registry=t.registry, burst=True, handle_signals=False)
    assert (await again.run()).completed == 3


async def test_a_running_worker_follows_pause_and_resume_at_once(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    slow_poll = Config(database_url=config.database_url, poll_interval_seconds=30.0)
    w = TaskWorker(slow_poll, registry=t.registry, handle_signals=False)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(1.0)  # listening
        await client.pause_queue("mail")
        await asyncio.sleep(0.5)  # the notification, then the worker's read of the queues
        await client.submit(t.add.options(queue="mail"), a=1)
        await client.submit(t.add, a=2)
        await asyncio.sleep(1.0)
        assert await states(engine) == {"default": "completed", "mail": "pending"}
        resumed = time.monotonic()
        await client.resume_queue("mail")
        while (await states(engine)).get("mail") != "completed":
            assert time.monotonic() - resumed < 3.0, "resume did not wake the worker"
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await run


def test_the_cli_pauses_lists_and_resumes(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queues", "pause", "mail", "--database-url", db_url]) == 0
    assert main(["queues", "list", "--database-url", db_url]) == 0
    assert main(["queues", "resume", "mail", "--database-url", db_url]) == 0
    assert main(["queues", "list", "--database-url", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["paused mail", "mail\tpaused", "resumed mail", "mail\trunning"]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_worker_processes_stop_claiming_a_paused_queue(
    db_url: str, sync_engine: Engine, client: TaskClient[Any], tmp_path: Path
) -> None:
    with sync_engine.begin() as conn:
        conn.execute(text("CREATE TABLE starts (n int, at timestamptz, pid int)"))
    await client.submit_many(mp_tasks.stamp_start, [{"n": n, "seconds": 0.2} for n in range(200)])
    workers = Workers(db_url, tmp_path)
    try:
        for _ in range(2):
            workers.start("--concurrency", "4")
        wait_for(lambda: scalar(sync_engine, "SELECT count(*) FROM starts") >= 10, 30, "starts")
        await client.pause_queue("steered")
        paused_at = scalar(sync_engine, "SELECT clock_timestamp()")
        await asyncio.sleep(3.0)
        late = scalar(
            sync_engine,
            "SELECT count(*) FROM starts WHERE at > CAST(:t AS timestamptz) + interval '1 s'",
            t=paused_at,
        )
        running = scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state = 'running'")
        pending = scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state = 'pending'")
        assert late == 0 and running == 0 and pending > 0
        await client.resume_queue("steered")
        wait_for(
            lambda: (
                scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state <> 'completed'") == 0
            ),
            60,
            "the rest to run after the resume",
        )
    finally:
        workers.stop_all()
    assert scalar(sync_engine, "SELECT count(DISTINCT n) FROM starts") == 200

"""Outcomes carried by claims: a claim records the outcomes waiting for the writer in its own
statement (queries.claim_and_finish), one round trip instead of two."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklib_sqla import Config, Task, TaskClient, TaskState, TaskWorker
from tasklib_sqla.finisher import Outcome, record_json
from tasklib_sqla.queries import WorkerQueries, claim_params
from tasklib_sqla.runner import ClaimedTask
from tests import tasks as t


def kinds(worker: TaskWorker) -> dict[str, int]:
    """Counts the worker's claim and finish statements by kind, as they are sent."""
    seen = {"carrying": 0, "claim": 0, "finish": 0}

    @event.listens_for(worker.engine.sync_engine, "before_cursor_execute")
    def count(*args: Any) -> None:
        statement: str = args[2]
        if "taken AS" in statement and "done AS" in statement:
            seen["carrying"] += 1
        elif statement.startswith("UPDATE tasks SET state='running'"):
            seen["claim"] += 1
        elif statement.startswith("WITH done AS"):
            seen["finish"] += 1

    return seen


async def test_claims_carry_the_outcomes_of_finished_tasks(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    ids = await client.submit_many(t.noop, [{} for _ in range(300)])
    w = TaskWorker(config, concurrency=10, registry=t.registry, burst=True, handle_signals=False)
    seen = kinds(w)
    stats = await w.run()
    assert stats.completed == 300 and stats.claimed == 300 and stats.dropped == 0
    async with engine.connect() as conn:
        states = (
            await conn.execute(select(Task.state, Task.attempts).where(Task.id.in_(ids)).distinct())
        ).all()
    assert states == [(TaskState.COMPLETED, 1)]
    # Ten tasks end together, the claim that refills their slots records them: most outcomes
    # travel with a claim, and the writer's own statements are the exception.
    assert seen["carrying"] >= 10, seen
    assert seen["finish"] < seen["carrying"], seen


async def test_a_carried_outcome_is_fenced(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """The finish inside a claim checks ownership as the writer's does: an outcome for a task
    that is no longer ours is refused, the others are written, and the claim still claims."""
    await client.submit_many(t.add, [{"a": i} for i in range(5)])
    q = WorkerQueries.for_model(Task)
    params = {**claim_params(["tests.add"], []), "owner": "w1", "lease": timedelta(seconds=60)}
    async with engine.connect() as conn:
        rows = (await conn.execute(q.claim, {**params, "limit": 3})).all()
        await conn.commit()
        jobs = [ClaimedTask(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
        stolen = jobs[0].id  # rescued and taken by another worker meanwhile
        await conn.execute(update(Task).where(Task.id == stolen).values(worker_id="w2"))
        await conn.commit()
        batch = [Outcome(j, TaskState.COMPLETED, result_json="7") for j in jobs]
        payload = "[" + ",".join(record_json(o, "w1") for o in batch) + "]"
        got = (
            await conn.execute(
                q.claim_finishing,
                {**params, "limit": 5, "batch": payload, "done_channel": "tasklib_tasks_done"},
            )
        ).all()
        await conn.commit()
    written = [row[-1] for row in got if row[0] is None]
    claimed = [row[0] for row in got if row[0] is not None]
    assert len(written) == 1 and set(written[0]) == {jobs[1].id, jobs[2].id}
    assert len(claimed) == 2 and not set(claimed) & {j.id for j in jobs}
    async with engine.connect() as conn:
        state: dict[uuid.UUID, str] = dict(
            (await conn.execute(text("SELECT id, state || ':' || worker_id FROM tasks"))).all()
        )
    assert state[stolen] == "running:w2"  # untouched by the refused outcome
    assert state[jobs[1].id] == state[jobs[2].id] == "completed:w1"
    assert sorted(state[i] for i in claimed) == ["running:w1", "running:w1"]


async def test_an_outcome_the_database_refuses_does_not_hold_back_the_claim(
    config: Config,
    client: TaskClient[Any],
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One refused outcome in a claim's batch: the claim goes again without the outcomes, the
    writer records them one by one, the refused one as a failure; nothing waits a backoff."""
    ok = await client.submit_many(t.noop, [{} for _ in range(30)])
    bad = await client.submit(t.snooze_forever)
    w = TaskWorker(config, concurrency=10, registry=t.registry, burst=True, handle_signals=False)
    refused: list[str] = []
    event.listen(
        w.engine.sync_engine,
        "handle_error",
        lambda ctx: refused.append(ctx.statement or ""),
    )
    with caplog.at_level(logging.WARNING, logger="tasklib_sqla"):
        stats = await w.run()
    assert any("taken AS" in s and "done AS" in s for s in refused), refused
    async with engine.connect() as conn:
        got = dict((await conn.execute(select(Task.id, Task.state))).all())
        errors = (await conn.execute(select(Task.errors).where(Task.id == bad))).scalar_one()
    assert all(got[i] == TaskState.COMPLETED for i in ok)
    assert got[bad] == TaskState.FAILED and errors[0]["type"] == "OutcomeNotRecorded"
    assert stats.completed == 30 and stats.failed == 1
    assert not [r for r in caplog.records if r.getMessage().startswith("claim failed")]


def test_the_carrying_claim_is_one_statement() -> None:
    """Built once per model and queue choice, for the plain and the levelled claim."""
    for by_queue in (False, True):
        q = WorkerQueries.for_model(Task, by_queue=by_queue)
        for statement in (q.claim_finishing, q.claim_levelled_finishing):
            sql = str(statement)
            assert sql.count("UPDATE tasks") == 2 and "UNION ALL" in sql


async def test_a_row_lock_on_a_finished_task_does_not_stall_the_claims(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """A finished task's row is locked by someone else (an admin's transaction): the claim
    that carried its outcome fails once, on the lock timeout, and claims carry nothing more
    until the writer gets through; the worker keeps claiming meanwhile."""
    cfg = config.replace(db_lock_timeout_seconds=0.3, poll_interval_seconds=0.1)
    slow = await client.submit(t.slow_async, seconds=0.3)
    w = TaskWorker(cfg, concurrency=4, registry=t.registry, handle_signals=False)
    refused: list[str] = []
    event.listen(
        w.engine.sync_engine, "handle_error", lambda ctx: refused.append(ctx.statement or "")
    )
    run = asyncio.create_task(w.run())

    async def state_of(tid: uuid.UUID) -> TaskState:
        async with engine.connect() as conn:
            return (await conn.execute(select(Task.state).where(Task.id == tid))).scalar_one()

    async def until(check: Any, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while not await check():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    try:
        await until(lambda: _is(state_of(slow), TaskState.RUNNING))
        async with engine.connect() as locker:
            await locker.execute(select(Task.id).where(Task.id == slow).with_for_update())
            await asyncio.sleep(0.6)  # the task has ended; its outcome waits behind the lock
            # Tasks of 0.1 s at concurrency 4: a claim every 0.1 s or so while it is held.
            await client.submit_many(t.slow_async, [{"seconds": 0.1} for _ in range(24)])
            await until(lambda: _true(w.stats.claimed == 25))
            assert await state_of(slow) == TaskState.RUNNING
            carrying = [s for s in refused if "taken AS" in s and "done AS" in s]
            assert len(carrying) <= 1, len(carrying)
            await locker.rollback()
        await until(lambda: _true(w.stats.completed == 25))
        assert await state_of(slow) == TaskState.COMPLETED
    finally:
        w.stop()
        await run


async def _is(state: Any, expected: TaskState) -> bool:
    return bool(await state == expected)


async def _true(value: bool) -> bool:
    return value

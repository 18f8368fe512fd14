"""Groups: members in parallel, one follow-up after the last, with their results in order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from tasklib_sqla import (
    Config,
    Task,
    TaskArgumentsError,
    TaskClient,
    TaskFailedError,
    TaskWorker,
    add_group,
)
from tests import mp_tasks
from tests import tasks as t
from tests.test_multiprocess import Workers, scalar


async def drain(config: Config, **kw: Any) -> None:
    await TaskWorker(config, registry=t.registry, burst=True, handle_signals=False, **kw).run()


async def test_the_follow_up_gets_the_results_in_order(
    client: TaskClient[Any], config: Config
) -> None:
    handle = await client.submit_group(
        [t.square.call(n) for n in (3, 1, 2)], t.total, "squares", label="sum"
    )
    await drain(config, concurrency=3)
    assert await handle.result(timeout=5) == "sum: 14 from [9, 1, 4]"


async def test_a_failed_member_fails_the_group_or_reaches_the_follow_up(
    client: TaskClient[Any], config: Config
) -> None:
    failing = await client.submit_group(
        [t.square.call(2), t.square.call(-1)], t.total, "squares", label="x"
    )
    told = await client.submit_group(
        [t.square.call(2), t.square.call(-1), t.square.call(3)],
        t.tally,
        "outcomes",
        on_failure="outcomes",
    )
    await drain(config)
    with pytest.raises(TaskFailedError, match=r"GroupFailed: member #1 \[.*\] failed: ValueError"):
        await failing.result(timeout=5)
    assert await told.result(timeout=5) == {"completed": 2, "failed": 1}
    # A failed member cannot be retried: its end is counted already, a second would count twice.
    async with client.engine.connect() as conn:
        member = await conn.scalar(
            select(Task.id).where(Task.group_index.is_not(None), Task.state == "failed").limit(1)
        )
    assert member is not None
    with pytest.raises(ValueError, match=r"is member 1 of group .*cannot be retried"):
        await client.retry(member)
    assert (await client.get(member)).state == "failed"  # type: ignore[union-attr]


async def test_the_follow_up_waits_for_every_member(
    client: TaskClient[Any], config: Config, engine: AsyncEngine
) -> None:
    handle = await client.submit_group(
        [t.square.call(2), t.square.call(3)], t.total, "squares", label="late"
    )
    # One member done, the other cancelled later: the follow-up only falls due at the end.
    async with AsyncSession(engine) as s:
        first, second = (
            await s.scalars(
                select(Task.id).where(Task.group_id == handle).order_by(Task.group_index)
            )
        ).all()
    assert await client.cancel(second)
    await drain(config)
    with pytest.raises(TaskFailedError, match="cancelled"):
        await handle.result(timeout=5)
    async with AsyncSession(engine) as s:
        states = dict((await s.execute(select(Task.id, Task.state))).all())
    assert states[first] == "completed"


async def test_an_empty_group_runs_its_follow_up_at_once(
    client: TaskClient[Any], config: Config
) -> None:
    handle = await client.submit_group([], t.total, "squares", label="none")
    await drain(config)
    assert await handle.result(timeout=5) == "none: 0 from []"


def test_a_group_in_the_callers_transaction(sync_engine: Engine) -> None:
    with Session(sync_engine) as s, s.begin():
        add_group(s, [t.square.call(1)], t.total, "squares", label="tx")
        s.rollback()
    with Session(sync_engine) as s:
        assert s.scalar(select(func.count()).select_from(Task)) == 0
    with Session(sync_engine) as s, s.begin():
        follow_up = add_group(
            s, [t.square.call(1), t.square.call(2)], t.total, "squares", label="tx"
        )
    with Session(sync_engine) as s:
        rows = s.scalars(select(Task).order_by(Task.created_at, Task.group_index)).all()
        assert len(rows) == 3
        assert [r.group_index for r in rows if r.group_id == follow_up] == [0, 1]


def test_bad_groups_are_refused_before_anything_is_written() -> None:
    with pytest.raises(TaskArgumentsError, match="invalid arguments"):
        t.square.call("three")  # type: ignore[arg-type]
    with pytest.raises(TaskArgumentsError, match=r"fn\.call"):
        asyncio.run(TaskClient(Config()).submit_group([t.square], t.total, "squares", label="x"))  # type: ignore[list-item]
    with pytest.raises(TaskArgumentsError, match="missing arguments"):
        asyncio.run(TaskClient(Config()).submit_group([], t.total, "squares"))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_kill_storm_runs_each_follow_up_once(
    db_url: str, sync_engine: Engine, client: TaskClient[Any], tmp_path: Path
) -> None:
    """20 groups of 10 slow members on 3 CLI workers, one killed every second: every
    follow-up runs exactly once, after all of its members, with all of their results."""
    with sync_engine.begin() as conn:
        conn.execute(text("CREATE TABLE side_effects (n int PRIMARY KEY, pid int NOT NULL)"))
        conn.execute(text("CREATE TABLE started (n int NOT NULL, pid int NOT NULL)"))
        conn.execute(text("CREATE TABLE merged (g int NOT NULL, ns int[] NOT NULL)"))
    handles = [
        await client.submit_group(
            [mp_tasks.slow_echo.call(g * 100 + i, 0.3) for i in range(10)],
            mp_tasks.merge,
            "ns",
            g=g,
        )
        for g in range(20)
    ]
    workers = Workers(db_url, tmp_path)
    env = {"TASKLIB_LOCK_TIMEOUT_SECONDS": "2", "TASKLIB_BASE_RETRY_DELAY_SECONDS": "0"}
    live = [workers.start("--concurrency", "8", **env) for _ in range(3)]
    kills = 0
    try:
        while scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state <> 'completed'"):
            await asyncio.sleep(1.0)
            victim = live.pop(0)
            victim.kill()
            victim.wait(10)
            kills += 1
            live.append(workers.start("--concurrency", "8", **env))
            assert kills < 120, "the groups never finished"
    finally:
        workers.stop_all()
    with Session(sync_engine) as s:
        merged = {g: n for g, n in s.execute(text("SELECT g, count(*) FROM merged GROUP BY g"))}
    assert merged == {g: 1 for g in range(20)}, merged
    for g, handle in enumerate(handles):
        assert await handle.result(timeout=5) == [g * 100 + i for i in range(10)]
    assert kills >= 3


def test_a_mixed_batch_is_written_by_the_statements_it_needs() -> None:
    """Members and a chained completion finishing together: two statements, members first."""
    import uuid as _uuid

    from tasklib_sqla.finisher import Outcome, _parts
    from tasklib_sqla.models import TaskState
    from tasklib_sqla.runner import ClaimedTask

    def job(group: bool, chained: bool = False) -> Outcome:
        claimed = ClaimedTask(
            _uuid.uuid4(), "x", "{}", 1, 0, None, chained, group_id=_uuid.uuid4() if group else None
        )
        return Outcome(claimed, TaskState.COMPLETED, result_json="1")

    member, chained, plain = job(True), job(False, chained=True), job(False)
    assert _parts([chained, member, plain]) == [[member], [chained, plain]]
    assert _parts([plain, chained]) == [[plain, chained]]
    assert _parts([member]) == [[member]]

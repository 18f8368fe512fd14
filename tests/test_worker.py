"""The worker in one process: running, retries, bad inputs, timeouts, fencing, NOTIFY, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tasklib_sqla import Config, Task, TaskClient, TaskState, TaskWorker, add_task
from tasklib_sqla.queries import rescue_params
from tests import tasks as t


def worker(config: Config, **kw: Any) -> TaskWorker:
    kw.setdefault("registry", t.registry)
    kw.setdefault("handle_signals", False)
    return TaskWorker(config, **kw)


async def rows(engine: AsyncEngine) -> dict[uuid.UUID, Task]:
    async with AsyncSession(engine, expire_on_commit=False) as s:
        return {r.id: r for r in (await s.scalars(select(Task))).all()}


async def test_burst_runs_sync_and_async_tasks(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    a = await client.submit(t.add, a=1, b=2)
    b = await client.submit(t.async_add, a=3, b=4)
    c = await client.submit(t.quick_in_child, a=21)  # sync with a timeout: a child process
    stats = await worker(config, burst=True).run()
    got = await rows(engine)
    assert [got[i].result for i in (a, b, c)] == [3, 7, 42]
    for i in (a, b, c):
        row = got[i]
        assert row.state is TaskState.COMPLETED and row.attempts == 1
        assert row.completed_at is not None and row.started_at is not None
        assert row.locked_until is None and row.worker_id is not None
    assert (stats.claimed, stats.completed) == (3, 3)


async def test_worker_on_the_callers_engine(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """An engine in the default (transactional) mode works: the worker's writes still commit."""
    tid = await client.submit(t.add, a=1, b=1)
    stats = await worker(Config(), burst=True, engine=engine).run()  # no URL: the engine's
    row = (await rows(engine))[tid]
    assert (row.state, row.result, stats.claimed, stats.dropped) == ("completed", 2, 1, 0)
    async with engine.connect() as conn:  # the caller's engine is still theirs, and usable
        assert await conn.scalar(text("SELECT 1")) == 1


async def test_rich_arguments_arrive_as_declared_types(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    ident = uuid.uuid4()
    tid = await client.submit(
        t.rich,
        when=when,
        ident=ident,
        color=t.Color.RED,
        point=t.Point(1, 2),
        order=t.Order(sku="s", quantity=3),
    )
    await worker(config, burst=True).run()
    assert (await rows(engine))[tid].result == {
        "when": when.isoformat(),
        "ident": str(ident),
        "color": "red",
        "point": "1,2",
        "order": "3xs",
    }


async def test_retries_then_fails_with_every_error_recorded(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    tid = await client.submit(t.always_fails, message="kaput")  # max_retries=2
    stats = await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert row.state is TaskState.FAILED and row.attempts == 3
    assert row.error == "RuntimeError: kaput"
    assert [e["attempt"] for e in row.errors] == [1, 2, 3]
    for e in row.errors:
        assert e["type"] == "RuntimeError" and e["message"] == "kaput"
        assert "raise RuntimeError(message)" in e["traceback"]
        assert e["worker_id"] and e["at"]
    assert (stats.retried, stats.failed) == (2, 1)


async def test_retry_waits_for_backoff(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    cfg = config.replace(base_retry_delay_seconds=30.0, retry_jitter=0.0)
    tid = await client.submit(t.always_fails, message="later")
    await worker(cfg, burst=True).run()
    async with engine.connect() as conn:
        r = (
            await conn.execute(
                text(
                    "SELECT state, attempts, scheduled_at - now() AS wait FROM tasks WHERE id = :i"
                ),
                {"i": tid},
            )
        ).one()
    assert r.state == "pending" and r.attempts == 1
    assert 29 < r.wait.total_seconds() <= 30


async def test_bad_inputs_end_as_recorded_errors(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    unprintable = await client.submit(t.raises_unprintable)
    not_json = await client.submit(t.returns_not_json)
    stale = await client.submit(t.add, a=1)
    # Arguments that no longer validate (the signature changed since submission).
    async with engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == stale).values(args={"a": "one"}))
    ok = await client.submit(t.add, a=5)
    await worker(config, burst=True).run()
    got = await rows(engine)
    assert got[ok].result == 6  # the worker kept going
    assert_recorded_as_failures(got[unprintable], got[not_json], got[stale])


def assert_recorded_as_failures(unprintable: Task, not_json: Task, stale: Task) -> None:
    assert unprintable.state == "failed" and unprintable.errors[0]["type"] == "Unprintable"
    assert "unprintable" in unprintable.errors[0]["message"]
    # A result that cannot be stored will not be fixed by running again: failed at once.
    nj = not_json
    assert nj.state == "failed" and nj.attempts == 1 and nj.errors[0]["type"] == "TaskResultError"
    s = stale
    assert s.state == "failed" and s.attempts == 1 and s.errors[0]["type"] == "ValidationError"
    assert s.error is not None and "valid integer" in s.error


async def test_bad_inputs_of_async_tasks_end_as_recorded_errors(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """The same faults in async tasks, run on the worker's event loop rather than a thread."""
    unprintable = await client.submit(t.async_unprintable)
    not_json = await client.submit(t.async_not_json)
    failing = await client.submit(t.async_fails, message="boom")
    stale = await client.submit(t.async_add, a=1, b=2)
    async with engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == stale).values(args={"a": "one", "b": 2}))
    ok = await client.submit(t.async_add, a=5, b=1)
    cfg = config.replace(base_retry_delay_seconds=30.0, retry_jitter=0.0)
    await worker(cfg, burst=True).run()
    got = await rows(engine)
    assert got[ok].state == "completed" and got[ok].result == 6
    assert_recorded_as_failures(got[unprintable], got[not_json], got[stale])
    f = got[failing]  # retryable: back to pending, its traceback recorded
    assert f.state == "pending" and f.attempts == 1 and f.error == "RuntimeError: boom"
    assert "async_fails" in f.errors[0]["traceback"]


async def test_async_timeout_cancels(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    tid = await client.submit(t.sleep_async, seconds=5)  # timeout 0.5 s
    started = time.monotonic()
    await worker(config, burst=True).run()
    assert time.monotonic() - started < 3
    row = (await rows(engine))[tid]
    assert row.state == "failed" and row.errors[0]["type"] == "TaskTimeoutError"
    assert row.error is not None and "timed out after 0.5 s" in row.error


async def test_sync_timeout_kills_the_task(
    config: Config, client: TaskClient[Any], engine: AsyncEngine, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    tid = await client.submit(t.sleep_then_mark, seconds=2.0, marker=str(marker))  # timeout 1 s
    await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert row.state == "failed" and row.errors[0]["type"] == "TaskTimeoutError"
    await asyncio.sleep(2.5)  # long past the moment the task would have written the marker
    assert not marker.exists()


async def test_timed_sync_tasks_reuse_warm_children(
    config: Config, client: TaskClient[Any], engine: AsyncEngine, tmp_path: Path
) -> None:
    """Forty timed sync tasks at concurrency 4 run in at most 4 child processes (kept warm),
    and a child killed at a deadline is replaced: the tasks after it still run."""
    ids = [await client.submit(t.pid_in_child) for _ in range(40)]
    started = time.monotonic()
    await worker(config, burst=True, concurrency=4).run()
    elapsed = time.monotonic() - started
    got = await rows(engine)
    pids = {got[i].result for i in ids}
    assert all(got[i].state == "completed" for i in ids)
    assert len(pids) <= 4 and os.getpid() not in pids
    assert elapsed < 5.0, elapsed  # one fork per task took ~0.1 s each; warm, a pipe round trip

    marker = tmp_path / "marker"
    late = await client.submit(t.sleep_then_mark, seconds=2.0, marker=str(marker))
    after = [await client.submit(t.pid_in_child) for _ in range(3)]
    await worker(config, burst=True, concurrency=1).run()
    got = await rows(engine)
    assert got[late].errors[0]["type"] == "TaskTimeoutError"
    assert all(got[i].state == "completed" for i in after)


async def test_a_child_that_dies_or_has_run_its_share_is_replaced(
    config: Config,
    client: TaskClient[Any],
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tasklib_sqla.children

    monkeypatch.setattr(tasklib_sqla.children, "TASKS_PER_CHILD", 3)
    before = [await client.submit(t.pid_in_child) for _ in range(4)]
    dead = await client.submit(t.dies_in_child, code=3)
    exited = await client.submit(t.exits, code=5)  # SystemExit is the task's failure, in a thread
    after = [await client.submit(t.pid_in_child) for _ in range(5)]
    await worker(config, burst=True, concurrency=1).run()
    got = await rows(engine)
    row = got[dead]
    assert row.state == "failed" and row.errors[0]["type"] == "ChildProcessDied"
    assert "exit code 3" in (row.error or "")
    assert got[exited].state == "failed"
    pids = [got[i].result for i in before + after]
    assert all(got[i].state == "completed" for i in before + after)
    # Three tasks per child at most: 9 tasks need at least 3 children; the dead one makes 4+.
    assert all(pids.count(p) <= 3 for p in pids) and len(set(pids)) >= 4


async def test_only_registered_names_are_claimed(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    from tasklib_sqla import TaskRegistry

    other = TaskRegistry()

    @other.task(name="elsewhere.only")
    def only_there() -> None: ...

    foreign = await client.submit(only_there)
    mine = await client.submit(t.add, a=1)
    await worker(config, burst=True).run()
    got = await rows(engine)
    assert got[mine].state == "completed"
    assert got[foreign].state == "pending" and got[foreign].attempts == 0


async def test_queues_and_priority(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    low = await client.submit(t.add.options(priority=0), a=1)
    high = await client.submit(t.add.options(priority=10), a=2)
    other_queue = await client.submit(t.add.options(queue="other"), a=3)
    await worker(config, burst=True, queues=["default"], concurrency=1).run()
    got = await rows(engine)
    assert got[other_queue].state == "pending"
    high_start, low_start = got[high].started_at, got[low].started_at
    assert high_start is not None and low_start is not None
    assert high_start < low_start


async def test_stale_finish_is_refused(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """A worker that lost its lease cannot overwrite the outcome of the worker that took over."""
    tid = await client.submit(t.add, a=1)
    w1 = worker(config, worker_id="w1")
    params = {"names": ["tests.add"], "queues": [], "owner": "w1", "lease": w1._lease}
    (job,) = await w1._claim(params, 1)
    # The lease expires and the rescuer hands the task to w2, which claims and completes it.
    async with engine.begin() as conn:
        await conn.execute(
            update(Task)
            .where(Task.id == tid)
            .values(locked_until=func.now() - text("interval '1 second'"))
        )
    w2 = worker(config, worker_id="w2", burst=True)
    async with w2.engine.connect() as conn:
        await conn.execute(w2._queries.rescue, rescue_params(0.0, 2.0, 60.0))
    await w2.run()
    row = (await rows(engine))[tid]
    assert (row.state, row.worker_id, row.result, row.attempts) == ("completed", "w2", 2, 2)
    assert row.errors[0]["type"] == "WorkerLost"
    # w1 comes back late with a different result: refused, nothing changes.
    from tasklib_sqla.finisher import Outcome

    await w1._finisher._write([Outcome(job, TaskState.COMPLETED, result_json="999")])
    assert w1.stats.dropped == 1
    row = (await rows(engine))[tid]
    assert (row.state, row.worker_id, row.result) == ("completed", "w2", 2)
    await w1._dispose()  # its claim loop's and writer's kept connections, then the engine


async def test_notify_wakes_an_idle_worker(config: Config, engine: AsyncEngine) -> None:
    w = worker(config.replace(poll_interval_seconds=60.0))
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.5)  # the worker is idle and listening
        async with AsyncSession(engine) as session:
            add_task(session, t.add, a=1)
            await session.rollback()  # never committed: never runs
        started = time.monotonic()
        async with AsyncSession(engine) as session, session.begin():
            tid = add_task(session, t.add, a=41)
        while (await rows(engine))[tid].state != "completed":
            assert time.monotonic() - started < 2, "not picked up within 2 s"
            await asyncio.sleep(0.01)
        latency = time.monotonic() - started
        assert latency < 0.5, latency
    finally:
        w.stop()
        stats = await run
    assert stats.completed == 1 and stats.claimed == 1
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(Task)) == 1


async def test_graceful_shutdown_gives_back_unfinished_tasks(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    quick = await client.submit(t.slow_async, seconds=0.2)
    slow = await client.submit(t.slow_async, seconds=30)
    w = worker(config.replace(shutdown_grace_seconds=1.0), concurrency=2)
    run = asyncio.create_task(w.run())
    while w.stats.claimed < 2:
        await asyncio.sleep(0.02)
    w.stop()
    stats = await asyncio.wait_for(run, 10)
    got = await rows(engine)
    assert got[quick].state == "completed"  # finished within the grace period
    s = got[slow]
    assert (s.state, s.attempts, s.worker_id, s.locked_until) == ("pending", 0, None, None)
    assert stats.released == 1


async def test_task_submitting_another_task(
    config: Config, engine: AsyncEngine, client: TaskClient[Any]
) -> None:
    import tasklib_sqla
    from tasklib_sqla import client as client_module

    saved = client_module._client
    tasklib_sqla.init(config, engine=engine)
    try:
        tid = await client.submit(t.spawn, a=5)
        await worker(config, burst=True).run()
    finally:
        client_module._client = saved
    got = await rows(engine)
    child_id = uuid.UUID(got[tid].result)
    assert got[child_id].state == "completed" and got[child_id].result == 6


async def test_cancelling_a_running_task_stops_it(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """The heartbeat notices the task is no longer ours, cancels it, and writes nothing."""
    cfg = config.replace(lock_timeout_seconds=1.5, heartbeat_interval_seconds=0.2)
    tid = await client.submit(t.slow_async, seconds=30)
    w = worker(cfg, burst=True)
    run = asyncio.create_task(w.run())
    while w.stats.claimed < 1:
        await asyncio.sleep(0.02)
    assert await client.cancel(tid) is True
    stats = await asyncio.wait_for(run, 5)  # the 30 s task was stopped, so burst mode returns
    row = (await rows(engine))[tid]
    assert (row.state, row.result, row.errors) == ("cancelled", None, [])
    assert stats.completed == 0 and stats.failed == 0


async def test_long_task_keeps_its_lease_by_heartbeat(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """A task that runs longer than the lock timeout is not taken from a live worker."""
    cfg = config.replace(lock_timeout_seconds=1.5, heartbeat_interval_seconds=0.2)
    tid = await client.submit(t.slow_async, seconds=3.5)  # more than twice the lock timeout
    stats = await worker(cfg, burst=True).run()
    row = (await rows(engine))[tid]
    assert (row.state, row.attempts, row.errors) == ("completed", 1, [])
    assert stats.rescued == 0 and stats.dropped == 0


async def test_worker_survives_losing_its_connections(
    config: Config, engine: AsyncEngine, db_url: str
) -> None:
    """Every backend of the worker is killed mid-run: it logs, reconnects and keeps working."""
    w = worker(config.replace(poll_interval_seconds=0.2))
    run = asyncio.create_task(w.run())
    try:
        async with AsyncSession(engine) as session, session.begin():
            first = add_task(session, t.add, a=1)
        while (await rows(engine))[first].state != "completed":
            await asyncio.sleep(0.02)
        async with engine.connect() as conn:
            killed = await conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        assert killed >= 2  # the LISTEN connection and at least one pooled connection
        async with AsyncSession(engine) as session, session.begin():
            second = add_task(session, t.add, a=2)
        started = time.monotonic()
        while (await rows(engine))[second].state != "completed":
            assert time.monotonic() - started < 10, "the worker did not recover"
            await asyncio.sleep(0.05)
    finally:
        w.stop()
        await asyncio.wait_for(run, 10)


async def test_never_more_than_concurrency_at_once(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    t.Gauge.now = t.Gauge.peak = 0
    await client.submit_many(t.gauge, [{"seconds": 0.05}] * 40)
    stats = await worker(config, burst=True, concurrency=4).run()
    assert stats.completed == 40
    assert t.Gauge.peak == 4


async def test_chained_tasks_run_in_turn_with_results_passed_on(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    chain = t.add.then(t.add, "a", b=10).then(t.async_add, "a", b=100).then(t.noop)
    first = await client.submit(chain, a=1, b=2)
    await worker(config, burst=True).run()
    got = sorted((await rows(engine)).values(), key=lambda r: r.created_at)
    assert [(r.name, r.state, r.result) for r in got] == [
        ("tests.add", "completed", 3),
        ("tests.add", "completed", 13),
        ("tests.async_add", "completed", 113),
        ("tests.noop", "completed", None),
    ]
    assert got[0].id == first
    assert [r.args for r in got[1:]] == [{"a": 3, "b": 10}, {"a": 13, "b": 100}, {}]
    assert got[-1].chain is None


async def test_a_failing_step_ends_the_chain(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    chain = t.add.then(t.always_fails, None, message="stop here").then(t.add, "a")
    await client.submit(chain, a=1)
    await worker(config, burst=True).run()
    got = {r.name: r for r in (await rows(engine)).values()}
    assert set(got) == {"tests.add", "tests.fail"}
    assert got["tests.fail"].state == "failed" and got["tests.fail"].attempts == 3


def test_chain_steps_are_validated_when_declared() -> None:
    from tasklib_sqla import TaskArgumentsError, TaskDefinitionError

    with pytest.raises(TaskArgumentsError, match="no parameter 'nope'"):
        t.add.then(t.add, "nope")
    with pytest.raises(TaskArgumentsError, match="missing arguments"):
        t.add.then(t.async_add, "a")  # b is required and not given
    with pytest.raises(TaskArgumentsError, match="valid integer"):
        t.add.then(t.add, "a", b="10")
    with pytest.raises(TaskDefinitionError, match="one chain"):
        t.add.then(t.add.then(t.add, "a"), "a")
    with pytest.raises(TaskDefinitionError, match="delay"):
        t.add.then(t.add.options(delay=5), "a")
    step = t.add.then(t.add.options(queue="q9", priority=3), "a").submit_options.chain[0]
    assert step.as_json(3)["queue"] == "q9" and step.as_json(3)["priority"] == 3


async def test_an_outcome_the_database_refuses_is_recorded_as_a_failure(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """A row whose chain no longer casts fails alone; the rest of its batch completes."""
    ok = await client.submit_many(t.add, [{"a": i} for i in range(5)])
    bad = await client.submit(t.add.then(t.add, "a"), a=1)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE tasks SET chain = jsonb_set(chain, '{0,priority}', to_jsonb(CAST(:p AS text))) WHERE id = :i"
            ),
            {"p": "high", "i": bad},
        )
    stats = await worker(config, burst=True, concurrency=10).run()
    got = await rows(engine)
    assert all(got[i].state == "completed" for i in ok)
    b = got[bad]
    assert (b.state, b.attempts) == ("failed", 1)
    assert b.errors[0]["type"] == "OutcomeNotRecorded"
    assert "invalid input syntax for type integer" in b.errors[0]["message"]
    assert len(got) == 6  # no successor was inserted for the refused outcome
    assert stats.completed == 5 and stats.failed == 1


async def test_nul_characters_are_refused_before_reaching_postgres(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    from tasklib_sqla import TaskArgumentsError

    with pytest.raises(TaskArgumentsError, match="NUL"):
        await client.submit(t.echo, data={"k": "a\x00b"})
    tid = await client.submit(t.nul_result)
    await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert (row.state, row.attempts) == ("failed", 1)  # the same result every time: no retry
    assert row.errors[0]["type"] == "TaskResultError" and "NUL" in row.errors[0]["message"]


async def test_listening_worker_needs_only_an_engine(engine: AsyncEngine) -> None:
    w = worker(Config(poll_interval_seconds=60.0), engine=engine)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.5)
        async with AsyncSession(engine) as session, session.begin():
            tid = add_task(session, t.add, a=1)
        started = time.monotonic()
        while (await rows(engine))[tid].state != "completed":
            assert time.monotonic() - started < 2, (
                "NOTIFY did not reach a worker built from an engine"
            )
            await asyncio.sleep(0.02)
    finally:
        w.stop()
        await asyncio.wait_for(run, 10)


async def test_the_collector_runs_less_often_while_the_worker_runs(
    config: Config, client: TaskClient[Any]
) -> None:
    before = gc.get_threshold()
    assert before[0] < 10_000  # Python's default, 700, unless the test process changed it
    tuned = await client.submit(t.gc_young_threshold)
    await worker(config, burst=True).run()
    assert gc.get_threshold() == before  # put back when the worker stops
    left = await client.submit(t.gc_young_threshold)
    await worker(config.replace(gc_threshold=None), burst=True).run()
    assert [(await client.get(i)).result for i in (tuned, left)] == [10_000, before[0]]  # type: ignore[union-attr]


async def test_each_task_is_its_own_asyncio_task(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Tasks that never wait and tasks that do, mixed in claims of several: each runs as its
    own asyncio task with its own context (on Python 3.12+ the worker starts them eagerly, up
    to their first wait, from inside its claim loop), and every slot they held is free again
    (a worker that lost count would stop claiming before the last of them)."""
    ids = [await client.submit(t.own_task, tag=f"t{i}", wait=i % 3 == 0) for i in range(40)]
    w = worker(config.replace(claim_batch_size=7), burst=True, concurrency=4)
    stats = await w.run()
    got = await rows(engine)
    assert (stats.claimed, stats.completed) == (40, 40)
    for i, tid in enumerate(ids):
        assert got[tid].state is TaskState.COMPLETED
        assert got[tid].result == {
            "name": "tests.own_task",
            "same_after": True,
            "inherited": None,
            "tag": f"t{i}",
        }
    assert t._tag.get() is None  # nothing leaked into the test's (the worker's) context
    assert not w._running and not w._unwritten

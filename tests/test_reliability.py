"""Regression tests for faults found by running the worker as a user would, and under faults.

Each test names the fault it pins down; all run against the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklib_sqla import (
    Config,
    Task,
    TaskArgumentsError,
    TaskClient,
    TaskState,
    get_task,
)
from tasklib_sqla.exceptions import WorkerError
from tasklib_sqla.queries import rescue_params
from tasklib_sqla.urls import asyncpg_dsn
from tests import tasks as t
from tests.test_worker import rows, worker


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def wait_until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- outcomes survive a lost connection ---------------------------------------------------------


async def test_outcome_survives_connections_killed_between_run_and_record(
    config: Config, client: TaskClient[Any], engine: AsyncEngine, db_url: str
) -> None:
    """Fault 1 (one of its forms): every pooled connection of the worker is gone by the time
    the outcome is written; the write is retried on a new connection, not dropped. Restarts
    of the server itself are in the fault-injection suite (tests/faults)."""
    tid = await client.submit(t.cut_worker_connections, dsn=asyncpg_dsn(db_url))
    stats = await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert (row.state, row.result, row.attempts, row.errors) == ("completed", "cut", 1, [])
    assert (stats.completed, stats.dropped) == (1, 0)


# -- task code cannot end the worker ------------------------------------------------------------


@pytest.mark.parametrize(
    "task,kwargs,kind",
    [
        (t.exits, {"code": 3}, "SystemExit"),
        (t.exits_async, {"code": 4}, "SystemExit"),
        (t.interrupts_async, {}, "KeyboardInterrupt"),
    ],
)
async def test_exit_and_interrupt_in_a_task_are_its_failure(
    config: Config,
    client: TaskClient[Any],
    engine: AsyncEngine,
    task: Any,
    kwargs: dict[str, Any],
    kind: str,
) -> None:
    """Fault 2: sys.exit() or KeyboardInterrupt in a task ended the worker process."""
    bad = await client.submit(task, **kwargs)
    good = await client.submit(t.add, a=1)
    stats = await worker(config, burst=True, concurrency=1).run()
    got = await rows(engine)
    assert got[bad].state == "failed" and got[bad].errors[0]["type"] == kind
    assert got[good].state == "completed"
    assert (stats.completed, stats.failed) == (1, 1)


# -- child processes die with their worker ------------------------------------------------------


@pytest.mark.slow
def test_timed_child_dies_with_a_killed_worker(db_url: str, tmp_path: Path) -> None:
    """Fault 3: a SIGKILLed worker's child lived on and committed its side effects."""
    import asyncio as aio

    pid_file, marker = tmp_path / "pid", tmp_path / "marker"
    config = Config(database_url=db_url)

    async def submit() -> None:
        c: TaskClient[Any] = TaskClient(config)
        await c.submit(t.pid_then_mark, pid_file=str(pid_file), marker=str(marker), seconds=3.0)
        await c.dispose()

    aio.run(submit())
    env = {**os.environ, "TASKLIB_DATABASE_URL": db_url, "TASKLIB_POLL_INTERVAL_SECONDS": "0.2"}
    with open(tmp_path / "worker.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasklib_sqla", "worker", "tests.tasks:registry"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its worker"
            time.sleep(0.05)
        time.sleep(3.5)  # past the moment the orphan would have written its marker
        assert not marker.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- live workers keep their leases -------------------------------------------------------------


async def test_a_host_lock_on_a_running_row_costs_no_lease(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 4: an app's SELECT ... FOR UPDATE on a running row blocked every lease renewal,
    and another worker reran the task while it still ran."""
    short = config.replace(lock_timeout_seconds=2.0, heartbeat_interval_seconds=0.4)
    slow = await client.submit(t.slow_async, seconds=4.0)
    other = await client.submit(t.slow_async, seconds=4.0)
    owner = worker(short, concurrency=2)
    rescuer = worker(short, concurrency=2, registry=_unrelated_registry())
    runs = [asyncio.create_task(owner.run()), asyncio.create_task(rescuer.run())]
    try:

        async def both_running() -> bool:
            got = await rows(engine)
            return got[slow].state == "running" and got[other].state == "running"

        await wait_until(both_running, 10, "both tasks running")
        async with engine.connect() as host:
            tx = await host.begin()
            await host.execute(select(Task).where(Task.id == slow).with_for_update())
            await asyncio.sleep(3.5)  # well past the 2 s lease
            await tx.commit()

        async def done() -> bool:
            got = await rows(engine)
            return got[slow].is_finished and got[other].is_finished

        await wait_until(done, 15, "both tasks finished")
    finally:
        owner.stop()
        rescuer.stop()
        await asyncio.gather(*runs)
    got = await rows(engine)
    for tid in (slow, other):
        assert (got[tid].state, got[tid].attempts, got[tid].errors) == ("completed", 1, [])
    assert rescuer.stats.rescued == 0 and owner.stats.dropped == 0


def _unrelated_registry() -> Any:
    from tasklib_sqla import TaskRegistry

    r = TaskRegistry()

    @r.task(name="tests.unrelated")
    def unrelated() -> None:
        return None

    return r


async def test_tasks_holding_the_apps_small_pool_cannot_starve_the_worker(
    config: Config, client: TaskClient[Any], engine: AsyncEngine, db_url: str
) -> None:
    """Fault 4: a worker given the app's engine (pool of 2), with tasks holding its
    connections, lost its leases and had its tasks rerun by another worker."""
    app = create_async_engine(db_url, pool_size=1, max_overflow=1, pool_timeout=60)
    short = Config(lock_timeout_seconds=2.0, heartbeat_interval_seconds=0.4)
    t.App.engine = app
    rescuer = worker(
        config.replace(lock_timeout_seconds=2.0, heartbeat_interval_seconds=0.4),
        registry=_unrelated_registry(),
    )
    rescuing = asyncio.create_task(rescuer.run())
    try:
        # 8 tasks holding one of the 2 app connections for 1 s each: 4 s, twice the lease.
        ids = [await client.submit(t.hold_app_connection, seconds=1.0) for _ in range(8)]
        stats = await worker(short, engine=app, burst=True, concurrency=8).run()
    finally:
        t.App.engine = None
        rescuer.stop()
        await rescuing
        await app.dispose()
    got = await rows(engine)
    assert [(got[i].state, got[i].attempts) for i in ids] == [("completed", 1)] * 8
    assert (stats.completed, stats.dropped, rescuer.stats.rescued) == (8, 0, 0)


async def test_worker_statements_carry_timeouts(config: Config, engine: AsyncEngine) -> None:
    w = worker(config)
    async with w.engine.connect() as conn:
        settings = {
            name: await conn.scalar(text(f"SHOW {name}"))
            for name in (
                "statement_timeout",
                "lock_timeout",
                "application_name",
                "plan_cache_mode",
                "jit",
            )
        }
    await w.engine.dispose()
    assert settings == {
        "statement_timeout": "30s",
        "lock_timeout": "5s",
        "application_name": "tasklib-worker",
        "plan_cache_mode": "force_generic_plan",
        "jit": "off",
    }


# -- numbers that used to overflow ---------------------------------------------------------------


async def test_a_failure_at_a_huge_attempt_number_is_recorded(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 5: the retry delay overflowed at attempt 37 and left the task running for ever."""
    tid = await client.submit(t.always_fails, message="again")
    async with engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == tid).values(attempts=400, max_retries=900))
    c = config.replace(base_retry_delay_seconds=5.0, retry_backoff_multiplier=10.0)
    w = worker(c, burst=True)
    await w.run()
    row = (await rows(engine))[tid]
    assert (row.state, row.attempts) == ("pending", 401)
    async with engine.connect() as conn:
        wait = await conn.scalar(
            select(func.extract("epoch", Task.scheduled_at - func.now())).where(Task.id == tid)
        )
    # The cap (an hour) holds after the default jitter of ±10% too.
    assert wait is not None and 3600 * 0.9 - 1 < float(wait) <= 3600


async def test_rescue_survives_rows_with_huge_attempt_counts(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 5: one expired row with >= 42 attempts made the rescue fail for its whole batch."""
    big = await client.submit(t.add, a=1)
    small = await client.submit(t.add, a=2)
    async with engine.begin() as conn:
        for tid, attempts in ((big, 5000), (small, 1)):
            await conn.execute(
                update(Task)
                .where(Task.id == tid)
                .values(
                    state=TaskState.RUNNING,
                    attempts=attempts,
                    max_retries=10_000,
                    worker_id="dead-worker",
                    started_at=func.now(),
                    locked_until=func.now() - text("interval '1 second'"),
                )
            )
    w = worker(config)
    async with w.engine.connect() as conn:
        rescued = (await conn.execute(w._queries.rescue, rescue_params(5.0, 2.0, 3600.0))).all()
    await w.engine.dispose()
    assert {r.id for r in rescued} == {big, small}
    got = await rows(engine)
    assert got[big].state == got[small].state == "pending"
    assert got[big].errors[-1]["type"] == "WorkerLost"


# -- the error policy: permanent errors end the worker with one line ------------------------------


@pytest.mark.parametrize("burst", [True, False])
async def test_unknown_database_stops_the_worker_at_once(db_url: str, burst: bool) -> None:
    """Fault 8: a wrong URL made every worker, --burst included, retry forever."""
    url = db_url.rsplit("/", 1)[0] + "/no_such_database"
    started = time.monotonic()
    with pytest.raises(WorkerError, match='database "no_such_database" does not exist'):
        await worker(Config(database_url=url), burst=burst).run()
    assert time.monotonic() - started < 5


async def test_missing_table_stops_the_worker_at_once(config: Config, engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE tasks"))
    with pytest.raises(WorkerError, match='relation "tasks" does not exist'):
        await worker(config).run()


async def test_unreachable_server_stops_the_worker_after_the_startup_timeout() -> None:
    config = Config(database_url="postgresql://postgres@127.0.0.1:1/x", startup_timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(WorkerError, match="cannot reach the database"):
        await worker(config, burst=True).run()
    assert 1.0 <= time.monotonic() - started < 5


async def test_a_running_worker_gives_up_on_a_dropped_table(
    config: Config, engine: AsyncEngine
) -> None:
    w = worker(config.replace(fatal_error_seconds=1.0, poll_interval_seconds=0.1))
    run = asyncio.create_task(w.run())
    await asyncio.sleep(0.5)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE tasks"))
    started = time.monotonic()
    with pytest.raises(WorkerError, match="giving up"):
        await asyncio.wait_for(run, 15)
    assert time.monotonic() - started < 10


async def test_a_stop_while_starting_ends_the_worker_cleanly(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Stopped before its first claim: it returns, leaves no registry row and takes nothing."""
    tid = await client.submit(t.add, a=1)
    w = worker(config)  # not burst: it would work until stopped
    w.stop()
    stats = await asyncio.wait_for(w.run(), 20)
    assert stats.claimed == 0 and (await rows(engine))[tid].state == "pending"
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM tasks_workers")) == 0


@pytest.mark.slow
def test_sigterm_during_startup_exits_zero(db_url: str, sync_engine: Any) -> None:
    """Found by the long kill storm: SIGTERM between a worker's first heartbeat and the end of
    its start-up (the child-process warm-up) killed it with the signal (exit -15)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasklib_sqla", "worker", "tests.tasks:registry"],
        env={**os.environ, "TASKLIB_DATABASE_URL": db_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        with sync_engine.connect() as conn:
            # Registered: the preflight is done and the warm-up of timed tasks' children begins.
            while not conn.execute(text("SELECT count(*) FROM tasks_workers")).scalar():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
                conn.rollback()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_cli_says_one_line_and_exits_nonzero_for_a_wrong_database(db_url: str) -> None:
    url = db_url.rsplit("/", 1)[0] + "/no_such_database"
    proc = subprocess.run(
        [sys.executable, "-m", "tasklib_sqla", "worker", "tests.tasks:registry", "--burst"],
        env={**os.environ, "TASKLIB_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and 'database "no_such_database" does not exist' in errors[0]


def test_cli_schema_with_a_bad_model_says_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tasklib_sqla", "schema", "--model", "nope:X"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tasklib-sqla: error: cannot import 'nope': no such module"


# -- stopping and waking ------------------------------------------------------------------------


async def test_a_second_stop_skips_the_grace_period(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 8: a second SIGINT did not skip the grace period."""
    tid = await client.submit(t.slow_async, seconds=20.0)
    w = worker(config.replace(shutdown_grace_seconds=30.0))
    run = asyncio.create_task(w.run())

    async def running() -> bool:
        return (await rows(engine))[tid].state == "running"

    await wait_until(running, 10, "the task to start")
    w.stop()
    await asyncio.sleep(0.3)
    assert not run.done()  # the first stop waits for the task
    started = time.monotonic()
    w.stop()
    await asyncio.wait_for(run, 5)
    assert time.monotonic() - started < 2
    row = (await rows(engine))[tid]
    assert (row.state, row.attempts) == ("pending", 0)  # given back, the attempt returned


async def test_retries_start_when_due_not_at_the_next_poll(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 8: retries started up to one poll interval late."""
    tid = await client.submit(t.always_fails, message="x")  # max_retries=2: three attempts
    w = worker(config.replace(poll_interval_seconds=60.0, base_retry_delay_seconds=0.2))
    run = asyncio.create_task(w.run())
    started = time.monotonic()
    try:

        async def failed() -> bool:
            return (await rows(engine))[tid].state == "failed"

        await wait_until(failed, 10, "three attempts")
    finally:
        w.stop()
        await run
    # 0.2 s + 0.4 s of backoff, and a little time to run and record each attempt.
    assert time.monotonic() - started < 2.5
    assert (await rows(engine))[tid].attempts == 3


# -- first use: sync tasks submitting tasks -------------------------------------------------------


async def test_sync_tasks_submit_with_asyncio_run_in_threads_and_children(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 8: asyncio.run(submit_task(...)) in a sync task worked once, then the global
    engine was bound to a dead loop; in a timed task's child process there was no client."""
    parents = [await client.submit(t.submits_sync, n=n) for n in (1, 2, 3)]
    parents += [await client.submit(t.submits_sync_timed, n=n) for n in (4, 5)]
    await worker(config, burst=True, concurrency=5).run()
    got = await rows(engine)
    assert all(got[p].state == "completed" for p in parents), [got[p].error for p in parents]
    children = sorted(r.args["a"] for r in got.values() if r.name == "tests.add")
    assert children == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]  # each once
    assert all(r.state == "completed" for r in got.values())


# -- smaller bad inputs -------------------------------------------------------------------------


async def test_nul_in_an_exception_message_is_recorded(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Fault 7: a NUL in an exception message made the outcome unrecordable."""
    tid = await client.submit(t.nul_error)
    await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert row.state == "failed"
    assert row.error == "ValueError: bad\\x00byte"
    assert row.errors[0]["type"] == "ValueError"


async def test_error_of_arguments_that_no_longer_validate_is_one_line(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    tid = await client.submit(t.add, a=1)
    async with engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == tid).values(args={"a": "one"}))
    await worker(config, burst=True).run()
    row = (await rows(engine))[tid]
    assert row.state == "failed" and row.error is not None
    assert "\n" not in row.error and row.error.startswith("ValidationError: 1 validation error")
    assert "\n" in row.errors[0]["message"]  # the whole message stays in the history


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, "5", 1.5, True])
async def test_bad_priorities_are_argument_errors(
    client: TaskClient[Any], engine: AsyncEngine, priority: Any
) -> None:
    with pytest.raises(TaskArgumentsError, match="priority"):
        await client.submit(t.add.options(priority=priority), a=1)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(Task)) == 0


async def test_malformed_ids_name_no_task(client: TaskClient[Any]) -> None:
    assert await client.get("not-a-uuid") is None
    assert await client.get(str(uuid.uuid4())) is None
    assert await client.cancel("???") is False


async def test_get_task_is_none_for_a_malformed_id_with_init(config: Config) -> None:
    from tasklib_sqla import client as client_module
    from tasklib_sqla import init

    previous = client_module._client
    c = init(config)
    try:
        assert await get_task("x") is None
    finally:
        await c.dispose()
        client_module._client = previous

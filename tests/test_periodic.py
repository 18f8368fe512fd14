"""Periodic tasks: ticks computed from cron, inserted once by whichever worker comes first."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklib_sqla import Config, Schedule, TaskDefinitionError, TaskRegistry, TaskWorker
from tasklib_sqla.schedule import due_ticks, starting_point, tick_key, tick_of_key
from tests import periodic_tasks as p
from tests.test_multiprocess import Workers, scalar, wait_for

UTC_NOON = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)


def test_ticks_follow_cron_in_the_schedules_time_zone() -> None:
    every_10s = Schedule("* * * * * */10")  # seconds are the sixth field
    assert every_10s.ticks(UTC_NOON, UTC_NOON + timedelta(seconds=30)) == [
        UTC_NOON + timedelta(seconds=s) for s in (10, 20, 30)
    ]
    # 08:30 in Paris, on weekdays: 07:30 UTC in winter, 06:30 UTC after the switch to summer
    # time on Sunday 29 March 2026.
    paris = Schedule("30 8 * * 1-5", tz="Europe/Paris")
    ticks = paris.ticks(UTC_NOON, UTC_NOON + timedelta(days=4))
    assert ticks == [
        datetime(2026, 3, 30, 6, 30, tzinfo=UTC),
        datetime(2026, 3, 31, 6, 30, tzinfo=UTC),
        datetime(2026, 4, 1, 6, 30, tzinfo=UTC),
    ]
    assert paris.next_tick(UTC_NOON) == ticks[0]
    # 02:30 does not exist on 29 March in Paris: that night's run comes an hour later by the
    # clock (01:30 UTC); on 25 October 02:30 comes twice: it runs once, the first time.
    nightly = Schedule("30 2 * * *", tz="Europe/Paris")
    assert nightly.ticks(UTC_NOON, UTC_NOON + timedelta(days=2)) == [
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]
    autumn = datetime(2026, 10, 24, 12, tzinfo=UTC)
    assert nightly.ticks(autumn, autumn + timedelta(days=2)) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]


def test_missed_ticks_are_skipped_or_run_once() -> None:
    minutely = Schedule("* * * * *")
    last = UTC_NOON - timedelta(minutes=10)
    now = UTC_NOON + timedelta(seconds=20)
    skip = starting_point(minutely, last, now)
    assert skip == now and due_ticks(minutely, skip, now, catching_up=True) == []
    once = Schedule("* * * * *", missed="run_once")
    start = starting_point(once, last, now)
    assert start == last
    assert due_ticks(once, start, now, catching_up=True) == [UTC_NOON]  # the latest, once
    # Afterwards every tick counts.
    later = now + timedelta(minutes=2)
    assert len(due_ticks(once, now, later, catching_up=False)) == 2
    assert starting_point(once, None, now) == now  # never run before: nothing was missed


def test_tick_keys_sort_as_ticks_and_read_back() -> None:
    a, b = UTC_NOON, UTC_NOON + timedelta(milliseconds=1)
    assert tick_key(a) < tick_key(b)
    assert tick_of_key("periodic.skip:" + tick_key(b)) == b
    assert tick_of_key("plain-key") is None


def test_schedules_are_checked_when_defined() -> None:
    reg = TaskRegistry()
    with pytest.raises(TaskDefinitionError, match="not a cron expression"):
        reg.task(schedule="every day")(p.every_second.fn)
    with pytest.raises(TaskDefinitionError, match="unknown time zone"):
        Schedule("* * * * *", tz="Mars/Olympus")
    with pytest.raises(TaskDefinitionError, match="schedule's args"):

        @reg.task(name="needs_args", schedule="* * * * *")
        async def needs_args(n: int) -> None: ...


@pytest.fixture
def runs(sync_engine: Engine) -> None:
    with sync_engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE runs (name text NOT NULL, tick timestamptz NOT NULL, pid int)")
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_three_workers_run_a_one_second_schedule_once_per_tick(
    db_url: str, sync_engine: Engine, runs: None, tmp_path: Path
) -> None:
    workers = Workers(db_url, tmp_path)
    try:
        procs = [workers.start(target="tests.periodic_tasks:registry") for _ in range(3)]
        wait_for(
            lambda: scalar(sync_engine, "SELECT count(*) FROM tasks_workers") == 3,
            30,
            "three workers",
        )
        started = time.time()
        await asyncio.sleep(10.5)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, workers.output(proc)
    finally:
        workers.stop_all()
    window = (
        "FROM runs WHERE tick >= to_timestamp(:t0) AND tick < to_timestamp(:t0) + interval '10 s'"
    )
    runs_in_window = scalar(sync_engine, f"SELECT count(*) {window}", t0=started)
    distinct = scalar(sync_engine, f"SELECT count(DISTINCT tick) {window}", t0=started)
    assert 9 <= runs_in_window <= 11 and distinct == runs_in_window
    # No tick ran twice, in the window or out of it, and no tick row was written twice.
    assert scalar(sync_engine, "SELECT count(*) - count(DISTINCT tick) FROM runs") == 0
    assert scalar(sync_engine, "SELECT count(*) - count(DISTINCT unique_key) FROM tasks") == 0


async def _first_look(config: Config, engine: AsyncEngine, last: datetime) -> dict[str, Any]:
    """A worker starts after a gap: the last ticks any worker inserted were at ``last``."""
    async with engine.begin() as conn:
        for name in ("periodic.skip", "periodic.run_once"):
            await conn.execute(
                text(
                    "INSERT INTO tasks (name, state, completed_at, scheduled_at, unique_key, "
                    "unique_states) VALUES (:n, 'completed', :t, :t, :k, :s)"
                ),
                {
                    "n": name,
                    "t": last,
                    "k": f"{name}:{tick_key(last)}",
                    "s": ["pending", "running", "completed", "failed", "cancelled"],
                },
            )
    start = datetime.now(UTC)
    worker = TaskWorker(config, registry=p.minutes, handle_signals=False)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(1.5)
    worker.stop()
    await run
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT name, unique_key FROM tasks WHERE unique_key IS NOT NULL")
            )
        ).all()
    ticks = [(name, tick_of_key(key)) for name, key in rows]
    return {"start": start, "rows": [(n, t) for n, t in ticks if t is not None and t > last]}


async def test_after_a_gap_missed_ticks_are_skipped_or_run_once(
    config: Config, engine: AsyncEngine, runs: None
) -> None:
    last = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    seen = await _first_look(config, engine, last)
    start: datetime = seen["start"]
    by_name: dict[str, list[datetime]] = {}
    for name, tick in seen["rows"]:
        by_name.setdefault(name, []).append(tick)
    # run_once: one run for the four or five missed minutes, at the latest missed tick (and the
    # tick of a minute that began while the worker ran, if one did: that one is not missed).
    missed = [tick for tick in by_name.get("periodic.run_once", []) if tick <= start]
    assert missed == [start.replace(second=0, microsecond=0)]
    # skip: nothing from the gap; at most the tick of a minute that began after the start.
    assert all(tick > start for tick in by_name.get("periodic.skip", []))
    # The weekday report is not due: no row.
    assert "periodic.report" not in by_name

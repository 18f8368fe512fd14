"""Several worker processes against one database, started through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from tasklib_sqla import Task, TaskClient
from tests import mp_tasks

pytestmark = pytest.mark.slow


class Workers:
    """Starts CLI worker processes and makes sure none outlives the test."""

    def __init__(self, db_url: str, logs: Path) -> None:
        self.db_url = db_url
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, *args: str, target: str = "tests.mp_tasks:registry", **env: str
    ) -> subprocess.Popen[str]:
        environ = {
            **os.environ,
            "TASKLIB_DATABASE_URL": self.db_url,
            "TASKLIB_POLL_INTERVAL_SECONDS": "0.2",
            **env,
        }
        # Output goes to a file: a pipe nobody reads would stall a chatty worker.
        with open(self.logs / f"worker-{len(self.procs)}.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tasklib_sqla", "worker", target, *args],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[str]) -> str:
        return (self.logs / f"worker-{self.procs.index(proc)}.log").read_text()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def workers(db_url: str, sync_engine: Engine, tmp_path: Path) -> Iterator[Workers]:
    with sync_engine.begin() as conn:
        conn.execute(text("CREATE TABLE side_effects (n int PRIMARY KEY, pid int NOT NULL)"))
        conn.execute(text("CREATE TABLE started (n int NOT NULL, pid int NOT NULL)"))
    w = Workers(db_url, tmp_path)
    yield w
    w.stop_all()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


@pytest.mark.timeout(180)
async def test_workers_share_2000_tasks_exactly_once(
    workers: Workers, client: TaskClient[Any], sync_engine: Engine
) -> None:
    for start in range(0, 2000, 500):
        await client.submit_many(mp_tasks.record, [{"n": n} for n in range(start, start + 500)])
    procs = [workers.start("--concurrency", "8", "--burst") for _ in range(3)]
    for p in procs:
        assert p.wait(150) == 0, workers.output(p)
    with Session(sync_engine) as s:
        states = dict(s.execute(select(Task.state, func.count()).group_by(Task.state)).all())
        assert states == {"completed": 2000}
        assert s.scalar(select(func.count()).where(Task.attempts != 1)) == 0
        assert s.scalar(select(func.count()).where(func.jsonb_array_length(Task.errors) > 0)) == 0
    assert scalar(sync_engine, "SELECT count(*) FROM side_effects") == 2000
    # The work really was shared.
    assert scalar(sync_engine, "SELECT count(DISTINCT pid) FROM side_effects") >= 2


@pytest.mark.timeout(120)
async def test_killed_worker_task_is_rerun_elsewhere(
    workers: Workers, client: TaskClient[Any], sync_engine: Engine
) -> None:
    tid = await client.submit(mp_tasks.slow_record, n=1, seconds=2.0)
    lease = {"TASKLIB_LOCK_TIMEOUT_SECONDS": "2"}
    victim = workers.start(**lease)
    wait_for(
        lambda: scalar(sync_engine, "SELECT count(*) FROM started") == 1, 30, "the task to start"
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert scalar(sync_engine, "SELECT state FROM tasks WHERE id = :i", i=tid) == "running"
    rescuer = workers.start(**lease)
    wait_for(
        lambda: scalar(sync_engine, "SELECT state FROM tasks WHERE id = :i", i=tid) == "completed",
        40,
        "another worker to complete the task",
    )
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(20) == 0
    with Session(sync_engine) as s:
        row = s.get(Task, tid)
        assert row is not None and row.attempts == 2 and row.result == 1
        assert [e["type"] for e in row.errors] == ["WorkerLost"]
    assert scalar(sync_engine, "SELECT count(*) FROM side_effects") == 1


@pytest.mark.timeout(120)
async def test_task_that_kills_every_worker_ends_failed(
    workers: Workers, client: TaskClient[Any], sync_engine: Engine
) -> None:
    tid = await client.submit(mp_tasks.kill_worker)  # max_retries=1: two attempts at most
    env = {"TASKLIB_LOCK_TIMEOUT_SECONDS": "1", "TASKLIB_BASE_RETRY_DELAY_SECONDS": "0"}
    deadline = time.monotonic() + 60
    started = 0
    while scalar(sync_engine, "SELECT state FROM tasks WHERE id = :i", i=tid) != "failed":
        assert time.monotonic() < deadline, "the task never ended failed"
        proc = workers.start(**env)
        started += 1
        try:
            proc.wait(5)  # dies with the task, or idles once nothing is left to claim
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(10)
    with Session(sync_engine) as s:
        row = s.get(Task, tid)
        assert row is not None and row.attempts == 2
        assert [e["type"] for e in row.errors] == ["WorkerLost", "WorkerLost"]
    assert started <= 4


@pytest.mark.timeout(60)
async def test_cli_processes_and_stops_on_sigterm(
    workers: Workers, client: TaskClient[Any], sync_engine: Engine
) -> None:
    ids = [await client.submit(mp_tasks.record, n=n) for n in range(5)]
    proc = workers.start("--concurrency", "2")
    wait_for(
        lambda: scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state = 'completed'") == 5,
        30,
        "the tasks to complete",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, workers.output(proc)
    out = workers.output(proc)
    for tid in ids:
        assert f"[{tid}] attempt 1 started" in out
        assert f"[{tid}] attempt 1 completed in" in out
    assert "stopped" in out
    assert isinstance(ids[0], uuid.UUID)


def test_cli_rejects_a_bad_target(db_url: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasklib_sqla",
            "worker",
            "tests.mp_tasks:nothing_here",
            "--database-url",
            db_url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "nothing_here" in proc.stderr


def test_cli_schema_prints_the_ddl() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tasklib_sqla", "schema", "--model", "tests.test_models:HostTask"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "CREATE TABLE app_jobs" in proc.stdout
    assert "CREATE TRIGGER app_jobs_tasklib_notify AFTER INSERT ON app_jobs" in proc.stdout


def test_suite_stops_at_once_without_a_server(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/test_units.py"],
        env={**os.environ, "TASKLIB_TEST_PG_PORT": "1"},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "no PostgreSQL at postgres@127.0.0.1:1" in proc.stdout + proc.stderr
    assert "TASKLIB_TEST_PG_HOST" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["quickstart.py", "sync_app.py"])
def test_examples_run(script: str, sync_url: str) -> None:
    """The README's demo and the sync example keep working (against this test's database)."""
    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / script)],
        env={**os.environ, "TASKLIB_DATABASE_URL": sync_url.replace("+psycopg", "")},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if script == "quickstart.py":
        assert "1 user, 3 tasks" in proc.stdout
        assert "billing.charge       failed            2  ValueError: card declined" in proc.stdout
        assert "users.make_avatar    completed         2" in proc.stdout
    else:
        assert (
            "task reports.render: completed, result {'report_id': 1, 'pages_rendered': 12}"
            in proc.stdout
        )


@pytest.mark.timeout(120)
async def test_sync_tasks_submit_children_under_the_cli_worker(
    workers: Workers, client: TaskClient[Any], sync_engine: Engine
) -> None:
    """Untimed (thread) and timed (child process) sync tasks submit children: with
    asyncio.run(submit_task(...)), and through their TaskContext (submit_sync)."""
    from tests import tasks as t

    parents: list[uuid.UUID] = [
        await client.submit(t.submits_sync, n=1),
        await client.submit(t.submits_sync_timed, n=2),
        await client.submit(t.ctx_spawn_thread, n=3),
        await client.submit(t.ctx_spawn_child, n=4),
    ]
    proc = workers.start("--burst", target="tests.tasks:registry")
    assert proc.wait(90) == 0, workers.output(proc)
    with Session(sync_engine) as s:
        rows = s.scalars(select(Task)).all()
    by_id = {r.id: r for r in rows}
    assert [by_id[p].state for p in parents] == ["completed"] * 4, [by_id[p].error for p in parents]
    children = sorted((r.args["a"], r.parent_id) for r in rows if r.name == "tests.add")
    assert children == [
        (3, parents[2]),
        (4, parents[3]),
        (10, None),
        (11, None),
        (20, None),
        (21, None),
    ]
    assert all(r.state == "completed" for r in rows)

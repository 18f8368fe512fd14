"""examples/fastapi_app.py through FastAPI's own test client, against the real database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import MetaData

from examples import fastapi_app as ex
from tasklib_sqla import TaskMixin
from tasklib_sqla.testing import TaskQueue, TestDatabase

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tasklib_metadata() -> MetaData:
    return ex.Base.metadata


@pytest.fixture
def tasklib_model() -> type[TaskMixin]:
    return ex.AppTask


@pytest.fixture
def client(tasklib: TaskQueue, tasklib_database: TestDatabase) -> Iterator[TestClient]:
    with TestClient(ex.create_app(tasklib_database.url, run_worker=False)) as c:
        yield c


def test_signup_commits_the_user_and_its_task_together(
    client: TestClient, tasklib: TaskQueue
) -> None:
    created = client.post("/users", json={"email": "ada@example.com"})
    assert created.status_code == 201, created.text
    body = created.json()
    row = tasklib.assert_submitted(ex.send_welcome, email="ada@example.com")
    assert str(row.id) == body["task_id"] and row.args["user_id"] == body["user_id"]

    # A duplicate address rolls the request's transaction back: no second task.
    again = client.post("/users", json={"email": "ada@example.com"})
    assert again.status_code == 409
    assert len(tasklib.submitted(ex.send_welcome)) == 1

    shown = client.get(f"/tasks/{body['task_id']}").json()
    assert shown["state"] == "pending" and shown["name"] == "examples.fastapi.send_welcome"

    tasklib.run()
    shown = client.get(f"/tasks/{body['task_id']}").json()
    assert shown["state"] == "completed"
    assert shown["result"] == f"welcome sent to ada@example.com (user {body['user_id']})"
    assert client.get("/tasks/00000000-0000-0000-0000-000000000000").status_code == 404


def _wait_for(client: TestClient, task_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        shown: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
        if shown["state"] == state or time.monotonic() > deadline:
            return shown
        time.sleep(0.05)


def test_the_worker_can_run_in_the_apps_lifespan(
    tasklib: TaskQueue, tasklib_database: TestDatabase
) -> None:
    app = ex.create_app(tasklib_database.url, run_worker=True)
    with TestClient(app) as client:
        task_id = client.post("/users", json={"email": "bob@example.com"}).json()["task_id"]
        # The lifespan's worker wakes on the insert's NOTIFY.
        assert _wait_for(client, task_id, "completed")["state"] == "completed"
    # Leaving the client ran the lifespan's shutdown: the worker stopped cleanly.
    assert tasklib.assert_submitted(ex.send_welcome).worker_id is not None


@pytest.mark.slow
def test_a_separate_worker_process_runs_the_apps_tasks(
    client: TestClient, tasklib_database: TestDatabase
) -> None:
    task_id = client.post("/users", json={"email": "cy@example.com"}).json()["task_id"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASKLIB_DATABASE_URL": tasklib_database.url}
    worker = ["tasklib_sqla", "worker", "examples.fastapi_app", "--burst"]
    done = subprocess.run(
        [sys.executable, "-m", *worker, "--model", "examples.fastapi_app:AppTask"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert client.get(f"/tasks/{task_id}").json()["state"] == "completed"

"""submit_task_sync / submit_tasks_sync: the async client from synchronous code."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tasklib_sqla import Config, TaskClient, TaskRegistry, submit_task_sync, submit_tasks_sync
from tasklib_sqla.blocking import background
from tasklib_sqla.testing import TaskQueue, TestDatabase
from tests import tasks as t


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


def test_sync_code_submits_one_and_many(tasklib: TaskQueue) -> None:
    one = submit_task_sync(t.add, a=1, b=2)
    many = submit_tasks_sync(t.add, [{"a": 10}, {"a": 20}])
    assert tasklib.assert_submitted(t.add, a=1, b=2).id == one
    assert {r.id for r in tasklib.submitted(t.add)} == {one, *many}
    report = tasklib.run()
    assert sorted(r.result for r in report.completed) == [3, 11, 21]


def test_calls_share_one_pooled_connection(tasklib_database: TestDatabase) -> None:
    client: TaskClient[Any] = TaskClient(Config(database_url=tasklib_database.url))
    try:
        for i in range(20):
            client.submit_sync(t.add, a=i)
        watcher = create_engine(tasklib_database.sync_url)
        with watcher.connect() as conn:
            open_ = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        watcher.dispose()
        # asyncio.run(submit_task(...)) would have opened (and closed) 20 connections.
        assert open_ == 1
    finally:
        background.run(client.dispose)


async def test_sync_forms_refuse_to_block_a_running_loop(tasklib: TaskQueue) -> None:
    with pytest.raises(RuntimeError, match="await the async form"):
        submit_task_sync(t.add, a=1)
    await tasklib.aassert_not_submitted(t.add)


def test_a_failure_comes_back_to_the_caller(tasklib: TaskQueue) -> None:
    with pytest.raises(ValueError, match="invalid arguments"):
        submit_task_sync(t.add, a="1")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_a_loop_of_its_own(tasklib: TaskQueue) -> None:
    """gunicorn --preload: the app submits before forking its workers, which submit too."""
    submit_task_sync(t.add, a=1)  # the parent's background thread is running now
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not survive the fork
        code = 1
        try:
            submit_task_sync(t.add, a=2)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tasklib.assert_submitted(t.add, a=2).state == "pending"

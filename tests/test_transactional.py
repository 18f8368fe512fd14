"""Transactional tasks: the task's writes and its completion commit together, or not at all."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from tasklib_sqla import (
    SESSION,
    Config,
    Task,
    TaskArgumentsError,
    TaskClient,
    TaskDefinitionError,
    TaskRegistry,
    TaskWorker,
)
from tests import tx_tasks as tx


@pytest.fixture(autouse=True)
async def ledger(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(tx.Base.metadata.create_all)


def worker(config: Config, **kw: Any) -> TaskWorker:
    kw.setdefault("registry", tx.registry)
    kw.setdefault("handle_signals", False)
    kw.setdefault("burst", True)
    return TaskWorker(config, **kw)


async def ledger_ns(engine: AsyncEngine) -> list[int]:
    async with AsyncSession(engine) as s:
        return sorted((await s.scalars(select(tx.Ledger.n))).all())


async def row(engine: AsyncEngine, task_id: uuid.UUID) -> Task:
    async with AsyncSession(engine, expire_on_commit=False) as s:
        got = await s.get(Task, task_id)
        assert got is not None
        return got


async def test_writes_and_completion_commit_together(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    a = await client.submit(tx.book, n=1)
    b = await client.submit(tx.book_sync, n=2)
    stats = await worker(config).run()
    assert (stats.completed, stats.failed) == (2, 0)
    assert await ledger_ns(engine) == [1, 2]
    assert (await row(engine, a)).result == 1
    # The sync task saw its own uncommitted row through its Session.
    assert (await row(engine, b)).result == 1


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        (tx.book_then_fail, "RuntimeError: after booking"),
        (tx.book_with_timeout, "TaskTimeoutError"),
        (tx.book_bad_result, "TaskResultError"),
        (tx.rolls_back, "TransactionRolledBack"),
    ],
    ids=["raises after session.commit()", "timeout", "bad result", "rolled back by the task"],
)
async def test_a_failed_attempt_leaves_no_write(
    config: Config, client: TaskClient[Any], engine: AsyncEngine, fn: Any, error: str
) -> None:
    tid = await client.submit(fn, n=3)
    await worker(config).run()
    got = await row(engine, tid)
    assert got.state == "failed" and got.error is not None and got.error.startswith(error)
    assert await ledger_ns(engine) == []


async def test_a_failure_is_retried_and_the_retry_writes_once(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    tid = await client.submit(tx.book_bad_result.options(), n=4)  # fails for good: no write
    ok = await client.submit(tx.book, n=5)
    await worker(config).run()
    assert (await row(engine, tid)).state == "failed"
    assert (await row(engine, ok)).attempts == 1
    assert await ledger_ns(engine) == [5]


async def test_children_added_in_the_transaction_exist_only_if_it_commits(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    parent = await client.submit(tx.book_and_spawn, n=6)
    await worker(config).run()
    async with AsyncSession(engine) as s:
        child = (await s.scalars(select(Task).where(Task.parent_id == parent))).one()
    assert (child.name, child.state, child.result) == ("tx.book", "completed", 1006)
    assert await ledger_ns(engine) == [6, 1006]


async def test_a_lost_lease_rolls_the_attempt_back(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Another worker took the task over while it ran: this attempt's write must not land."""
    tid = await client.submit(tx.book, n=7, seconds=1.0)
    w = worker(config, burst=False)
    run = asyncio.create_task(w.run())
    try:
        for _ in range(200):
            if len(await ledger_ns(engine)) == 0 and (await row(engine, tid)).state == "running":
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the task has flushed its row and sleeps
        async with engine.begin() as conn:  # what a rescuer and a second claim leave behind
            await conn.execute(
                update(Task)
                .where(Task.id == tid)
                .values(worker_id="someone-else", attempts=Task.attempts + 1)
            )
        for _ in range(300):
            if w.stats.dropped:
                break
            await asyncio.sleep(0.01)
    finally:
        w.stop()
        await run
    assert w.stats.dropped == 1 and w.stats.completed == 0
    assert await ledger_ns(engine) == []
    got = await row(engine, tid)
    assert (got.state, got.worker_id) == ("running", "someone-else")


async def test_the_session_holds_a_connection_of_its_own_pool(
    config: Config, client: TaskClient[Any], engine: AsyncEngine
) -> None:
    """Ten transactional tasks at once, each holding its transaction for a while."""
    ids = [await client.submit(tx.book, n=n, seconds=0.3) for n in range(10)]
    stats = await worker(config, concurrency=10).run()
    assert stats.completed == 10
    assert await ledger_ns(engine) == list(range(10))
    assert {(await row(engine, i)).state for i in ids} == {"completed"}


def test_definitions_are_checked() -> None:
    reg = TaskRegistry()
    with pytest.raises(TaskDefinitionError, match="give it a parameter for its session"):

        @reg.task(transactional=True)
        async def no_session(n: int) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"transactional=True"):

        @reg.task
        async def undeclared(n: int, session: AsyncSession = SESSION) -> None: ...

    with pytest.raises(TaskDefinitionError, match="receives an AsyncSession, not a Session"):

        @reg.task(transactional=True)
        async def wrong_kind(n: int, session: Session = SESSION) -> None: ...

    with pytest.raises(TaskDefinitionError, match="default SESSION"):

        @reg.task(transactional=True)
        async def no_default(n: int, session: AsyncSession) -> None: ...

    with pytest.raises(TaskDefinitionError, match="no timeout can stop it"):

        @reg.task(transactional=True, timeout_seconds=1)
        def timed_sync(n: int, session: Session = SESSION) -> None: ...


async def test_the_session_is_not_an_argument(client: TaskClient[Any], engine: AsyncEngine) -> None:
    with pytest.raises(TaskArgumentsError, match="'session' is its session"):
        await client.submit(tx.book, n=1, session=None)  # type: ignore[arg-type]
    async with AsyncSession(engine) as s:
        assert await s.scalar(select(func.count()).select_from(Task)) == 0
    # A direct call passes its own session.
    async with AsyncSession(engine) as s:
        assert await tx.book.fn(n=9, session=s) == 9
        await s.rollback()

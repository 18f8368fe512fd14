"""Transactional tasks: the task's database writes and its completion commit together.

A task declared with ``@task(transactional=True)`` receives a session bound to a transaction
that the worker opens for the attempt. When the task returns, the worker records the
completion *in that same transaction*, with the same ownership check as every other outcome
(``worker_id``, attempt, ``state = 'running'``), then commits:

- the task's writes and its completion become visible together, or not at all;
- the completion's UPDATE takes the task row's lock. A rescuer or another worker that took the
  task over (lease expired) has changed the row: the UPDATE matches nothing and the task's
  writes are rolled back. A rescuer that comes later finds the row completed, or waits for the
  lock and then finds it so. Either way one attempt's writes win, never two;
- a worker killed mid-task (even by SIGKILL) leaves an open transaction whose connection the
  server sees close: PostgreSQL rolls it back, and the rerun starts from a clean slate.

So a task whose effects are all in this database takes effect exactly once. Effects outside
it (an e-mail, an HTTP call) remain at-least-once, as with any task.

The session joins the worker's transaction in ``rollback_only`` mode: ``session.commit()`` in
the task only flushes (the worker commits), ``session.rollback()`` rolls the whole attempt back.
Sync transactional tasks receive a ``Session`` through SQLAlchemy's ``run_sync`` bridge: they
run on the worker's event loop, so they should do database work only (no long blocking calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from .config import Config
from .definition import TaskDefinition
from .errors import DB_ERRORS, one_line
from .finisher import Finisher, Outcome
from .logs import task_fields
from .runner import ClaimedTask, Failure, context_of, failure_of, timeout_error

logger = logging.getLogger("tasklib_sqla.worker")


class Recorded:
    """The attempt's outcome is already written (committed with the task's transaction)."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED = Recorded()


def task_engine(database_url: str, config: Config, concurrency: int) -> AsyncEngine:
    """The pool that transactional tasks run their transactions on, one connection per task.

    Apart from the worker's own pool, so that long task transactions never hold up the
    heartbeat or the outcome writes. A transaction left idle for longer than a lease is ended
    by the server: by then another worker may run the task again, and the stale attempt's
    locks must not hold that one up.
    """
    idle_ms = int(config.lock_timeout_seconds * 1000)
    return create_async_engine(
        database_url,
        pool_size=concurrency,
        max_overflow=0,
        connect_args={
            "timeout": 10,
            "server_settings": {
                "idle_in_transaction_session_timeout": str(idle_ms),
                "application_name": "tasklib-task",
            },
        },
    )


async def run_transactional(
    definition: TaskDefinition[Any, Any],
    job: ClaimedTask,
    engine: AsyncEngine,
    finisher: Finisher,
    decide: Callable[[ClaimedTask, str], Outcome],
    worker_id: str,
) -> str | Failure | Recorded:
    """Run one attempt of a transactional task; record its completion in its transaction.

    Returns RECORDED once the completion is committed (or refused by the ownership check, the
    task's writes then rolled back), or the Failure to record as usual: the task raised, its
    result does not validate, or its transaction could not be committed.
    """
    try:
        kwargs = definition.load_args(job.args_json)
    except ValidationError as exc:
        return Failure.from_exception(exc, retryable=False)
    if definition.context_param is not None:
        kwargs[definition.context_param] = context_of(job, worker_id)
    param = definition.session_param
    assert param is not None  # a transactional definition always has one
    try:
        conn = await engine.connect()
    except DB_ERRORS as exc:
        return Failure.from_exception(exc)
    try:
        trans = await conn.begin()
        session = AsyncSession(bind=conn, join_transaction_mode="rollback_only")
        try:
            value = await _call(definition, job, session, param, kwargs)
            await session.flush()  # what the task left pending in its session belongs to it
        except asyncio.CancelledError:
            raise  # lease lost or shutdown: the transaction is rolled back below
        except BaseException as exc:  # the task's failure, SystemExit included
            return failure_of(definition, exc)
        finally:
            await session.close()
        if not trans.is_active:
            return Failure(
                type="TransactionRolledBack",
                message=f"task {job.name!r} rolled its transaction back and then returned; "
                "raise an exception to fail an attempt",
                traceback=None,
            )
        try:
            result = definition.dump_result(value)
        except ValueError as exc:  # TaskResultError
            return Failure.from_exception(exc, retryable=False)
        outcome = decide(job, result)
        # From here on the attempt is settled one way or the other: a cancellation (a lease
        # found lost by the heartbeat meanwhile) must not cut the commit in two.
        commit = asyncio.ensure_future(_record_and_commit(conn, finisher, outcome))
        try:
            return await asyncio.shield(commit)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await commit
            raise
    finally:
        with contextlib.suppress(*DB_ERRORS, OSError):
            await conn.close()  # rolls back whatever was not committed


async def _call(
    definition: TaskDefinition[Any, Any],
    job: ClaimedTask,
    session: AsyncSession,
    param: str,
    kwargs: dict[str, Any],
) -> Any:
    if not definition.is_async:
        return await session.run_sync(
            lambda sync_session: definition.fn(**kwargs, **{param: sync_session})
        )
    call = definition.fn(**kwargs, **{param: session})
    if job.timeout_seconds is None:
        return await call
    try:
        async with asyncio.timeout(job.timeout_seconds):
            return await call
    except TimeoutError as exc:
        raise timeout_error(job) from exc


async def _record_and_commit(
    conn: AsyncConnection, finisher: Finisher, outcome: Outcome
) -> Recorded | Failure:
    statement, params = finisher.statement([outcome])
    try:
        written = {r[0] for r in await conn.execute(statement, params)}
        if written:
            await conn.commit()
        else:
            await conn.rollback()
    except DB_ERRORS as exc:
        # The commit's fate is unknown. Recorded as a failed attempt through the usual path:
        # if the commit did go through, the task is completed and fencing refuses the failure.
        logger.warning(
            "task %s [%s]: its transaction could not be committed (%s)",
            outcome.job.name,
            outcome.job.id,
            one_line(exc),
            extra=task_fields(outcome.job, finisher.worker_id),
        )
        return Failure(
            type="CommitFailed",
            message=f"the task's transaction could not be committed: {one_line(exc)}",
            traceback=None,
        )
    finisher.settle([outcome], written)
    return RECORDED

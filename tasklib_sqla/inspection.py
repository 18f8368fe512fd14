"""Reading and managing tasks: get, is_completed, cancel, retry, purge.

Each operation is written once against a synchronous ``Session``; an ``AsyncSession`` runs the
same function through ``run_sync``. State changes are single statements guarded by the state
they expect, so they never race a worker into an impossible state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from .exceptions import TaskNotFoundError
from .models import FINISHED_STATES, TaskMixin, TaskState
from .queries import count_down

T = TypeVar("T")
M = TypeVar("M", bound=TaskMixin)


def fetch_task(session: Session, model: type[M], task_id: uuid.UUID | str) -> M | None:
    """The task row, freshly read (never a stale copy from the identity map), or None.

    None too for a string that is not a task id at all: no task has it.
    """
    tid = _uuid(task_id)
    if tid is None:
        return None
    return session.get(model, tid, populate_existing=True)


def task_is_completed(session: Session, model: type[TaskMixin], task_id: uuid.UUID | str) -> bool:
    """True if the task completed; raises TaskNotFoundError for an unknown or malformed id."""
    tid = _uuid(task_id)
    state = None if tid is None else session.scalar(select(model.state).where(model.id == tid))
    if state is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    return state == TaskState.COMPLETED


def cancel(
    session: Session,
    model: type[TaskMixin],
    task_id: uuid.UUID | str,
    done_channel: str | None = None,
) -> bool:
    """Cancel a task that has not finished; True if this call cancelled it.

    A pending task is never claimed afterwards. A running task is marked cancelled at once;
    its worker learns at its next heartbeat that it no longer owns the task, stops it if it
    can (async tasks), and its late outcome is refused. Waiters on its result are told on
    ``done_channel`` when the caller commits.
    """
    tid = _uuid(task_id)
    if tid is None:
        return False
    cancelled = (
        update(model)
        .where(model.id == tid)
        .where(model.state.in_([TaskState.PENDING, TaskState.RUNNING]))
        .values(state=TaskState.CANCELLED, completed_at=func.now(), locked_until=None)
        .returning(model.id, model.state, model.group_id)
        .cte("cancelled")
    )
    # A cancelled group member counts down its follow-up in the same statement, as the
    # finish statement and the rescuer do for members that end.
    stmt = select(cancelled.c.id).add_cte(count_down(model, cancelled))
    if session.execute(stmt).first() is None:
        return False
    if done_channel is not None:
        session.execute(select(func.pg_notify(done_channel, str(tid))))
    return True


def retry(session: Session, model: type[TaskMixin], task_id: uuid.UUID | str, channel: str) -> bool:
    """Put a failed or cancelled task back to pending, due now, with one more attempt allowed.

    Its error history stays. True if this call moved it. Wakes workers on commit. A member of
    a group is refused (``ValueError``): its end has been counted towards the group's follow-up
    already, and a second end would be counted again.
    """
    tid = _uuid(task_id)
    if tid is None:
        return False
    stmt = (
        update(model)
        .where(model.id == tid)
        .where(model.state.in_([TaskState.FAILED, TaskState.CANCELLED]))
        .where(model.group_index.is_(None))
        .values(
            state=TaskState.PENDING,
            scheduled_at=func.now(),
            completed_at=None,
            locked_until=None,
            worker_id=None,
            result=None,
            # Exhausted tasks get exactly one more attempt; others keep what they had left.
            max_retries=func.greatest(model.max_retries, model.attempts),
        )
        .returning(model.queue)
        .execution_options(synchronize_session=False)
    )
    queue = session.execute(stmt).scalar()
    if queue is None:
        member = session.execute(
            select(model.group_id, model.group_index).where(
                model.id == tid, model.group_index.is_not(None)
            )
        ).first()
        if member is not None:
            raise ValueError(
                f"task {tid} is member {member.group_index} of group {member.group_id}: its end "
                "has been counted towards the group's follow-up, so it cannot be retried; "
                "submit the call again, or retry the follow-up"
            )
        return False
    session.execute(select(func.pg_notify(channel, queue)))
    return True


def purge(
    session: Session,
    model: type[TaskMixin],
    older_than: timedelta,
    states: frozenset[TaskState] = FINISHED_STATES,
) -> int:
    """Delete finished tasks whose ``completed_at`` is older than ``older_than``; the count."""
    bad = set(states) - FINISHED_STATES
    if bad:
        raise ValueError(f"only finished tasks can be purged, not {sorted(bad)}")
    stmt = (
        delete(model)
        .where(model.state.in_(list(states)))
        .where(model.completed_at < func.now() - older_than)
        .execution_options(synchronize_session=False)
    )
    result: Any = session.execute(stmt)
    return int(result.rowcount)


async def run_in_session(
    session: AsyncSession | None,
    engine: AsyncEngine | None,
    fn: Callable[[Session], T],
    *,
    commit: bool,
) -> T:
    """Run ``fn`` in the caller's AsyncSession, or in a short session of its own on ``engine``.

    With the caller's session, nothing is committed: their transaction decides.
    """
    if session is not None:
        return await session.run_sync(fn)
    if engine is None:
        raise TypeError("either a session or an engine is needed")
    async with AsyncSession(engine, expire_on_commit=False) as own:
        out = await own.run_sync(fn)
        if commit:
            await own.commit()
        return out


def _uuid(value: uuid.UUID | str) -> uuid.UUID | None:
    """The id as a UUID; None for anything that cannot be a task id (so no task has it)."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError):
        return None

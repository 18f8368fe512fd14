"""Retention: deleting finished tasks once they are old, in small batches.

Workers call :func:`prune` every ``Config.prune_interval_seconds`` (it also removes the registry
rows of workers dead for over an hour); a PostgreSQL advisory
lock (per task table) lets one worker at a time do it, whichever gets there first. Each batch is
one short autocommit statement that skips rows someone else holds, so pruning never holds
locks for long and claims carry on beside it. ``tasklib-sqla tasks purge`` uses the same
statement.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Float, Integer, any_, bindparam, delete, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .models import FINISHED_STATES, TaskMixin, workers_table_of
from .queries import seconds

#: Registry rows of workers gone for this long (killed, or lost without a clean stop) go too.
DEAD_WORKER_SECONDS = 3600.0

#: Rows per DELETE statement, and the pause between statements (room for the claims).
BATCH = 1000
PAUSE = 0.05


def _delete_old(model: type[TaskMixin], state: str) -> Any:
    # The state is inlined, like the worker's statements, so that each state's statement is
    # planned for it; the age and the batch size are parameters.
    old = (
        select(model.id)
        .where(
            model.state == literal_column(f"'{state}'"),
            model.completed_at < func.now() - seconds(bindparam("age", type_=Float)),
        )
        .limit(bindparam("batch", type_=Integer))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # `id = ANY(ARRAY(...))`, not `id IN (...)`, as in the claim (queries._take): with IN the
    # planner may join the batch's ids to a sequential scan of the whole table, once per batch
    # (seen at 20,000 and 200,000 rows). The batch is read from ix_<t>_finished.
    return delete(model).where(model.id == any_(func.array(old)))


async def delete_old(
    conn: AsyncConnection,
    model: type[TaskMixin],
    state: str,
    age_seconds: float,
    batch: int = BATCH,
    pause: float = PAUSE,
) -> int:
    """Delete tasks in ``state`` finished over ``age_seconds`` ago, batch by batch; the count.

    ``conn`` must be in autocommit, so that every batch commits (and unlocks) on its own.
    """
    if state not in FINISHED_STATES:
        raise ValueError(f"only finished tasks can be purged, not {state!r}")
    statement = _delete_old(model, state)
    deleted = 0
    while True:
        result: Any = await conn.execute(statement, {"age": age_seconds, "batch": batch})
        deleted += int(result.rowcount)
        if result.rowcount < batch:
            return deleted
        await asyncio.sleep(pause)


async def delete_dead_workers(conn: AsyncConnection, model: type[TaskMixin]) -> int:
    """Delete registry rows of workers whose lease ran out over an hour ago; the count."""
    w = workers_table_of(model)
    result: Any = await conn.execute(
        delete(w).where(
            w.c.last_seen_at + seconds(w.c.lease_seconds)
            < func.now() - seconds(bindparam("dead", type_=Float))
        ),
        {"dead": DEAD_WORKER_SECONDS},
    )
    return int(result.rowcount)


def _lock_key(model: type[TaskMixin]) -> Any:
    return func.hashtext(f"tasklib_prune:{model.__tablename__}")  # type: ignore[attr-defined]


async def prune(
    engine: AsyncEngine,
    model: type[TaskMixin],
    retention: dict[str, float],
    batch: int = BATCH,
    pause: float = PAUSE,
) -> dict[str, int] | None:
    """One round of retention; the deleted counts by state, or None if another worker prunes.

    The advisory lock is a session lock on this connection: if the connection dies, PostgreSQL
    releases it, and another worker takes over at its next round.
    """
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if not await conn.scalar(select(func.pg_try_advisory_lock(_lock_key(model)))):
            return None
        try:
            counts = {
                state: await delete_old(conn, model, state, age, batch, pause)
                for state, age in retention.items()
            }
            counts["workers"] = await delete_dead_workers(conn, model)
            return counts
        finally:
            await conn.scalar(select(func.pg_advisory_unlock(_lock_key(model))))

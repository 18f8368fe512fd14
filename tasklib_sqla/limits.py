"""Cluster-wide limits on a queue or a task name: set, remove and read them.

A limit is a row of ``<table>_limits``; the claim (``steered.py``) enforces it. Setting one
announces it on ``<notify_channel>_queues``, like a pause, so every worker switches to the
steered claim with its next claim (and at its next heartbeat at the latest).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Float, and_, case, cast, column, func, literal_column, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .models import TaskMixin, limits_table_of

#: The two things a limit can apply to.
KINDS = ("queue", "name")


@dataclass(frozen=True)
class Limit:
    """One limit as it stands: its settings and what it is counting now."""

    kind: str
    key: str
    concurrency: int | None
    rate: int | None
    per_seconds: float | None
    #: Tasks running now under it (read from the task table).
    running: int
    #: Starts it let through in the last ``per_seconds`` (0 without a rate).
    recent_starts: int


def target(queue: str | None, name: str | None) -> tuple[str, str]:
    """``(kind, key)`` for ``queue=`` or ``name=``: exactly one of them."""
    if (queue is None) == (name is None):
        raise ValueError("a limit applies to a queue or to a task name: pass one of them")
    kind, key = ("queue", queue) if queue is not None else ("name", name)
    limit = 100 if kind == "queue" else 200
    if not isinstance(key, str) or not key or len(key) > limit:
        raise ValueError(f"{kind} must be a non-empty string of <= {limit} chars")
    return kind, key


def settings(
    concurrency: int | None, rate: int | None, per: float | timedelta | None
) -> tuple[int | None, int | None, float | None]:
    """Checked limit settings: ``concurrency`` and/or ``rate`` per ``per`` seconds."""
    for label, value in (("concurrency", concurrency), ("rate", rate)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{label} must be an int, not {type(value).__name__}")
        if value is not None and value < 1:
            raise ValueError(f"{label} must be at least 1, not {value}")
    per_seconds = per.total_seconds() if isinstance(per, timedelta) else per
    if (rate is None) != (per_seconds is None):
        raise ValueError("a rate needs its period: pass rate= and per= together")
    if per_seconds is not None and not per_seconds > 0:
        raise ValueError(f"per must be a positive number of seconds, not {per!r}")
    if concurrency is None and rate is None:
        raise ValueError("a limit needs concurrency=, or rate= and per=, or both")
    return concurrency, rate, None if per_seconds is None else float(per_seconds)


def _epoch(value: Any) -> Any:
    return cast(func.extract("epoch", value), Float)


async def set_limit(
    engine: AsyncEngine,
    model: type[TaskMixin],
    channel: str,
    kind: str,
    key: str,
    concurrency: int | None,
    rate: int | None,
    per_seconds: float | None,
) -> None:
    """Create or replace the limit on ``(kind, key)``, counting what runs already.

    The book starts from the task table: the tasks running now are its holders, and (for a
    rate the limit did not have) the tasks started in the last two periods are its starts. It
    is read after the limit's row lock is taken, so no claim of the limit can slip between.
    """
    lim = limits_table_of(model)
    tasks: Any = model.__table__  # type: ignore[attr-defined]
    mine = (tasks.c.queue if kind == "queue" else tasks.c.name) == key
    running = (
        select(
            func.coalesce(
                func.jsonb_agg(
                    func.jsonb_build_array(tasks.c.id, tasks.c.attempts, _epoch(func.now()))
                ),
                literal_column("'[]'::jsonb"),
            )
        )
        .where(mine, tasks.c.state == literal_column("'running'"))
        .scalar_subquery()
    )
    started = (
        select(
            func.coalesce(
                func.jsonb_agg(func.jsonb_build_array(_epoch(tasks.c.started_at), 1)),
                literal_column("'[]'::jsonb"),
            )
        )
        .where(
            mine,
            tasks.c.started_at > func.now() - timedelta(seconds=2 * (per_seconds or 0)),
        )
        .scalar_subquery()
    )
    empty: Any = literal_column("'[]'::jsonb")
    row = and_(lim.c.kind == kind, lim.c.key == key)
    async with engine.begin() as conn:
        old = (await conn.execute(select(lim.c.rate).where(row).with_for_update())).first()
        # A rate kept keeps its book; a new one starts from the task table.
        keep_starts = old is not None and old.rate is not None and rate is not None
        values = {
            "concurrency": concurrency,
            "rate": rate,
            "per_seconds": per_seconds,
            "holders": running if concurrency is not None else empty,
            "starts": lim.c.starts if keep_starts else started if rate is not None else empty,
            "changed_at": func.now(),
        }
        if old is None:
            # A concurrent set_limit may have created it meanwhile: then this one replaces it.
            write: Any = (
                pg_insert(lim)
                .values(kind=kind, key=key, **values)
                .on_conflict_do_update(index_elements=[lim.c.kind, lim.c.key], set_=values)
            )
        else:
            write = lim.update().where(row).values(**values)
        await conn.execute(write)
        await conn.execute(select(func.pg_notify(f"{channel}_queues", key)))


async def remove_limit(
    engine: AsyncEngine, model: type[TaskMixin], channel: str, kind: str, key: str
) -> bool:
    """Remove the limit on ``(kind, key)``; False if there was none. Idle workers are woken."""
    lim = limits_table_of(model)
    async with engine.begin() as conn:
        gone = await conn.execute(
            lim.delete().where(lim.c.kind == kind, lim.c.key == key).returning(lim.c.key)
        )
        if gone.first() is None:
            return False
        await conn.execute(select(func.pg_notify(f"{channel}_queues", key)))
        await conn.execute(select(func.pg_notify(channel, key if kind == "queue" else "")))
    return True


async def list_limits(engine: AsyncEngine, model: type[TaskMixin]) -> list[Limit]:
    """Every limit, with the tasks running under it and its starts in the last period."""
    async with engine.connect() as conn:
        return await read_limits(conn, model)


async def read_limits(conn: AsyncConnection, model: type[TaskMixin]) -> list[Limit]:
    """:func:`list_limits` on a connection of the caller's (the status reads it in its snapshot)."""
    lim = limits_table_of(model)
    tasks: Any = model.__table__  # type: ignore[attr-defined]
    running = (
        select(func.count())
        .where(
            tasks.c.state == literal_column("'running'"),
            case((lim.c.kind == "queue", tasks.c.queue), else_=tasks.c.name) == lim.c.key,
        )
        .scalar_subquery()
    )
    start = (
        func.jsonb_array_elements(lim.c.starts)
        .table_valued(column("value", JSONB))
        .render_derived(name="s")
    )
    value = start.c.value
    recent = (
        select(func.coalesce(func.sum(cast(value.op("->>")(literal_column("1")), Float)), 0.0))
        .where(
            cast(value.op("->>")(literal_column("0")), Float)
            > _epoch(func.now()) - lim.c.per_seconds
        )
        .scalar_subquery()
    )
    query = select(
        lim.c.kind,
        lim.c.key,
        lim.c.concurrency,
        lim.c.rate,
        lim.c.per_seconds,
        running.label("running"),
        recent.label("recent"),
    ).order_by(lim.c.kind, lim.c.key)
    rows = (await conn.execute(query)).all()
    return [
        Limit(r.kind, r.key, r.concurrency, r.rate, r.per_seconds, r.running, int(r.recent or 0))
        for r in rows
    ]

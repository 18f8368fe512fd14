"""What operators ask first: the state of the queues and of the workers, and a health check.

``queue_status()`` reads everything in one transaction (a consistent snapshot) and returns a
plain :class:`QueueStatus`; :func:`render_status` turns it into a table for people, and
``dataclasses.asdict`` into JSON for scripts. The CLI's ``status`` and ``healthcheck`` commands
are thin wrappers.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    any_,
    exists,
    func,
    literal_column,
    or_,
    select,
    tablesample,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .limits import Limit, read_limits
from .models import TaskMixin, queues_table_of, workers_table_of
from .queries import CANCELLED as _CANCELLED
from .queries import COMPLETED as _COMPLETED
from .queries import FAILED as _FAILED
from .queries import PENDING as _PENDING
from .queries import RUNNING as _RUNNING
from .queries import seconds
from .retention import delete_old


@dataclass
class QueueRow:
    queue: str
    pending: int = 0
    due: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    #: Seconds the oldest due pending task has waited past its scheduled time.
    oldest_due_seconds: float | None = None


@dataclass
class WorkerRow:
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    version: str
    running: int
    seen_seconds_ago: float
    started_seconds_ago: float


@dataclass
class QueueStatus:
    queues: list[QueueRow] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    #: Running tasks, and those whose lease has expired (their worker is dead or cut off).
    running: int = 0
    expired_leases: int = 0
    #: Seconds left on the lease that expires first, among running tasks.
    min_lease_left_seconds: float | None = None
    failed_last_hour: int = 0
    #: Tasks completed in the last 1, 5 and 15 minutes, per minute.
    throughput_per_minute: dict[str, float] = field(default_factory=dict)
    #: Pending tasks whose name no live worker registers (for their queue): they wait for ever.
    unserved: dict[str, int] = field(default_factory=dict)
    #: Queues no worker claims from until they are resumed.
    paused: list[str] = field(default_factory=list)
    #: Cluster-wide limits, with what each counts now.
    limits: list[Limit] = field(default_factory=list)
    #: Whether the completed, failed and cancelled counts are estimates from a sample of the
    #: table (a table of more than ``exact_limit`` rows); the other counts are always exact.
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _alive(w: Any) -> Any:
    """A registry row whose worker heartbeat within its lease: the worker is alive."""
    return w.c.last_seen_at + seconds(w.c.lease_seconds) > func.now()


#: Above this many rows (the planner's estimate), the status samples the finished tasks
#: instead of counting them: counting every row took 200 ms of both cores at a million here.
EXACT_LIMIT = 1_000_000
#: About how many rows the sample reads.
SAMPLE_ROWS = 100_000


async def queue_status(
    engine: AsyncEngine,
    model: type[TaskMixin],
    *,
    exact_limit: int | None = None,
    sample_rows: int | None = None,
) -> QueueStatus:
    """Read the status of the queues and the live workers, in one snapshot.

    Pending and running tasks are counted exactly (from their partial indexes); so are the
    finished ones while the table holds at most ``exact_limit`` rows (default
    ``EXACT_LIMIT``). Above that, their counts are estimates from a sample of about
    ``sample_rows`` rows (default ``SAMPLE_ROWS``; ``QueueStatus.estimated``), so that the
    status costs the same with ten million finished tasks kept as with one million.
    """
    exact_limit = EXACT_LIMIT if exact_limit is None else exact_limit
    sample_rows = SAMPLE_ROWS if sample_rows is None else sample_rows
    w = workers_table_of(model)
    fresh = _alive(w)
    st = QueueStatus()
    async with engine.connect() as conn, conn.begin():
        await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        rows: dict[str, QueueRow] = {}
        st.estimated, counts = await _counts(conn, model, exact_limit, sample_rows)
        for queue, state, n in counts:
            setattr(rows.setdefault(queue, QueueRow(queue)), str(state), int(n))
        rows = dict(sorted(rows.items()))
        due = await conn.execute(
            select(
                model.queue,
                func.count(),
                func.extract("epoch", func.now() - func.min(model.scheduled_at)),
            )
            .where(model.state == _PENDING, model.scheduled_at <= func.now())
            .group_by(model.queue)
        )
        for queue, n, oldest in due:
            row = rows.setdefault(queue, QueueRow(queue))
            row.due, row.oldest_due_seconds = int(n), round(float(oldest), 3)
        st.queues = list(rows.values())
        lease = (
            await conn.execute(
                select(
                    func.count(),
                    func.count().filter(model.locked_until < func.now()),
                    func.extract("epoch", func.min(model.locked_until) - func.now()),
                ).where(model.state == _RUNNING)
            )
        ).one()
        st.running, st.expired_leases = int(lease[0]), int(lease[1])
        st.min_lease_left_seconds = None if lease[2] is None else round(float(lease[2]), 3)
        recent = (await conn.execute(last_hour(model))).one()
        st.failed_last_hour = int(recent[0])
        st.throughput_per_minute = {
            f"{m}m": round(int(n) / m, 1) for m, n in zip((1, 5, 15), recent[1:], strict=True)
        }
        served = exists().where(
            fresh,
            model.name == any_(w.c.task_names),
            or_(func.cardinality(w.c.queues) == 0, model.queue == any_(w.c.queues)),
        )
        unserved = await conn.execute(
            select(model.name, func.count())
            .where(model.state == _PENDING, ~served)
            .group_by(model.name)
            .order_by(func.count().desc())
        )
        st.unserved = {str(name): int(n) for name, n in unserved}
        st.workers = await _live_workers(conn, model)
        st.paused = await paused_queues(conn, model)
        st.limits = await read_limits(conn, model)
    return st


async def _counts(
    conn: AsyncConnection,
    model: type[TaskMixin],
    exact_limit: int,
    sample_rows: int,
) -> tuple[bool, list[tuple[str, str, int]]]:
    """(queue, state, count) of every task, and whether the finished ones were sampled."""
    table = model.__table__  # type: ignore[attr-defined]
    name = conn.dialect.identifier_preparer.format_table(table)
    # The planner's row count (pg_class.reltuples, kept by ANALYZE and autovacuum): free to
    # read; -1 or 0 for a table never analyzed, which is then counted.
    size = await conn.scalar(
        text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"), {"name": name}
    )
    if size is None or size <= exact_limit:
        counts = await conn.execute(
            select(model.queue, model.state, func.count()).group_by(model.queue, model.state)
        )
        return False, [(q, s, n) for q, s, n in counts]
    out: list[tuple[str, str, int]] = []
    # One partial index each (of pending, of running rows); an IN would use neither.
    for state, label in ((_PENDING, "pending"), (_RUNNING, "running")):
        exact = await conn.execute(
            select(model.queue, func.count()).where(model.state == state).group_by(model.queue)
        )
        out += [(q, label, n) for q, n in exact]
    percent = min(100.0, 100.0 * sample_rows / float(size))
    # REPEATABLE: the same rows of an unchanged table each time, not figures that jump.
    sample = tablesample(table, func.system(percent), seed=literal_column("0"))
    counts = await conn.execute(
        select(sample.c.queue, sample.c.state, func.count())
        .where(sample.c.state.in_([_COMPLETED, _FAILED, _CANCELLED]))
        .group_by(sample.c.queue, sample.c.state)
    )
    out += [(q, s, round(n * 100.0 / percent)) for q, s, n in counts]
    return True, out


def last_hour(model: type[TaskMixin]) -> Any:
    """Tasks failed in the last hour, and completed in the last 1, 5 and 15 minutes."""
    return select(
        func.count().filter(
            model.state == _FAILED,
            model.completed_at > func.now() - seconds(literal_column("3600")),
        ),
        *[
            func.count().filter(
                model.state == _COMPLETED,
                model.completed_at > func.now() - seconds(literal_column(str(m * 60))),
            )
            for m in (1, 5, 15)
        ],
    ).where(
        # The state, though the counts filter on it anyway, lets the history's index
        # (ix_<t>_finished: state, completed_at) read only the last hour of it.
        model.state.in_([_FAILED, _COMPLETED]),
        model.completed_at > func.now() - seconds(literal_column("3600")),
    )


async def live_workers(engine: AsyncEngine, model: type[TaskMixin]) -> list[WorkerRow]:
    """The live workers of the registry, with their running tasks (status's workers alone)."""
    async with engine.connect() as conn:
        return await _live_workers(conn, model)


async def _live_workers(conn: AsyncConnection, model: type[TaskMixin]) -> list[WorkerRow]:
    w = workers_table_of(model)
    running_per_worker = (
        select(model.worker_id, func.count().label("n"))
        .where(model.state == _RUNNING)
        .group_by(model.worker_id)
        .subquery()
    )
    workers = await conn.execute(
        select(
            w.c.id,
            w.c.host,
            w.c.pid,
            w.c.queues,
            w.c.concurrency,
            w.c.version,
            func.coalesce(running_per_worker.c.n, 0),
            func.extract("epoch", func.now() - w.c.last_seen_at),
            func.extract("epoch", func.now() - w.c.started_at),
        )
        .select_from(w.outerjoin(running_per_worker, running_per_worker.c.worker_id == w.c.id))
        .where(_alive(w))
        .order_by(w.c.host, w.c.pid)
    )
    return [
        WorkerRow(
            id=r[0],
            host=r[1],
            pid=int(r[2]),
            queues=list(r[3] or []),
            concurrency=int(r[4]),
            version=r[5],
            running=int(r[6]),
            seen_seconds_ago=round(float(r[7]), 1),
            started_seconds_ago=round(float(r[8]), 1),
        )
        for r in workers
    ]


def age(value: float | None) -> str:
    """Seconds as a short age for people: ``45.0s``, ``3.5m``, ``2.0h``; ``-`` for none."""
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


def render_status(st: QueueStatus) -> str:
    """The status as text for a terminal."""
    out = ["QUEUES"]
    about = "~" if st.estimated else ""
    out += _table(
        ["queue", "pending", "due", "oldest due", "running", "completed", "failed", "cancelled"],
        [
            [
                q.queue,
                str(q.pending),
                str(q.due),
                age(q.oldest_due_seconds),
                str(q.running),
                f"{about}{q.completed}",
                f"{about}{q.failed}",
                f"{about}{q.cancelled}",
            ]
            for q in st.queues
        ]
        or [["(no tasks)", "", "", "", "", "", "", ""]],
    )
    if st.estimated:
        out.append("(~: estimated from a sample of the table; the other counts are exact)")
    t = st.throughput_per_minute
    out += [
        "",
        f"running {st.running}, leases expired {st.expired_leases}, first lease ends in "
        f"{age(st.min_lease_left_seconds)}; failed in the last hour {st.failed_last_hour}",
        f"completed per minute: {t.get('1m', 0)} (1 min), {t.get('5m', 0)} (5 min), "
        f"{t.get('15m', 0)} (15 min)",
    ]
    if st.paused:
        out += ["", f"PAUSED (no worker claims from them): {', '.join(st.paused)}"]
    if st.limits:
        out += ["", "LIMITS (across every worker)", *render_limits(st.limits)]
    if st.unserved:
        out += ["", "PENDING WITH NO LIVE WORKER FOR THEIR NAME (they wait until one starts)"]
        out += [f"  {name}: {n}" for name, n in st.unserved.items()]
    out += ["", f"WORKERS ({len(st.workers)} alive)"]
    if st.workers:
        out += _table(
            ["worker", "queues", "running", "concurrency", "seen", "up", "version"],
            [
                [
                    w.id,
                    ",".join(w.queues) or "all",
                    str(w.running),
                    str(w.concurrency),
                    age(w.seen_seconds_ago) + " ago",
                    age(w.started_seconds_ago),
                    w.version,
                ]
                for w in st.workers
            ],
        )
    return "\n".join(out)


def render_limits(limits: Sequence[Limit]) -> list[str]:
    """Limits as table lines: what each allows and what it counts now."""

    def rate(lim: Limit) -> str:
        return "-" if lim.rate is None else f"{lim.rate}/{lim.per_seconds:g}s"

    return _table(
        ["kind", "key", "concurrency", "running", "rate", "started"],
        [
            [
                lim.kind,
                lim.key,
                "-" if lim.concurrency is None else str(lim.concurrency),
                str(lim.running),
                rate(lim),
                "-" if lim.rate is None else str(lim.recent_starts),
            ]
            for lim in limits
        ],
    )


def health_problems(st: QueueStatus, *, need_worker: bool) -> list[str]:
    """What makes a deployment unhealthy, from its status; empty when healthy."""
    return _problems(st.workers, need_worker)


def _problems(workers: Sequence[WorkerRow], need_worker: bool) -> list[str]:
    return ["no live worker"] if need_worker and not workers else []


async def health(
    engine: AsyncEngine, model: type[TaskMixin], *, need_worker: bool
) -> tuple[list[str], list[WorkerRow]]:
    """What ``tasklib-sqla healthcheck`` reads: the problems (empty when healthy) and the live
    workers. A readiness probe runs it every few seconds in every pod, so it reads a row of
    the task table (that it answers) and the running tasks' lease index, never the history:
    the status overview counts every row, about 0.2 s of both cores per million rows here."""
    async with engine.connect() as conn:
        return await health_on(conn, model, need_worker=need_worker)


async def health_on(
    conn: AsyncConnection, model: type[TaskMixin], *, need_worker: bool
) -> tuple[list[str], list[WorkerRow]]:
    await conn.execute(select(model.id).limit(1))  # the table is there and readable
    workers = await _live_workers(conn, model)
    return _problems(workers, need_worker), workers


# -- tasks: list, show, purge ---------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d`` (or plain seconds) as a timedelta."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (try 90s, 15m, 2h or 7d)") from None
    if amount < 0 or amount != amount:
        raise ValueError(f"not a duration: {text!r}")
    return timedelta(seconds=amount * _UNITS[unit])


@dataclass
class TaskLine:
    id: str
    name: str
    queue: str
    state: str
    attempts: int
    created_at: str
    error: str | None


def cursor_of(line: TaskLine) -> str:
    """The keyset cursor after ``line``: its creation time and id."""
    return f"{line.created_at}/{line.id}"


async def list_tasks(
    engine: AsyncEngine,
    model: type[TaskMixin],
    *,
    states: Sequence[str] = (),
    queue: str | None = None,
    name: str | None = None,
    since: timedelta | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[TaskLine]:
    """Tasks, newest first, filtered; ``after`` is the cursor of the last line of a page."""
    query = select(
        model.id,
        model.name,
        model.queue,
        model.state,
        model.attempts,
        model.created_at,
        model.error,
    ).order_by(model.created_at.desc(), model.id.desc())
    if states:
        query = query.where(model.state.in_(list(states)))
    if queue:
        query = query.where(model.queue == queue)
    if name:
        query = query.where(model.name == name)
    if since is not None:
        query = query.where(model.created_at >= func.now() - since)
    if after:
        created, _, last_id = after.rpartition("/")
        try:
            key = (datetime.fromisoformat(created), uuid.UUID(last_id))
        except ValueError:
            raise ValueError(f"not a cursor from `tasks list`: {after!r}") from None
        query = query.where(tuple_(model.created_at, model.id) < tuple_(*key))
    async with engine.connect() as conn:
        rows = await conn.execute(query.limit(limit))
        return [
            TaskLine(str(r[0]), r[1], r[2], str(r[3]), int(r[4]), r[5].isoformat(), r[6])
            for r in rows
        ]


def render_tasks(lines: list[TaskLine]) -> str:
    if not lines:
        return "(no tasks)"
    rows = [
        [
            ln.id,
            ln.name,
            ln.queue,
            ln.state,
            str(ln.attempts),
            ln.created_at[:19],
            (ln.error or "")[:60],
        ]
        for ln in lines
    ]
    return "\n".join(_table(["id", "name", "queue", "state", "attempts", "created", "error"], rows))


def describe_task(row: TaskMixin) -> dict[str, Any]:
    """Everything about one task, JSON-ready: arguments, result and every attempt's error."""
    out: dict[str, Any] = {}
    for column in row.__table__.columns:  # type: ignore[attr-defined]
        value = getattr(row, column.key, None)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        out[column.key] = value
    return out


async def purge_in_batches(
    engine: AsyncEngine,
    model: type[TaskMixin],
    older_than: timedelta,
    states: Sequence[str] = ("completed", "failed", "cancelled"),
    batch: int = 1000,
) -> int:
    """Delete finished tasks older than ``older_than``, ``batch`` rows per statement.

    Each batch is its own short statement (autocommit), so no lock is held for long and
    workers keep claiming meanwhile. Returns how many were deleted.
    """
    bad = set(states) - {"completed", "failed", "cancelled"}
    if bad:
        raise ValueError(f"only finished tasks can be purged, not {sorted(bad)}")
    deleted = 0
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for state in states:
            deleted += await delete_old(
                conn, model, state, older_than.total_seconds(), batch, pause=0
            )
    return deleted


# -- steering queues --------------------------------------------------------------------------


async def set_paused(
    engine: AsyncEngine, model: type[TaskMixin], queue: str, paused: bool, channel: str
) -> None:
    """Pause or resume ``queue`` for every worker, in one transaction.

    The change is announced on ``<channel>_queues`` (workers read the paused queues again and
    skip them from their next claim on); a resume also wakes the queue's idle workers.
    """
    if not isinstance(queue, str) or not queue or len(queue) > 100:
        raise ValueError("queue must be a non-empty string of <= 100 chars")
    q = queues_table_of(model)
    upsert = pg_insert(q).values(queue=queue, paused=paused)
    upsert = upsert.on_conflict_do_update(
        index_elements=[q.c.queue], set_={"paused": paused, "changed_at": func.now()}
    )
    async with engine.begin() as conn:
        await conn.execute(upsert)
        await conn.execute(select(func.pg_notify(f"{channel}_queues", queue)))
        if not paused:
            await conn.execute(select(func.pg_notify(channel, queue)))


async def paused_queues(conn: AsyncConnection, model: type[TaskMixin]) -> list[str]:
    """The queues paused cluster-wide, by name (status, and each worker's claim)."""
    q = queues_table_of(model)
    return list(await conn.scalars(select(q.c.queue).where(q.c.paused).order_by(q.c.queue)))


async def queue_settings(engine: AsyncEngine, model: type[TaskMixin]) -> dict[str, bool]:
    """The steered queues and whether each is paused (queues without a row run as usual)."""
    q = queues_table_of(model)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(q.c.queue, q.c.paused).order_by(q.c.queue))).all()
    return {queue: paused for queue, paused in rows}

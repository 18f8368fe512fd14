"""Tasks used by the tests, at module level so that child processes can import them."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import gc
import os
import time
import uuid
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from tasklib_sqla import (
    CONTEXT,
    FailNow,
    MemberOutcome,
    RetryPolicy,
    Snooze,
    TaskContext,
    TaskRegistry,
)

registry = TaskRegistry()


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Order(BaseModel):
    sku: str
    quantity: int


@registry.task(name="tests.add")
def add(a: int, b: int = 1) -> int:
    return a + b


@registry.task(name="tests.async_add")
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@registry.task(name="tests.rich")
def rich(
    when: datetime, ident: uuid.UUID, color: Color, point: Point, order: Order
) -> dict[str, str]:
    return {
        "when": when.isoformat(),
        "ident": str(ident),
        "color": color.value,
        "point": f"{point.x},{point.y}",
        "order": f"{order.quantity}x{order.sku}",
    }


@registry.task(name="tests.fail", max_retries=2)
def always_fails(message: str) -> None:
    raise RuntimeError(message)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no str for you")


@registry.task(name="tests.unprintable", max_retries=0)
def raises_unprintable() -> None:
    raise Unprintable()


@registry.task(name="tests.not_json", max_retries=3)
def returns_not_json() -> object:
    return object()


# The same faults in async tasks, which run on the worker's event loop rather than in a thread.
@registry.task(name="tests.async_unprintable", max_retries=0)
async def async_unprintable() -> None:
    raise Unprintable()


@registry.task(name="tests.async_not_json", max_retries=3)
async def async_not_json() -> object:
    return object()


@registry.task(name="tests.async_fail", max_retries=1)
async def async_fails(message: str) -> None:
    await asyncio.sleep(0)
    raise RuntimeError(message)


@registry.task(name="tests.sleep_async", timeout_seconds=0.5, max_retries=0)
async def sleep_async(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "woke"


@registry.task(name="tests.sleep_sync_marker", timeout_seconds=1.0, max_retries=0)
def sleep_then_mark(seconds: float, marker: str) -> str:
    time.sleep(seconds)
    Path(marker).write_text("written after the deadline")
    return "done"


@registry.task(name="tests.sync_timed_ok", timeout_seconds=10.0)
def quick_in_child(a: int) -> int:
    return a * 2


@registry.task(name="tests.pid_in_child", timeout_seconds=10.0, max_retries=0)
def pid_in_child(seconds: float = 0.0) -> int:
    """The id of the process that ran it (a warm child), after ``seconds``."""
    time.sleep(seconds)
    return os.getpid()


@registry.task(name="tests.dies_in_child", timeout_seconds=10.0, max_retries=0)
def dies_in_child(code: int) -> None:
    """Ends its (child) process at once, as a crash would: no answer reaches the worker."""
    os._exit(code)


@registry.task(name="tests.slow_async", max_retries=0)
async def slow_async(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@registry.task(name="tests.gc_young_threshold")
async def gc_young_threshold() -> int:
    """The interpreter's threshold for its youngest generation, as a running task sees it."""
    return gc.get_threshold()[0]


_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar("tests_tag", default=None)


@registry.task(name="tests.own_task", timeout_seconds=30)
async def own_task(tag: str, wait: bool) -> dict[str, object]:
    """What a task sees of its own asyncio task, before any wait (the part that Python 3.12+
    runs eagerly inside the worker's claim loop) and after one."""
    me = asyncio.current_task()
    inherited = _tag.get()
    _tag.set(tag)  # stays in this task's context: no other task, nor the worker, may see it
    async with asyncio.timeout(30):  # bound to the current task: the worker's, if it were wrong
        if wait:
            await asyncio.sleep(0)
    return {
        "name": me.get_name() if me is not None else None,
        "same_after": asyncio.current_task() is me,
        "inherited": inherited,
        "tag": _tag.get(),
    }


@registry.task(name="tests.noop")
async def noop() -> None:
    return None


@registry.task(name="tests.snooze_forever", max_retries=0)
async def snooze_forever() -> None:
    # Accepted by Snooze (inf >= 0); its delay is not JSON, so the database refuses the outcome.
    raise Snooze(float("inf"))


@registry.task(name="tests.echo")
def echo(data: dict[str, object]) -> dict[str, object]:
    return data


@registry.task(name="tests.spawn")
async def spawn(a: int) -> str:
    from tasklib_sqla import submit_task

    child = await submit_task(add, a=a)
    return str(child)


class Gauge:
    """How many tasks run at once (tasks run on the worker's event loop, in one thread)."""

    now = 0
    peak = 0


@registry.task(name="tests.gauge")
async def gauge(seconds: float) -> None:
    Gauge.now += 1
    Gauge.peak = max(Gauge.peak, Gauge.now)
    try:
        await asyncio.sleep(seconds)
    finally:
        Gauge.now -= 1


@registry.task(name="tests.nul_result", max_retries=3)
def nul_result() -> str:
    return "a\x00b"


# -- reliability ------------------------------------------------------------------------------


@registry.task(name="tests.exits", max_retries=0)
def exits(code: int) -> None:
    raise SystemExit(code)


@registry.task(name="tests.exits_async", max_retries=0)
async def exits_async(code: int) -> None:
    raise SystemExit(code)


@registry.task(name="tests.interrupts_async", max_retries=0)
async def interrupts_async() -> None:
    raise KeyboardInterrupt


@registry.task(name="tests.nul_error", max_retries=0)
def nul_error() -> None:
    raise ValueError("bad\x00byte")


@registry.task(name="tests.cut_worker_connections")
async def cut_worker_connections(dsn: str) -> str:
    """Ends every connection of the worker's pool, then returns: the outcome write meets them."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'tasklib-worker' AND datname = current_database()"
        )
    finally:
        await conn.close()
    return "cut"


class App:
    """An app's engine (set by the test) that tasks borrow connections from."""

    engine: object = None


@registry.task(name="tests.hold_app_connection")
async def hold_app_connection(seconds: float) -> int:
    from sqlalchemy import text as sql
    from sqlalchemy.ext.asyncio import AsyncEngine

    engine = App.engine
    assert isinstance(engine, AsyncEngine)
    async with engine.connect() as conn:
        await asyncio.sleep(seconds)
        return int(await conn.scalar(sql("SELECT 1")) or 0)


@registry.task(name="tests.submits_sync")
def submits_sync(n: int) -> int:
    """A sync task (thread) that submits children with asyncio.run, twice."""
    from tasklib_sqla import submit_task

    for i in range(2):
        asyncio.run(submit_task(add, a=n * 10 + i))
    return n


@registry.task(name="tests.submits_sync_timed", timeout_seconds=20.0)
def submits_sync_timed(n: int) -> int:
    """The same in a child process (timed sync task), with no init() of its own."""
    from tasklib_sqla import submit_task

    for i in range(2):
        asyncio.run(submit_task(add, a=n * 10 + i))
    return n


@registry.task(name="tests.pid_then_mark", timeout_seconds=30.0, max_retries=0)
def pid_then_mark(pid_file: str, marker: str, seconds: float) -> str:
    import os

    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(marker).write_text("the orphan lived on")
    return "done"


# -- task context ---------------------------------------------------------------------------


@registry.task(name="tests.ctx_info", max_retries=2)
async def ctx_info(fail_first: bool, ctx: TaskContext = CONTEXT) -> dict[str, object]:
    if fail_first and ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {
        "id": str(ctx.id),
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "max_retries": ctx.max_retries,
        "worker_id": ctx.worker_id,
        "is_last_attempt": ctx.is_last_attempt,
        "waited": ctx.scheduled_at is not None and ctx.started_at >= ctx.scheduled_at,
    }


@registry.task(name="tests.ctx_spawn")
async def ctx_spawn(n: int, ctx: TaskContext = CONTEXT) -> str:
    return str(await ctx.submit(add, a=n))


@registry.task(name="tests.ctx_spawn_thread")
def ctx_spawn_thread(n: int, ctx: TaskContext = CONTEXT) -> str:
    return str(ctx.submit_sync(add, a=n))


@registry.task(name="tests.ctx_spawn_child", timeout_seconds=20.0)
def ctx_spawn_child(n: int, ctx: TaskContext = CONTEXT) -> str:
    return f"{ctx.attempt}:{ctx.submit_sync(add, a=n)}"


# -- retry control ----------------------------------------------------------------------------


class Calls:
    """How often each key's task body ran (tasks on the worker's loop, one process)."""

    seen: dict[str, int] = {}  # noqa: RUF012


@registry.task(name="tests.snoozer", max_retries=0)
async def snoozer(key: str, times: int, ctx: TaskContext = CONTEXT) -> dict[str, int]:
    Calls.seen[key] = Calls.seen.get(key, 0) + 1
    if Calls.seen[key] <= times:
        raise Snooze(0)
    return {"calls": Calls.seen[key], "attempt": ctx.attempt}


@registry.task(name="tests.fail_now", max_retries=5)
async def fail_now(reason: str) -> None:
    try:
        raise KeyError(reason)
    except KeyError as exc:
        raise FailNow(f"gave up: {reason}") from exc


@registry.task(name="tests.fail_now_child", max_retries=5, timeout_seconds=20.0)
def fail_now_child(reason: str) -> None:
    raise FailNow(reason)


@registry.task(
    name="tests.picky",
    max_retries=2,
    retry=RetryPolicy(retry_on=(ConnectionError,), no_retry_on=(ConnectionRefusedError,)),
)
async def picky(kind: str) -> None:
    raise {"conn": ConnectionError, "refused": ConnectionRefusedError, "value": ValueError}[kind](
        kind
    )


@registry.task(name="tests.slow_retry", max_retries=1, retry=RetryPolicy(base_delay=3600))
async def slow_retry() -> None:
    raise RuntimeError("later")


# -- telemetry ----------------------------------------------------------------------------------


def _trace_id() -> str:
    from opentelemetry import trace

    return format(trace.get_current_span().get_span_context().trace_id, "032x")


@registry.task(name="tests.trace_async")
async def trace_async() -> str:
    return _trace_id()


@registry.task(name="tests.trace_thread")
def trace_thread() -> str:
    return _trace_id()


@registry.task(name="tests.make_order")
async def make_order(sku: str, quantity: int, seconds: float = 0.0) -> Order:
    await asyncio.sleep(seconds)
    return Order(sku=sku, quantity=quantity)


@registry.task(name="tests.stamp")
def stamp(when: datetime) -> datetime:
    return when


# -- groups -------------------------------------------------------------------------------------


@registry.task(name="tests.square", max_retries=0)
async def square(n: int) -> int:
    if n < 0:
        raise ValueError(f"no square of {n} today")
    return n * n


@registry.task(name="tests.total")
async def total(squares: list[int], label: str) -> str:
    return f"{label}: {sum(squares)} from {squares}"


@registry.task(name="tests.tally")
async def tally(outcomes: list[MemberOutcome]) -> dict[str, int]:
    done = sum(1 for o in outcomes if o.state == "completed")
    return {"completed": done, "failed": len(outcomes) - done}

"""Running one claimed task: argument loading, the call, timeouts, result validation.

``execute`` never raises for a task's own failure: it returns either the result as JSON text or
a :class:`Failure` describing what went wrong. Where a task runs:

- ``async def`` tasks run on the worker's event loop; a timeout cancels them.
- ``def`` tasks without a timeout run in the worker's thread pool.
- ``def`` tasks with a timeout run in a warm child process that is killed at the deadline:
  a thread cannot be stopped, a process can (``children.py``).

Task code cannot end the worker: ``sys.exit()``, ``KeyboardInterrupt`` and any other
``BaseException`` a task raises become that task's recorded failure.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .children import ChildDied, ChildPool
from .context import TaskContext
from .exceptions import FailNow, Snooze, TaskResultError, TaskTimeoutError
from .registry import TaskDefinition
from .threads import TaskThreads


@dataclass(slots=True)
class ClaimedTask:
    """A task this worker owns: the fencing token is (worker id, ``attempt``)."""

    id: uuid.UUID
    name: str
    args_json: str
    attempt: int
    max_retries: int
    timeout_seconds: float | None
    #: Whether completing it submits a successor (TaskDefinition.then).
    chained: bool = False
    queue: str = "default"
    scheduled_at: datetime | None = None
    parent_id: uuid.UUID | None = None
    #: The submitter's trace context (OpenTelemetry), when it was traced.
    trace_context: dict[str, str] | None = None
    #: A group member's follow-up; a follow-up's settings (``arg``, ``policy``).
    group_id: uuid.UUID | None = None
    group_spec: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)
    #: When (monotonic) the worker last knew the lease good: the claim's or the last
    #: successful heartbeat's sending time.
    leased_at: float = field(default_factory=time.monotonic)
    #: Set when the worker no longer owns the task (lease lost, released): drop its outcome.
    abandoned: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed, as stored in the task's ``errors`` history."""

    type: str
    message: str
    traceback: str | None
    #: False for failures another attempt cannot fix (bad stored arguments, non-JSON result).
    retryable: bool = True
    #: Set when the task raised Snooze: run again after this many seconds, attempt refunded.
    snooze: float | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, retryable: bool = True) -> Failure:
        try:
            tb: str | None = "".join(traceback.format_exception(exc))
        except Exception:
            tb = None
        return cls(
            type=type(exc).__qualname__,
            message=safe_str(exc),
            traceback=tb,
            retryable=retryable,
        )

    def __post_init__(self) -> None:
        # PostgreSQL stores no NUL character, in text or in jsonb: a message that carries
        # one would make the whole outcome unrecordable.
        for name in ("type", "message", "traceback"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                object.__setattr__(self, name, value.replace("\x00", "\\x00"))

    @property
    def summary(self) -> str:
        """``Type: message`` on one line, for the task's ``error`` column."""
        return one_line_summary(self.type, self.message)


#: The longest ``error`` summary kept; the whole message stays in the ``errors`` history.
SUMMARY_LIMIT = 500


def one_line_summary(type_name: str, message: str) -> str:
    """``Type: message`` with line breaks folded, pydantic's help links dropped, and cut short."""
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip() and not line.strip().startswith("For further information visit")
    ]
    text = f"{type_name}: {' '.join(lines)}" if lines else type_name
    text = " ".join(text.split())
    if len(text) > SUMMARY_LIMIT:
        text = text[: SUMMARY_LIMIT - 1] + "\u2026"
    return text


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, even for exceptions whose ``__str__`` itself raises."""
    try:
        return str(exc)
    except Exception:
        try:
            return f"<unprintable {type(exc).__qualname__}: {exc.args!r}>"
        except Exception:
            return f"<unprintable {type(exc).__qualname__}>"


async def execute(
    definition: TaskDefinition[Any, Any],
    job: ClaimedTask,
    threads: TaskThreads,
    children: ChildPool,
    worker_id: str = "",
) -> str | Failure:
    """Run one attempt; return the result as JSON text, or the Failure.

    ``children``: the worker's warm child processes, for timed sync tasks.
    """
    param = definition.context_param
    context = None if param is None else context_of(job, worker_id)
    if not definition.is_async and job.timeout_seconds is not None:
        return await _run_in_child(definition, job, children, context)
    try:
        kwargs = definition.load_args(job.args_json)
    except ValidationError as exc:
        return Failure.from_exception(exc, retryable=False)
    if param is not None:
        kwargs[param] = context
    try:
        if definition.is_async and job.timeout_seconds is None:
            value = await definition.fn(**kwargs)  # the common case, without a coroutine more
        else:
            value = await _invoke(definition, job, kwargs, threads)
    except TimeoutError as exc:
        if job.timeout_seconds is not None and not isinstance(exc, TaskTimeoutError):
            exc = timeout_error(job)
        return failure_of(definition, exc)
    except asyncio.CancelledError:
        raise  # the worker stops this task (lease lost, shutdown): not the task's outcome
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: the task's, not the worker's
        return failure_of(definition, exc)
    try:
        return definition.dump_result(value)
    except TaskResultError as exc:
        return Failure.from_exception(exc, retryable=False)


async def _invoke(
    definition: TaskDefinition[Any, Any],
    job: ClaimedTask,
    kwargs: dict[str, Any],
    threads: TaskThreads,
) -> Any:
    if definition.is_async:
        async with asyncio.timeout(job.timeout_seconds):
            return await definition.fn(**kwargs)
    # The caller's context (the attempt's span among it) goes along to the thread.
    return await threads.run(_call, definition, kwargs)


def context_of(job: ClaimedTask, worker_id: str) -> TaskContext:
    """The context a task that asks for one receives for this attempt."""
    return TaskContext(
        id=job.id,
        name=job.name,
        queue=job.queue,
        attempt=job.attempt,
        max_retries=job.max_retries,
        worker_id=worker_id,
        scheduled_at=job.scheduled_at,
        started_at=datetime.now(UTC),
        parent_id=job.parent_id,
    )


def _call(definition: TaskDefinition[Any, Any], kwargs: dict[str, Any]) -> Any:
    return definition.fn(**kwargs)


def failure_of(definition: TaskDefinition[Any, Any], exc: BaseException) -> Failure:
    """The recorded failure of an attempt that raised ``exc``, with the task's retry policy."""
    if isinstance(exc, Snooze):
        return Failure(type="Snooze", message=str(exc), traceback=None, snooze=exc.seconds)
    retryable = not isinstance(exc, FailNow) and definition.retry.retries(exc)
    return Failure.from_exception(exc, retryable=retryable)


def timeout_error(job: ClaimedTask) -> TaskTimeoutError:
    return TaskTimeoutError(f"task {job.name!r} timed out after {job.timeout_seconds} s")


# -- child processes for timed sync tasks ---------------------------------------------------


def child_location(definition: TaskDefinition[Any, Any]) -> tuple[str, str]:
    """Where a child process finds the task: its module and the attribute path in it."""
    return definition.fn.__module__, definition.fn.__qualname__


async def _run_in_child(
    definition: TaskDefinition[Any, Any],
    job: ClaimedTask,
    children: ChildPool,
    context: TaskContext | None,
) -> str | Failure:
    module, qualname = child_location(definition)
    deadline = job.timeout_seconds or 0.0
    message = (module, qualname, definition.name, job.args_json, context, deadline)
    try:
        answer = await children.run(message, job.timeout_seconds)
    except TimeoutError:
        return failure_of(definition, timeout_error(job))
    except ChildDied as exc:
        return Failure(
            type="ChildProcessDied",
            message=f"the process running task {job.name!r} died ({exc})",
            traceback=None,
        )
    if answer[0] == "ok":
        return str(answer[1])
    _, type_name, text, tb, retryable, snooze = answer
    return Failure(type=type_name, message=text, traceback=tb, retryable=retryable, snooze=snooze)


def run_here(
    module: str, qualname: str, name: str, args_json: str, context: TaskContext | None
) -> tuple[Any, ...]:
    """Run one task in this (child) process; the answer for the worker, as plain values."""
    retryable = True
    definition: TaskDefinition[Any, Any] | None = None
    try:
        definition = _find_definition(module, qualname, name)
        try:
            kwargs = definition.load_args(args_json)
        except ValidationError:
            retryable = False
            raise
        if context is not None and definition.context_param is not None:
            kwargs[definition.context_param] = context
        value = definition.fn(**kwargs)
        try:
            return ("ok", definition.dump_result(value))
        except TaskResultError:
            retryable = False
            raise
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: the task's, not the child's
        if retryable and definition is not None:
            f = failure_of(definition, exc)
        else:
            f = Failure.from_exception(exc, retryable=retryable)
        return ("error", f.type, f.message, f.traceback, f.retryable, f.snooze)


def _find_definition(module: str, qualname: str, name: str) -> TaskDefinition[Any, Any]:
    # The module and attribute path come from the parent's registered definition, never from
    # the database.
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, TaskDefinition) and obj.name == name:
        return obj
    for value in vars(importlib.import_module(module)).values():
        if isinstance(value, TaskDefinition) and value.name == name:
            return value
    raise LookupError(f"task {name!r} not found in module {module!r} in the child process")

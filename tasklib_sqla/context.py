"""``TaskContext``: what a running task may know about itself, and how it submits children.

A task asks for it with one parameter annotated ``TaskContext`` (any name) whose default is
:data:`CONTEXT`::

    @task
    async def resize(image_id: int, ctx: TaskContext = CONTEXT) -> None:
        log.info("attempt %d of %d", ctx.attempt, ctx.max_retries + 1)
        await ctx.submit(make_thumbnail, image_id=image_id)

The worker fills it in; it is not an argument of the task (callers never pass it, it is not
validated and not stored). The default keeps the task callable directly and keeps ``mypy``
happy about submits that leave it out. It works the same in async tasks, sync tasks on
threads and timed sync tasks in child processes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

if TYPE_CHECKING:
    from .registry import TaskDefinition
    from .results import TaskHandle
    from .submit import AnySession

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class TaskContext:
    """The running attempt of a task, as its worker claimed it."""

    #: The task's id (the row's primary key).
    id: uuid.UUID
    name: str
    queue: str
    #: This attempt's number, 1 for the first run.
    attempt: int
    #: Retries allowed after the first attempt: the last attempt is ``max_retries + 1``.
    max_retries: int
    worker_id: str
    #: When the task was due (the row's ``scheduled_at``).
    scheduled_at: datetime | None
    #: When this attempt started, by the worker's clock.
    started_at: datetime
    #: The task that submitted this one, if a task did.
    parent_id: uuid.UUID | None = None

    @property
    def is_last_attempt(self) -> bool:
        """Whether a failure now fails the task for good."""
        return self.attempt > self.max_retries

    async def submit(
        self, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """Submit a child task on its own (committed at once); its ``parent_id`` is this task.

        From a sync task: :meth:`submit_sync`.
        """
        from .client import current_client

        return await current_client().submit_call(fn, args, kwargs, parent_id=self.id)

    def submit_sync(
        self, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """:meth:`submit` for sync tasks (which run on a thread or in a child process)."""
        from .blocking import background

        return background.run(lambda: self.submit(fn, *args, **kwargs))

    def add(
        self, session: AnySession, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """Add a child task to ``session``: it exists if that session's transaction commits."""
        from .client import current_client

        return current_client().add_call(session, fn, args, kwargs, parent_id=self.id)


class _Placeholder:
    """The default of a context parameter: replaced by the worker before the task runs."""

    def __repr__(self) -> str:
        return "CONTEXT"

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"no task context here (reading .{name}): the worker passes it when it runs the "
            "task; a direct call gets this placeholder"
        )


#: The default to give a ``TaskContext`` parameter: ``ctx: TaskContext = CONTEXT``.
CONTEXT: TaskContext = cast(TaskContext, _Placeholder())


class _NoSession:
    """The default of a transactional task's session parameter: the worker passes the session."""

    def __repr__(self) -> str:
        return "SESSION"

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"no session here (reading .{name}): the worker passes the session of its "
            "transaction when it runs the task; a direct call must pass one (session=...)"
        )


#: The default to give a transactional task's session parameter:
#: ``session: AsyncSession = SESSION`` (or ``Session`` for a sync task). Typed ``Any`` so
#: that it fits both.
SESSION: Any = _NoSession()

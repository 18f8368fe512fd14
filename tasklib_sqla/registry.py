"""The registry of tasks a process knows, and the ``@task`` decorator that fills it.

A worker runs only tasks registered here, looked up by their stable name: nothing read from the
database is ever imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar, overload

from .definition import TaskDefinition
from .exceptions import TaskDefinitionError, UnknownTaskError
from .models import DEFAULT_QUEUE
from .options import ChainStep, SubmitOptions
from .retry import RetryPolicy
from .schedule import Schedule

__all__ = [
    "ChainStep",
    "SubmitOptions",
    "TaskDefinition",
    "TaskRegistry",
    "default_registry",
    "task",
]

P = ParamSpec("P")
R = TypeVar("R")


class TaskRegistry:
    """The tasks a process knows, by stable name. Workers run only registered tasks."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition[Any, Any]] = {}

    def register(self, definition: TaskDefinition[P, R]) -> TaskDefinition[P, R]:
        """Add a definition; a second definition under the same name is an error."""
        existing = self._tasks.get(definition.name)
        if existing is not None and existing.fn is not definition.fn:
            raise TaskDefinitionError(
                f"a task named {definition.name!r} is already registered "
                f"({_where(existing.fn)}); give one of them another name="
            )
        self._tasks[definition.name] = definition
        return definition

    def get(self, name: str) -> TaskDefinition[Any, Any]:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(f"no task named {name!r} is registered") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskDefinition[Any, Any]]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._tasks)

    @overload
    def task(self, fn: Callable[P, R], /) -> TaskDefinition[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        transactional: bool = False,
        schedule: str | Schedule | None = None,
    ) -> Callable[[Callable[P, R]], TaskDefinition[P, R]]: ...

    def task(  # type: ignore[misc]
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        transactional: bool = False,
        schedule: str | Schedule | None = None,
    ) -> TaskDefinition[P, R] | Callable[[Callable[P, R]], TaskDefinition[P, R]]:
        """Register a function as a task; usable bare (``@task``) or with settings.

        ``transactional=True``: the task receives a session (``session: AsyncSession =
        SESSION``, or ``Session`` for a sync task) in the transaction that also records its
        completion, so its database writes take effect exactly once (see the guide).

        ``schedule``: a cron expression (``"0 3 * * *"``; seconds as an optional sixth field)
        or a :class:`Schedule`; the workers that register the task insert its ticks, each
        exactly once however many run.
        """

        def wrap(f: Callable[P, R]) -> TaskDefinition[P, R]:
            if isinstance(f, TaskDefinition):
                raise TaskDefinitionError(f"{f.name!r} is already a task")
            task_name = name if name is not None else f"{f.__module__}.{f.__qualname__}"
            return self.register(
                TaskDefinition(
                    f,
                    name=task_name,
                    max_retries=max_retries,
                    timeout_seconds=timeout_seconds,
                    queue=queue,
                    priority=priority,
                    retry=retry,
                    transactional=transactional,
                    schedule=schedule,
                )
            )

        return wrap(fn) if fn is not None else wrap


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


#: The registry that the module-level :func:`task` decorator fills.
default_registry = TaskRegistry()
task = default_registry.task

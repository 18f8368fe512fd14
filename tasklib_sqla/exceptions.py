"""Errors raised by tasklib-sqla.

The hierarchy::

    TaskLibError
     ├── ConfigError                 bad or missing configuration; init() not called
     ├── TaskDefinitionError         a @task that cannot be registered (signature, duplicate name)
     ├── UnknownTaskError            a task name no registry knows (also a KeyError)
     ├── TaskNotFoundError           no task row with this id (also a LookupError)
     ├── TaskArgumentsError          arguments refused at submit time (also a ValueError)
     ├── TaskResultError             a return value that does not fit its annotation or JSON
     ├── TaskTimeoutError            a task ran past its timeout_seconds (also a TimeoutError)
     ├── TaskFailedError             awaited result of a task that failed for good
     │    └── TaskCancelledError     awaited result of a task that was cancelled
     └── WorkerError                 a worker cannot work: the database refuses it for good

Every submit-time error is raised before anything is written to the database.
"""

from __future__ import annotations

import uuid
from typing import Any


class TaskLibError(Exception):
    """Base class of every error raised by tasklib-sqla."""


class ConfigError(TaskLibError):
    """The configuration is missing or invalid."""


class TaskDefinitionError(TaskLibError):
    """A function cannot be registered as a task."""


class UnknownTaskError(TaskLibError, KeyError):
    """No task is registered under this name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TaskNotFoundError(TaskLibError, LookupError):
    """No task with this id exists."""


class TaskArgumentsError(TaskLibError, ValueError):
    """The arguments given for a task do not validate against its signature."""


class TaskResultError(TaskLibError, ValueError):
    """A task returned a value that does not match its return annotation or is not JSON."""


class TaskTimeoutError(TaskLibError, TimeoutError):
    """A task ran longer than its ``timeout_seconds``."""


class TaskFailedError(TaskLibError):
    """The task whose result was awaited failed for good.

    ``error`` is the last error's one-line summary; ``errors`` the whole history, one entry
    per failed attempt (type, message, traceback, worker, time).
    """

    def __init__(
        self,
        task_id: uuid.UUID,
        name: str,
        error: str | None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        self.task_id = task_id
        self.name = name
        self.error = error
        self.errors = list(errors or [])
        super().__init__(f"task {name!r} [{task_id}] {self._verb}: {error or 'no error recorded'}")

    _verb = "failed"


class TaskCancelledError(TaskFailedError):
    """The task whose result was awaited was cancelled."""

    _verb = "was cancelled"


class WorkerError(TaskLibError):
    """A worker cannot work: its database refuses it for a reason retrying cannot fix.

    Raised by ``TaskWorker.run()`` at startup (unknown database, role or table, wrong
    password, an unreachable server past ``Config.startup_timeout_seconds``) and by a running
    worker after ``Config.fatal_error_seconds`` of such errors.
    """


class Snooze(Exception):
    """Raise in a task to run it again after ``seconds``, without spending an attempt.

    For "not yet" rather than "failed": a resource still being prepared, a rate limit
    announced by a ``Retry-After`` header. Nothing is added to the task's error history.
    """

    def __init__(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError("Snooze needs a delay >= 0 seconds")
        super().__init__(f"snoozed for {seconds} s")
        self.seconds = float(seconds)


class FailNow(Exception):
    """Raise in a task to fail it at once, whatever retries remain; ``reason`` is recorded.

    ``raise FailNow("card declined") from exc`` keeps the cause in the recorded traceback.
    """

"""tasklib-sqla: a durable task queue for PostgreSQL, built as a SQLAlchemy 2.0 ORM extension.

Define tasks with :func:`task`, submit them inside your own transaction with :func:`add_task`
(or on their own with :func:`submit_task`), run them with :class:`TaskWorker`.
"""

from .client import (
    TaskClient,
    add_group,
    add_task,
    add_tasks,
    cancel_task,
    get_client,
    get_task,
    init,
    insert_task,
    is_completed,
    pause_queue,
    remove_limit,
    resume_queue,
    retry_task,
    set_limit,
    submit_group,
    submit_task,
    submit_task_sync,
    submit_tasks,
    submit_tasks_sync,
)
from .config import Config
from .context import CONTEXT, SESSION, TaskContext
from .exceptions import (
    ConfigError,
    FailNow,
    Snooze,
    TaskArgumentsError,
    TaskCancelledError,
    TaskDefinitionError,
    TaskFailedError,
    TaskLibError,
    TaskNotFoundError,
    TaskResultError,
    TaskTimeoutError,
    UnknownTaskError,
    WorkerError,
)
from .finisher import WorkerStats
from .groups import MemberOutcome, TaskCall
from .limits import Limit
from .models import Task, TaskMixin, TaskState, claim_index, metadata, task_table_args
from .registry import TaskDefinition, TaskRegistry, default_registry, task
from .results import TaskHandle
from .retry import RetryDecision, RetryPolicy, backoff_delay, decide_retry
from .schedule import Schedule
from .schema import notify_trigger_sql, schema_sql
from .worker import TaskWorker

__version__ = "0.1.0"

__all__ = [
    "CONTEXT",
    "SESSION",
    "Config",
    "ConfigError",
    "FailNow",
    "Limit",
    "MemberOutcome",
    "RetryDecision",
    "RetryPolicy",
    "Schedule",
    "Snooze",
    "Task",
    "TaskArgumentsError",
    "TaskCall",
    "TaskCancelledError",
    "TaskClient",
    "TaskContext",
    "TaskDefinition",
    "TaskDefinitionError",
    "TaskFailedError",
    "TaskHandle",
    "TaskLibError",
    "TaskMixin",
    "TaskNotFoundError",
    "TaskRegistry",
    "TaskResultError",
    "TaskState",
    "TaskTimeoutError",
    "TaskWorker",
    "UnknownTaskError",
    "WorkerError",
    "WorkerStats",
    "add_group",
    "add_task",
    "add_tasks",
    "backoff_delay",
    "cancel_task",
    "claim_index",
    "decide_retry",
    "default_registry",
    "get_client",
    "get_task",
    "init",
    "insert_task",
    "is_completed",
    "metadata",
    "notify_trigger_sql",
    "pause_queue",
    "remove_limit",
    "resume_queue",
    "retry_task",
    "schema_sql",
    "set_limit",
    "submit_group",
    "submit_task",
    "submit_task_sync",
    "submit_tasks",
    "submit_tasks_sync",
    "task",
    "task_table_args",
]

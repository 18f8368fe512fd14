"""Per-submission settings (queue, priority, delay, host columns), chain steps, and their checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .exceptions import TaskArgumentsError, TaskDefinitionError
from .models import library_columns

if TYPE_CHECKING:
    from .definition import TaskDefinition


@dataclasses.dataclass(frozen=True, slots=True)
class SubmitOptions:
    """Per-submission settings, kept apart from the task's own parameters."""

    queue: str | None = None
    priority: int | None = None
    #: Run no earlier than this long after the submitting transaction's clock (``now()``).
    delay: timedelta | None = None
    #: Run no earlier than this time (timezone-aware).
    run_at: datetime | None = None
    #: Tasks to submit, one after the other, as each step completes (see ``then``).
    chain: tuple[ChainStep, ...] = ()
    #: Values for the host model's own columns (``TaskMixin`` tables), by column name.
    columns: tuple[tuple[str, Any], ...] = ()
    #: Unique tasks: the key given (``unique_key``), or the arguments that make it up.
    unique_key: str | None = None
    unique_on: tuple[str, ...] | None = None
    #: The states in which a task blocks another with its key (default: pending, running).
    unique_states: tuple[str, ...] | None = None

    @property
    def unique(self) -> bool:
        return self.unique_key is not None or self.unique_on is not None


@dataclasses.dataclass(frozen=True, slots=True)
class ChainStep:
    """A task submitted when the previous one completes, its result passed as ``arg``."""

    definition: TaskDefinition[Any, Any]
    #: The parameter that receives the previous task's result; None drops the result.
    arg: str | None
    #: The step's other arguments, validated and as JSON.
    args: dict[str, Any]

    def as_json(self, default_max_retries: int) -> dict[str, Any]:
        return {
            "name": self.definition.name,
            "arg": self.arg,
            "args": self.args,
            **self.definition.settings(default_max_retries),
        }


def checked_when(
    name: str, delay: timedelta | float | None, run_at: datetime | None
) -> timedelta | None:
    """``delay`` as a timedelta, once it and ``run_at`` are known to be submittable."""
    bad = TaskArgumentsError
    if delay is not None and run_at is not None:
        raise bad(f"task {name!r}: give delay or run_at, not both")
    if isinstance(delay, bool) or not isinstance(delay, int | float | timedelta | None):
        raise bad(f"task {name!r}: delay must be seconds or a timedelta, got {delay!r}")
    if isinstance(delay, int | float):
        if delay != delay or delay in (float("inf"), float("-inf")):
            raise bad(f"task {name!r}: delay must be a finite number of seconds")
        delay = timedelta(seconds=delay)
    if delay is not None and delay < timedelta(0):
        raise bad(f"task {name!r}: delay must not be negative")
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
        raise bad(f"task {name!r}: run_at must be a timezone-aware datetime")
    return delay


#: Priorities are stored in a PostgreSQL integer.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def checked_columns(name: str, columns: Mapping[str, Any]) -> dict[str, Any]:
    """Host columns for ``options(columns=...)``: names only here; the model checks them."""
    out = dict(columns)
    for key in out:
        if not isinstance(key, str) or not key:
            raise TaskArgumentsError(f"task {name!r}: column names must be strings, not {key!r}")
        if key in library_columns():
            raise TaskArgumentsError(
                f"task {name!r}: {key!r} is the library's own column; set it through its own "
                "option (queue, priority, delay, run_at) or not at all"
            )
    return out


def check_priority(name: str, priority: object, error: type[Exception]) -> None:
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise error(f"task {name!r}: priority must be an int, got {priority!r}")
    if not low <= priority <= high:
        raise error(f"task {name!r}: priority must be between {low} and {high}, got {priority}")


def check_settings(
    name: str, max_retries: int | None, timeout_seconds: float | None, queue: str
) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise TaskDefinitionError(f"task name must be a non-empty string of <= 200 chars: {name!r}")
    if max_retries is not None and max_retries < 0:
        raise TaskDefinitionError(f"task {name!r}: max_retries must be >= 0")
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise TaskDefinitionError(f"task {name!r}: timeout_seconds must be > 0")
    if not queue or len(queue) > 100:
        raise TaskDefinitionError(
            f"task {name!r}: queue must be a non-empty string of <= 100 chars"
        )


def checked_unique(
    name: str,
    params: tuple[str, ...],
    key: str | None,
    on: Sequence[str] | None,
    states: Sequence[str] | None,
) -> tuple[str | None, tuple[str, ...] | None, tuple[str, ...] | None]:
    """The unique options of a submission, checked (TaskArgumentsError)."""
    bad = TaskArgumentsError
    if key is not None and on is not None:
        raise bad(f"task {name!r}: give unique_key or unique_on, not both")
    if key is not None and (not isinstance(key, str) or not key or len(key) > 500):
        raise bad(f"task {name!r}: unique_key must be a non-empty string of <= 500 chars")
    on_names: tuple[str, ...] | None = None
    if on is not None:
        if isinstance(on, str):
            on = (on,)
        on_names = tuple(on)
        unknown = sorted(set(on_names) - set(params))
        if not on_names or unknown:
            raise bad(
                f"task {name!r}: unique_on names its parameters ({', '.join(params)}); "
                f"unknown: {unknown}"
            )
    states_: tuple[str, ...] | None = None
    if states is not None:
        states_ = tuple(dict.fromkeys(str(s) for s in states))
        allowed = {"pending", "running", "completed", "failed", "cancelled"}
        if not states_ or not set(states_) <= allowed:
            raise bad(f"task {name!r}: unique_states must be among {sorted(allowed)}")
        if key is None and on_names is None:
            raise bad(f"task {name!r}: unique_states needs unique_key or unique_on")
    return key, on_names, states_

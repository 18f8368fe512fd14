"""Task definitions: the ``@task`` decorator, the registry, and argument/result validation.

Arguments are validated *strictly* against the function's type hints when a task is submitted
(``count="5"`` for an ``int`` is refused) and stored as JSON; the worker validates the stored JSON
again with the same model, so datetimes, UUIDs, enums, dataclasses and pydantic models come back
as the types the function declared.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Generic, ParamSpec, TypeVar, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    create_model,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticSerializationError

from .context import CONTEXT, TaskContext
from .exceptions import (
    TaskArgumentsError,
    TaskDefinitionError,
    TaskResultError,
    UnknownTaskError,
)
from .models import DEFAULT_QUEUE, library_columns
from .retry import DEFAULT_POLICY, RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")

# NaN and infinities are kept as floats by the JSON-mode dump (pydantic would turn them into
# null silently) so that the json.dumps(allow_nan=False) check after it refuses them.
_NAN_KEPT = ConfigDict(ser_json_inf_nan="constants")
_STRICT = ConfigDict(strict=True, extra="forbid", ser_json_inf_nan="constants")
_UNSET: Any = object()


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


class TaskDefinition(Generic[P, R]):
    """A registered task: the function, its stable name, its defaults and its validators.

    Calling it calls the function directly (no queue involved). Submit it with
    ``submit_task(defn, ...)`` or ``add_task(session, defn, ...)``.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> None:
        _check_settings(name, max_retries, timeout_seconds, queue)
        _check_priority(name, priority, TaskDefinitionError)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TaskDefinitionError(f"task {name!r}: retry must be a RetryPolicy")
        self.retry = retry or DEFAULT_POLICY
        self.fn = fn
        self.name = name
        self.max_retries = max_retries
        self.timeout_seconds = timeout_seconds
        self.queue = queue
        self.priority = priority
        self.is_async = inspect.iscoroutinefunction(fn)
        if timeout_seconds is not None and not self.is_async and "<locals>" in fn.__qualname__:
            raise TaskDefinitionError(
                f"task {name!r}: a sync task with a timeout runs in a child process, which must "
                "import it: define it at module level"
            )
        self.submit_options = SubmitOptions()
        self._args_model, self._param_names, self.context_param = _args_model(fn, name)
        self._result_adapter: TypeAdapter[Any] = _result_adapter(fn, name, self.is_async)
        self._none_result_ok = _accepts_none(self._result_adapter)
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__doc__ = fn.__doc__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name!r}>"

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        columns: Mapping[str, Any] | None = None,
    ) -> TaskDefinition[P, R]:
        """A copy of this definition whose next submissions use these settings.

        ``delay`` (seconds or a timedelta) and ``run_at`` (timezone-aware) are exclusive.
        ``columns`` sets columns of your own on a ``TaskMixin`` model (``{"tenant_id": 7}``);
        they are checked against the model's columns when the task is written.
        Example: ``await submit_task(send_email.options(delay=60), to="a@b.c")``.
        Raises TaskArgumentsError for settings that cannot be submitted, like any other
        mistake in a submission.
        """
        bad = TaskArgumentsError
        delay = _checked_when(self.name, delay, run_at)
        if queue is not None and (not isinstance(queue, str) or not queue or len(queue) > 100):
            raise bad(f"task {self.name!r}: queue must be a non-empty string of <= 100 chars")
        if priority is not None:
            _check_priority(self.name, priority, bad)
        opts = self.submit_options
        if delay is not None or run_at is not None:
            opts = dataclasses.replace(opts, delay=delay, run_at=run_at)
        if queue is not None:
            opts = dataclasses.replace(opts, queue=queue)
        if priority is not None:
            opts = dataclasses.replace(opts, priority=priority)
        if columns:
            merged = {**dict(opts.columns), **_checked_columns(self.name, columns)}
            opts = dataclasses.replace(opts, columns=tuple(sorted(merged.items())))
        return self._with(opts)

    def settings(self, default_max_retries: int) -> dict[str, Any]:
        """Queue, priority, retries and timeout of the next submission, options applied."""
        opts = self.submit_options
        return {
            "queue": opts.queue or self.queue,
            "priority": self.priority if opts.priority is None else opts.priority,
            "max_retries": default_max_retries if self.max_retries is None else self.max_retries,
            "timeout_seconds": self.timeout_seconds,
        }

    def then(
        self, next_task: TaskDefinition[Any, Any], arg: str | None = None, /, **args: Any
    ) -> TaskDefinition[P, R]:
        """A copy whose submissions run ``next_task`` once this task completes.

        This task's result is passed to ``next_task`` as the argument named ``arg`` (or
        dropped when ``arg`` is None); ``args`` are its other arguments, validated now.
        Chains grow step by step: ``a.then(b, "data").then(c, "data")`` runs a, b, c in turn.
        The next task is inserted by the same statement that records the completion, so a
        completed step always has its successor; a step that fails for good ends the chain.
        """
        if not isinstance(next_task, TaskDefinition):
            raise TaskDefinitionError(f"then() expects a task, got {next_task!r}")
        nxt = next_task.submit_options
        if nxt.chain:
            raise TaskDefinitionError("build one chain step by step: a.then(b).then(c)")
        if nxt.delay is not None or nxt.run_at is not None:
            raise TaskDefinitionError("a chain step runs when its predecessor completes: no delay")
        step = ChainStep(next_task, arg, next_task.dump_partial_args(arg, args))
        chain = (*self.submit_options.chain, step)
        return self._with(dataclasses.replace(self.submit_options, chain=chain))

    def _with(self, opts: SubmitOptions) -> TaskDefinition[P, R]:
        copy = _copy.copy(self)
        copy.submit_options = opts
        return copy

    # -- arguments ---------------------------------------------------------------------------

    def dump_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """Validate call arguments strictly and return them as JSON text.

        Raises TaskArgumentsError (a ValueError) when they do not fit the signature, the type
        hints, or JSON (objects of unknown types, NaN, infinities).
        """
        if args:
            kwargs = self._bind_positional(args, kwargs)
        if self.context_param is not None and self.context_param in kwargs:
            raise TaskArgumentsError(
                f"task {self.name!r}: {self.context_param!r} is its TaskContext, which the "
                "worker passes: leave it out"
            )
        try:
            text = self._args_model.model_validate(kwargs).model_dump_json()
            # The model writes NaN and infinities as bare constants, which JSON (and JSONB)
            # refuse; a cheap screen first, the exact check only when the screen hits.
            if "NaN" in text or "Infinity" in text:
                json.loads(text, parse_constant=_refuse_constant)
            _refuse_nul(text)
        except PydanticValidationError as exc:
            raise TaskArgumentsError(f"invalid arguments for task {self.name!r}: {exc}") from None
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise TaskArgumentsError(
                f"arguments of task {self.name!r} are not JSON-serializable: {exc}"
            ) from None
        return text

    def dump_partial_args(self, missing: str | None, args: dict[str, Any]) -> dict[str, Any]:
        """Validate all arguments but ``missing`` (filled in later), as a JSON-ready dict."""
        fields = self._args_model.model_fields
        if missing is not None and missing not in fields:
            raise TaskArgumentsError(f"task {self.name!r} has no parameter {missing!r}")
        absent = [
            n for n, f in fields.items() if f.is_required() and n != missing and n not in args
        ]
        if absent:
            raise TaskArgumentsError(f"task {self.name!r} is missing arguments {absent}")
        return self.dump_some_args(args)

    def dump_some_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate the given arguments (any subset of the parameters) as a JSON-ready dict.

        Each value takes the form it has in the stored ``args`` column, so the two compare
        equal (``tasklib_sqla.testing`` matches submitted tasks with it).
        """
        fields = self._args_model.model_fields
        unknown = set(args) - set(fields)
        if unknown:
            raise TaskArgumentsError(f"task {self.name!r} has no parameters {sorted(unknown)}")
        out: dict[str, Any] = {}
        for name, value in args.items():
            adapter = _adapter(fields[name].annotation)
            try:
                checked = adapter.validate_python(value, strict=True)
                out[name] = adapter.dump_python(checked, mode="json")
                json.dumps(out[name], allow_nan=False)
            except PydanticValidationError as exc:
                raise TaskArgumentsError(
                    f"invalid argument {name!r} for task {self.name!r}: {exc}"
                ) from None
            except (PydanticSerializationError, ValueError, TypeError) as exc:
                raise TaskArgumentsError(
                    f"argument {name!r} of task {self.name!r} is not JSON-serializable: {exc}"
                ) from None
        return out

    def _bind_positional(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(self._param_names):
            raise TaskArgumentsError(
                f"task {self.name!r} takes {len(self._param_names)} arguments, "
                f"{len(args)} positional given"
            )
        bound = dict(kwargs)
        for pname, value in zip(self._param_names, args, strict=False):
            if pname in bound:
                raise TaskArgumentsError(
                    f"task {self.name!r} got two values for argument {pname!r}"
                )
            bound[pname] = value
        return bound

    def load_args(self, stored_json: str | bytes) -> dict[str, Any]:
        """Validate arguments read back from the database (JSON text) into call keywords."""
        validated = self._args_model.model_validate_json(stored_json)
        return {n: getattr(validated, n) for n in self._param_names}

    # -- results -----------------------------------------------------------------------------

    def dump_result(self, value: Any) -> str:
        """Validate a return value against the return annotation; return it as JSON text."""
        if value is None and self._none_result_ok:
            return "null"  # the common "-> None" task, without a trip through pydantic
        try:
            checked = self._result_adapter.validate_python(value, strict=True)
            text = self._result_adapter.dump_json(checked).decode()
            if "NaN" in text or "Infinity" in text:  # a cheap screen, as for arguments
                json.loads(text, parse_constant=_refuse_constant)
            return _refuse_nul(text)
        except PydanticValidationError as exc:
            raise TaskResultError(
                f"task {self.name!r} returned a value that does not match its annotation: {exc}"
            ) from None
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise TaskResultError(f"task {self.name!r} returned a non-JSON value: {exc}") from None


# An escaped NUL: "\u0000" after an even number of backslashes (an odd number would make it
# the text "\u0000" instead).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _refuse_nul(text: str) -> str:
    # JSON allows NUL characters in strings; PostgreSQL's jsonb does not, and would refuse the row.
    if "u0000" in text and _ESCAPED_NUL.search(text):
        raise ValueError("PostgreSQL cannot store the NUL character (U+0000) in JSON")
    return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"Out of range float values are not JSON compliant: {name}")


def _checked_when(
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


def _checked_columns(name: str, columns: Mapping[str, Any]) -> dict[str, Any]:
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


def _check_priority(name: str, priority: object, error: type[Exception]) -> None:
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise error(f"task {name!r}: priority must be an int, got {priority!r}")
    if not low <= priority <= high:
        raise error(f"task {name!r}: priority must be between {low} and {high}, got {priority}")


def _check_settings(
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


def _hints(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # NameError for unresolvable forward references, mostly
        raise TaskDefinitionError(f"task {name!r}: cannot resolve type hints: {exc}") from exc


def _args_model(
    fn: Callable[..., Any], name: str
) -> tuple[type[BaseModel], tuple[str, ...], str | None]:
    """The arguments' pydantic model, their names, and the context parameter's name, if any."""
    hints = _hints(fn, name)
    fields: dict[str, Any] = {}
    context: str | None = None
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TaskDefinitionError(
                f"task {name!r}: parameter {p.name!r} must be a named parameter "
                "(no *args, **kwargs or positional-only parameters)"
            )
        if hints.get(p.name) is TaskContext:
            # Filled in by the worker: not an argument, never validated or stored.
            if context is not None:
                raise TaskDefinitionError(f"task {name!r}: more than one TaskContext parameter")
            if p.default is not CONTEXT:
                raise TaskDefinitionError(
                    f"task {name!r}: give the context parameter the default CONTEXT "
                    f"({p.name}: TaskContext = CONTEXT), so that callers may leave it out"
                )
            context = p.name
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    try:
        model = create_model(f"{name}:args", __config__=_STRICT, **fields)
    except (PydanticSchemaGenerationError, TypeError) as exc:
        raise TaskDefinitionError(f"task {name!r}: unsupported parameter type: {exc}") from exc
    return model, tuple(fields), context


def _result_adapter(fn: Callable[..., Any], name: str, is_async: bool) -> TypeAdapter[Any]:
    hint = _hints(fn, name).get("return", Any)
    if hint is None:
        hint = type(None)
    try:
        return _adapter(hint)
    except PydanticSchemaGenerationError as exc:
        raise TaskDefinitionError(f"task {name!r}: unsupported return type: {exc}") from exc


def _accepts_none(adapter: TypeAdapter[Any]) -> bool:
    try:
        adapter.validate_python(None, strict=True)
    except PydanticValidationError:
        return False
    return True


def _adapter(hint: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(hint, config=_NAN_KEPT)
    except PydanticSchemaGenerationError:
        raise
    except PydanticUserError:  # types with a config of their own (BaseModel, dataclasses)
        return TypeAdapter(hint)


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
    ) -> TaskDefinition[P, R] | Callable[[Callable[P, R]], TaskDefinition[P, R]]:
        """Register a function as a task; usable bare (``@task``) or with settings."""

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
                )
            )

        return wrap(fn) if fn is not None else wrap


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


#: The registry that the module-level :func:`task` decorator fills.
default_registry = TaskRegistry()
task = default_registry.task

"""``TaskDefinition``: a registered task's function, name, defaults and validators."""

from __future__ import annotations

import copy as _copy
import dataclasses
import inspect
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticSerializationError

from .exceptions import TaskArgumentsError, TaskDefinitionError, TaskResultError
from .groups import TaskCall
from .models import DEFAULT_QUEUE, UNIQUE_STATES
from .options import (
    ChainStep,
    SubmitOptions,
    check_priority,
    check_settings,
    checked_columns,
    checked_unique,
    checked_when,
)
from .retry import DEFAULT_POLICY, RetryPolicy
from .schedule import Schedule, schedule_of
from .validation import (
    accepts_none,
    adapter,
    parameters,
    refuse_constant,
    refuse_nul,
    result_adapter,
)

if TYPE_CHECKING:
    from .results import TaskHandle

P = ParamSpec("P")
R = TypeVar("R")


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
        transactional: bool = False,
        schedule: str | Schedule | None = None,
    ) -> None:
        check_settings(name, max_retries, timeout_seconds, queue)
        check_priority(name, priority, TaskDefinitionError)
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
        if transactional and timeout_seconds is not None and not self.is_async:
            raise TaskDefinitionError(
                f"task {name!r}: a sync transactional task runs on the worker's event loop "
                "(its session is the worker's), where no timeout can stop it: write it as an "
                "async task to give it a timeout"
            )
        if timeout_seconds is not None and not self.is_async and "<locals>" in fn.__qualname__:
            raise TaskDefinitionError(
                f"task {name!r}: a sync task with a timeout runs in a child process, which must "
                "import it: define it at module level"
            )
        self.submit_options = SubmitOptions()
        #: Whether the task runs in the transaction that records its completion.
        self.transactional = transactional
        params = parameters(fn, name, is_async=self.is_async, transactional=transactional)
        self._args_model, self._param_names = params.model, params.names
        self.context_param, self.session_param = params.context, params.session
        self._result_adapter: TypeAdapter[Any] = result_adapter(fn, name, self.is_async)
        self._none_result_ok = accepts_none(self._result_adapter)
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__doc__ = fn.__doc__
        #: When the workers run this task by themselves (periodic tasks), or None.
        self.schedule = schedule_of(schedule)
        if self.schedule is not None:
            try:
                self.dump_args((), dict(self.schedule.args))
            except TaskArgumentsError as exc:
                raise TaskDefinitionError(f"task {name!r}: its schedule's args: {exc}") from None

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
        unique_key: str | None = None,
        unique_on: Sequence[str] | None = None,
        unique_states: Sequence[str] | None = None,
    ) -> TaskDefinition[P, R]:
        """A copy of this definition whose next submissions use these settings.

        Unique tasks: with ``unique_key`` (a string) or ``unique_on`` (parameter names whose
        values make the key), a submission whose key is already held by a task of this name
        in one of ``unique_states`` (default: pending or running) inserts nothing and returns
        that task's handle.

        ``delay`` (seconds or a timedelta) and ``run_at`` (timezone-aware) are exclusive.
        ``columns`` sets columns of your own on a ``TaskMixin`` model (``{"tenant_id": 7}``);
        they are checked against the model's columns when the task is written.
        Example: ``await submit_task(send_email.options(delay=60), to="a@b.c")``.
        Raises TaskArgumentsError for settings that cannot be submitted, like any other
        mistake in a submission.
        """
        bad = TaskArgumentsError
        delay = checked_when(self.name, delay, run_at)
        if queue is not None and (not isinstance(queue, str) or not queue or len(queue) > 100):
            raise bad(f"task {self.name!r}: queue must be a non-empty string of <= 100 chars")
        if priority is not None:
            check_priority(self.name, priority, bad)
        opts = self.submit_options
        if delay is not None or run_at is not None:
            opts = dataclasses.replace(opts, delay=delay, run_at=run_at)
        if queue is not None:
            opts = dataclasses.replace(opts, queue=queue)
        if priority is not None:
            opts = dataclasses.replace(opts, priority=priority)
        if columns:
            merged = {**dict(opts.columns), **checked_columns(self.name, columns)}
            opts = dataclasses.replace(opts, columns=tuple(sorted(merged.items())))
        if unique_key is not None or unique_on is not None or unique_states is not None:
            key, on, states = checked_unique(
                self.name, self._param_names, unique_key, unique_on, unique_states
            )
            opts = dataclasses.replace(opts, unique_key=key, unique_on=on, unique_states=states)
        return self._with(opts)

    def unique_key(self, args_json: str) -> tuple[str, list[str]] | None:
        """The stored key and states of a submission with these arguments, if it is unique."""
        opts = self.submit_options
        if not opts.unique:
            return None
        if opts.unique_key is not None:
            own = opts.unique_key
        else:
            # Canonical JSON of the chosen arguments, as stored: equal values, equal keys.
            args = json.loads(args_json)
            own = json.dumps(
                {n: args.get(n) for n in opts.unique_on or ()},
                sort_keys=True,
                separators=(",", ":"),
            )
        return f"{self.name}:{own}", list(opts.unique_states or UNIQUE_STATES)

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
        for passed_by_worker, what in (
            (self.context_param, "TaskContext"),
            (self.session_param, "session"),
        ):
            if passed_by_worker is not None and passed_by_worker in kwargs:
                raise TaskArgumentsError(
                    f"task {self.name!r}: {passed_by_worker!r} is its {what}, which the "
                    "worker passes: leave it out"
                )
        try:
            text = self._args_model.model_validate(kwargs).model_dump_json()
            # The model writes NaN and infinities as bare constants, which JSON (and JSONB)
            # refuse; a cheap screen first, the exact check only when the screen hits.
            if "NaN" in text or "Infinity" in text:
                json.loads(text, parse_constant=refuse_constant)
            refuse_nul(text)
        except PydanticValidationError as exc:
            raise TaskArgumentsError(f"invalid arguments for task {self.name!r}: {exc}") from None
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise TaskArgumentsError(
                f"arguments of task {self.name!r} are not JSON-serializable: {exc}"
            ) from None
        return text

    def dump_many_args(self, calls: Iterable[Mapping[str, Any]]) -> list[str]:
        """:meth:`dump_args` for each keyword mapping of a batch: the same checks and errors.

        Calls pydantic's validator and serializer directly (a third of :meth:`dump_args`'s
        time per call, measured for 1,000 calls); whatever looks amiss (a validation error,
        a worker-passed parameter, NaN, a NUL) goes through :meth:`dump_args`, which raises
        exactly what a single submit would.
        """
        validate = self._args_model.__pydantic_validator__.validate_python
        serialize = self._args_model.__pydantic_serializer__.to_json
        passed_by_worker = [p for p in (self.context_param, self.session_param) if p]
        out = []
        for call in calls:
            kwargs = dict(call)
            if any(p in kwargs for p in passed_by_worker):
                out.append(self.dump_args((), kwargs))
                continue
            try:
                text: str = serialize(validate(kwargs)).decode()
            except Exception:
                text = self.dump_args((), kwargs)
            else:
                if "NaN" in text or "Infinity" in text or "u0000" in text:
                    text = self.dump_args((), kwargs)
            out.append(text)
        return out

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
            adapter_ = adapter(fields[name].annotation)
            try:
                checked = adapter_.validate_python(value, strict=True)
                out[name] = adapter_.dump_python(checked, mode="json")
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
        # The model's fields are the parameters, by name: the fresh instance's __dict__ is the
        # call's keywords (the instance is dropped, so the caller may add to it). pydantic's
        # validator is called directly: model_validate_json is a Python wrapper around it,
        # a call per task on the worker's hot path.
        validated: Any = self._args_model.__pydantic_validator__.validate_json(stored_json)
        kwargs: dict[str, Any] = validated.__dict__
        return kwargs

    # -- results -----------------------------------------------------------------------------

    def call(self, *args: P.args, **kwargs: P.kwargs) -> TaskCall[R]:
        """This task with these arguments, validated now, for a group: ``submit_group([...])``."""
        self.dump_args(args, kwargs)
        bound = self._bind_positional(args, kwargs) if args else dict(kwargs)
        return TaskCall(self, bound)

    def load_result(self, stored_json: str | bytes) -> Any:
        """A stored result (JSON text) validated back into the declared return type."""
        return self._result_adapter.validate_json(stored_json)

    def handle(self, task_id: uuid.UUID | str) -> TaskHandle[R]:
        """A handle on a task of this definition submitted earlier, to await its result.

        For an id kept from a submit (in another process, say): ``await
        resize.handle(task_id).result()`` returns the result as ``resize`` declares it.
        """
        from .results import TaskHandle

        return TaskHandle(task_id, self)

    def dump_result(self, value: Any) -> str:
        """Validate a return value against the return annotation; return it as JSON text."""
        if value is None and self._none_result_ok:
            return "null"  # the common "-> None" task, without a trip through pydantic
        try:
            checked = self._result_adapter.validate_python(value, strict=True)
            text = self._result_adapter.dump_json(checked).decode()
            if "NaN" in text or "Infinity" in text:  # a cheap screen, as for arguments
                json.loads(text, parse_constant=refuse_constant)
            return refuse_nul(text)
        except PydanticValidationError as exc:
            raise TaskResultError(
                f"task {self.name!r} returned a value that does not match its annotation: {exc}"
            ) from None
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise TaskResultError(f"task {self.name!r} returned a non-JSON value: {exc}") from None

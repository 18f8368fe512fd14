"""Argument and result validation: strict pydantic models built from a task's type hints.

Arguments are validated *strictly* against the function's type hints when a task is submitted
(``count="5"`` for an ``int`` is refused) and stored as JSON; the worker validates the stored JSON
again with the same model, so datetimes, UUIDs, enums, dataclasses and pydantic models come back
as the types the function declared. JSON here means what PostgreSQL's ``jsonb`` stores: no NaN,
no infinities, no NUL character.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    create_model,
)
from pydantic import ValidationError as PydanticValidationError

from .context import CONTEXT, SESSION, TaskContext
from .exceptions import TaskDefinitionError

# NaN and infinities are kept as floats by the JSON-mode dump (pydantic would turn them into
# null silently) so that the json.dumps(allow_nan=False) check after it refuses them.
NAN_KEPT = ConfigDict(ser_json_inf_nan="constants")
STRICT = ConfigDict(strict=True, extra="forbid", ser_json_inf_nan="constants")

# An escaped NUL: "\u0000" after an even number of backslashes (an odd number would make it
# the text "\u0000" instead).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def refuse_nul(text: str) -> str:
    # JSON allows NUL characters in strings; PostgreSQL's jsonb does not, and would refuse the row.
    if "u0000" in text and _ESCAPED_NUL.search(text):
        raise ValueError("PostgreSQL cannot store the NUL character (U+0000) in JSON")
    return text


def refuse_constant(name: str) -> Any:
    raise ValueError(f"Out of range float values are not JSON compliant: {name}")


def hints(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # NameError for unresolvable forward references, mostly
        raise TaskDefinitionError(f"task {name!r}: cannot resolve type hints: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class Parameters:
    """A task's parameters: the arguments' model and names, and those the worker fills in."""

    model: type[BaseModel]
    names: tuple[str, ...]
    #: The ``TaskContext`` parameter's name, if any.
    context: str | None
    #: The session parameter of a transactional task (``AsyncSession`` or ``Session``).
    session: str | None


def _session_type(hint: Any) -> str | None:
    # Compared by name and module, so that this module need not import SQLAlchemy's ORM.
    for cls in getattr(hint, "__mro__", ()):
        if cls.__module__.startswith("sqlalchemy.") and cls.__name__ in ("AsyncSession", "Session"):
            return str(cls.__name__)
    return None


def parameters(
    fn: Callable[..., Any], name: str, *, is_async: bool, transactional: bool
) -> Parameters:
    """Read a task's signature: its arguments' model, and its context and session parameters."""
    found = hints(fn, name)
    fields: dict[str, Any] = {}
    context: str | None = None
    session: str | None = None
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TaskDefinitionError(
                f"task {name!r}: parameter {p.name!r} must be a named parameter "
                "(no *args, **kwargs or positional-only parameters)"
            )
        hint = found.get(p.name)
        if hint is TaskContext:
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
        kind = _session_type(hint)
        if kind is not None:
            session = _session_parameter(name, p, kind, session, is_async, transactional)
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (found.get(p.name, Any), default)
    if transactional and session is None:
        wanted = "AsyncSession" if is_async else "Session"
        raise TaskDefinitionError(
            f"task {name!r} is transactional: give it a parameter for its session "
            f"(session: {wanted} = SESSION)"
        )
    try:
        model = create_model(f"{name}:args", __config__=STRICT, **fields)
    except (PydanticSchemaGenerationError, TypeError) as exc:
        raise TaskDefinitionError(f"task {name!r}: unsupported parameter type: {exc}") from exc
    return Parameters(model, tuple(fields), context, session)


def _session_parameter(
    name: str,
    p: inspect.Parameter,
    kind: str,
    seen: str | None,
    is_async: bool,
    transactional: bool,
) -> str:
    if not transactional:
        raise TaskDefinitionError(
            f"task {name!r}: parameter {p.name!r} is a {kind}; a task that works in the "
            "worker's transaction says so: @task(transactional=True)"
        )
    if seen is not None:
        raise TaskDefinitionError(f"task {name!r}: more than one session parameter")
    wanted = "AsyncSession" if is_async else "Session"
    if kind != wanted:
        raise TaskDefinitionError(
            f"task {name!r}: {'an async' if is_async else 'a sync'} task receives "
            f"{'an AsyncSession' if is_async else 'a Session'}, not a {kind}"
        )
    if p.default is not SESSION:
        raise TaskDefinitionError(
            f"task {name!r}: give the session parameter the default SESSION "
            f"({p.name}: {wanted} = SESSION), so that callers may leave it out"
        )
    return p.name


def result_adapter(fn: Callable[..., Any], name: str, is_async: bool) -> TypeAdapter[Any]:
    hint = hints(fn, name).get("return", Any)
    if hint is None:
        hint = type(None)
    try:
        return adapter(hint)
    except PydanticSchemaGenerationError as exc:
        raise TaskDefinitionError(f"task {name!r}: unsupported return type: {exc}") from exc


def accepts_none(adapter: TypeAdapter[Any]) -> bool:
    try:
        adapter.validate_python(None, strict=True)
    except PydanticValidationError:
        return False
    return True


def adapter(hint: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(hint, config=NAN_KEPT)
    except PydanticSchemaGenerationError:
        raise
    except PydanticUserError:  # types with a config of their own (BaseModel, dataclasses)
        return TypeAdapter(hint)

"""Groups (fan-out / fan-in): members that run in parallel, then one follow-up with their results.

    handle = await submit_group(
        [resize.call(image_id=i) for i in ids], merge, "sizes", on_failure="fail", album=7
    )
    total = await handle.result()

The follow-up is written with the members, in the same transaction (or the caller's, with
``add_group``), but due in the far future. Every statement that records a member's end (the
finish statement, the rescuer giving up on it, a cancel) counts the follow-up's
``group_remaining`` down in the same statement; the one that reaches 0 makes it due. So the
follow-up runs once, after every member has finished, and is neither lost nor doubled when
workers die. When it is claimed, the worker reads the members' outcomes in order and passes them
as the argument named by ``arg``:

- ``on_failure="fail"`` (the default): a list of the members' results, each validated by the
  follow-up's annotation; if any member failed or was cancelled, the follow-up is not run and
  fails (``GroupFailed``, naming the member).
- ``on_failure="outcomes"``: a list of :class:`MemberOutcome` (state, result, error) for every
  member, failures included, for the follow-up to decide.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from .exceptions import TaskArgumentsError

R = TypeVar("R")

OnFailure = Literal["fail", "outcomes"]


@dataclasses.dataclass(frozen=True)
class TaskCall(Generic[R]):
    """A task with its arguments, validated, not yet submitted: a member of a group."""

    definition: Any  # TaskDefinition[Any, R]; Any to keep this module free of the import
    kwargs: dict[str, Any]


class MemberOutcome(BaseModel):
    """How one member of a group ended, for a follow-up with ``on_failure="outcomes"``."""

    index: int
    id: uuid.UUID
    state: str
    #: The member's result as JSON (completed members), else None.
    result: Any = None
    error: str | None = None


def group_spec(arg: str, on_failure: str, size: int) -> dict[str, Any]:
    if on_failure not in ("fail", "outcomes"):
        raise TaskArgumentsError("on_failure must be 'fail' or 'outcomes'")
    return {"arg": arg, "on_failure": on_failure, "size": size}


def check_members(members: Sequence[TaskCall[Any]]) -> None:
    for m in members:
        if not isinstance(m, TaskCall):
            raise TaskArgumentsError(f"a group's members are task calls (fn.call(...)), not {m!r}")
        if m.definition.submit_options.chain:
            raise TaskArgumentsError(
                f"task {m.definition.name!r}: a group member cannot have a chain; chain the "
                "follow-up instead"
            )
        if m.definition.submit_options.unique:
            raise TaskArgumentsError(f"task {m.definition.name!r}: a group member cannot be unique")


def follow_up_args(
    args_json: str, spec: dict[str, Any], members: Sequence[tuple[Any, ...]]
) -> str | tuple[str, str]:
    """The follow-up's arguments with the members' outcomes filled in, as JSON text; or
    ``(type, message)`` of the failure to record when the group fails.

    ``members``: (index, id, state, result JSON text, error) of every member, in order.
    """
    arg = spec["arg"]
    if spec["on_failure"] == "fail":
        for index, member_id, state, _result, error in members:
            if state != "completed":
                return (
                    "GroupFailed",
                    f"member #{index} [{member_id}] {state}: {error or 'no error recorded'}",
                )
        parts = [result or "null" for *_, result, _error in members]
        filled = "[" + ",".join(parts) + "]"
    else:
        filled = json.dumps(
            [
                {
                    "index": index,
                    "id": str(member_id),
                    "state": state,
                    "result": None if result is None else json.loads(result),
                    "error": error,
                }
                for index, member_id, state, result, error in members
            ]
        )
    base = args_json.rstrip()
    if base == "{}":
        return f"{{{json.dumps(arg)}:{filled}}}"
    # The stored arguments are a JSON object without ``arg``: splice it in.
    return f"{base[:-1]},{json.dumps(arg)}:{filled}}}"

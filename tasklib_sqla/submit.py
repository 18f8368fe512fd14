"""Submitting tasks: into a caller's session (the transactional outbox) or on their own.

``add_task(session, fn, ...)`` only *adds a row to the caller's session*. ``Session.add`` is
synchronous on ``AsyncSession`` too, so one code path serves both: the row is written with the
caller's next flush, exists if and only if the caller's transaction commits, and its id is
known at once. Workers are woken by the table's trigger, whose NOTIFY PostgreSQL delivers on
commit only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    String,
    Text,
    any_,
    bindparam,
    cast,
    column,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.types import Uuid

from . import direct, telemetry
from .exceptions import TaskArgumentsError
from .groups import TaskCall, check_members, group_spec
from .models import DEFAULT_MAX_RETRIES, UNIQUE_PREDICATE, TaskMixin, TaskState, library_columns
from .queries import ZERO, records, seconds
from .registry import TaskDefinition

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=TaskMixin)

# Scoped sessions (Flask-SQLAlchemy's ``db.session``, say) are accepted wherever a session is.
SyncSession = Session | scoped_session[Any]
AsyncAnySession = AsyncSession | async_scoped_session[Any]
AnySession = Session | AsyncSession | scoped_session[Any] | async_scoped_session[Any]


def unscoped(session: AnySession) -> Session | AsyncSession:
    """The session a scoped session stands for (the current scope's); others as they are."""
    if isinstance(session, scoped_session | async_scoped_session):
        current: Session | AsyncSession = session()
        return current
    return session


def task_values(
    definition: TaskDefinition[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    default_max_retries: int = DEFAULT_MAX_RETRIES,
    parent_id: uuid.UUID | None = None,
    trace_context: dict[str, str] | None = None,
    span: bool = True,
    partial: str | None = None,
) -> dict[str, Any]:
    """The column values of a new task row; validates the arguments first.

    Raises TaskArgumentsError (a ValueError) before anything is written. With tracing on,
    ``span`` opens the submit's PRODUCER span here; batch submits open one for the whole batch
    and pass its ``trace_context`` instead.
    """
    _require_task(definition)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "args_json": (
            definition.dump_args(args, kwargs)
            if partial is None
            # A group's follow-up: every argument but the one its members' results fill.
            else json.dumps(definition.dump_partial_args(partial, kwargs), separators=(",", ":"))
        ),
        **_shared_values(definition, default_max_retries, parent_id, trace_context),
    }
    if span and telemetry.tracing():
        with telemetry.publishing(definition.name, values["queue"]) as carrier:
            values["trace_context"] = carrier
    values["unique"] = definition.unique_key(values["args_json"])
    return values


def _shared_values(
    definition: TaskDefinition[Any, Any],
    default_max_retries: int,
    parent_id: uuid.UUID | None,
    trace_context: dict[str, str] | None,
) -> dict[str, Any]:
    """A new row's columns but its id, arguments and unique key: what every row of a batch
    shares (:func:`task_values` and :func:`batch_values` both build on it)."""
    opts = definition.submit_options
    return {
        "name": definition.name,
        **definition.settings(default_max_retries),
        "chain": [step.as_json(default_max_retries) for step in opts.chain] or None,
        "parent_id": parent_id,
        "trace_context": trace_context,
        "columns": dict(opts.columns),
        # run_at wins over delay (options() refuses both); the writers below turn them into SQL.
        "scheduled_at": opts.run_at,
        "delay": opts.delay,
        "unique": None,
    }


def batch_values(
    fn: TaskDefinition[Any, Any],
    calls: Iterable[Mapping[str, Any]],
    *,
    default_max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[dict[str, Any]]:
    """The rows of a batch of one task, all validated first, under one PRODUCER span.

    The same rows :func:`task_values` gives one by one, with what every row of the batch
    shares computed once: per row, only the id and the validated arguments (and the unique
    key) are new.
    """
    _require_task(fn)
    calls = list(calls)
    unique = fn.submit_options.unique
    queue = fn.settings(default_max_retries)["queue"]
    with telemetry.publishing(fn.name, queue, len(calls)) as carrier:
        shared = _shared_values(fn, default_max_retries, None, carrier)
        rows = []
        for args_json in fn.dump_many_args(calls):
            row = {**shared, "id": uuid.uuid4(), "args_json": args_json}
            if unique:
                row["unique"] = fn.unique_key(args_json)
            rows.append(row)
        return rows


def _require_task(definition: object) -> None:
    if not isinstance(definition, TaskDefinition):
        raise TypeError(f"expected a @task-decorated function, got {definition!r}")


def add_task_to(
    session: AnySession,
    model: type[TaskMixin],
    fn: TaskDefinition[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    default_max_retries: int = DEFAULT_MAX_RETRIES,
    parent_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Add one task row to the caller's session and return its id; nothing is committed here.

    The row is inserted with the session's next flush and exists only if the caller's
    transaction commits.
    """
    values = task_values(
        fn, args, kwargs, default_max_retries=default_max_retries, parent_id=parent_id
    )
    if values["unique"] is not None:
        return _write_unique_in(session, model, [values])[0]
    row = _orm_row(model, values)
    session.add(row)
    return row.id


def add_tasks_to(
    session: AnySession,
    model: type[TaskMixin],
    fn: TaskDefinition[Any, Any],
    calls: Iterable[Mapping[str, Any]],
    *,
    default_max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[uuid.UUID]:
    """Add one task per keyword mapping in ``calls``; all validated before any is added.

    The session's flush writes them in one batched INSERT.
    """
    values = batch_values(fn, calls, default_max_retries=default_max_retries)
    if values and values[0]["unique"] is not None:
        return _write_unique_in(session, model, values)
    rows = [_orm_row(model, v) for v in values]
    session.add_all(rows)
    return [r.id for r in rows]


def _write_unique_in(
    session: AnySession, model: type[TaskMixin], rows: list[dict[str, Any]]
) -> list[uuid.UUID]:
    # A unique task must learn at once whether its key is taken, so it cannot wait for the
    # session's flush: it is inserted now, in the caller's transaction.
    plain = unscoped(session)
    if isinstance(plain, AsyncSession):
        raise TaskArgumentsError(
            f"task {rows[0]['name']!r} is unique: in an AsyncSession, submit it with "
            "`await insert_task(session, ...)`, which learns at once whether its key is taken"
        )
    plain.flush()  # the caller's pending rows first, as an autoflush would
    return write_unique(plain.execute, model, rows)


def host_columns(model: type[TaskMixin], name: str, columns: Mapping[str, Any]) -> None:
    """Refuse values for columns the model does not have (TaskArgumentsError, nothing written)."""
    table_columns = set(model.__table__.columns.keys())  # type: ignore[attr-defined]
    unknown = sorted(set(columns) - table_columns)
    if unknown:
        own = sorted(table_columns - library_columns())
        raise TaskArgumentsError(
            f"task {name!r}: {model.__name__} has no column {', '.join(map(repr, unknown))}; "
            f"its own columns: {', '.join(own) or 'none'}"
        )


def _orm_row(model: type[M], values: dict[str, Any]) -> M:
    values.pop("unique", None)
    extra = values.pop("columns", None) or {}
    if extra:
        host_columns(model, values["name"], extra)
        values.update(extra)
    values["args"] = json.loads(values.pop("args_json"))
    delay = values.pop("delay")
    if delay is not None:
        # The database's clock, so that app servers with skewed clocks agree with workers.
        values["scheduled_at"] = func.now() + delay
    elif values["scheduled_at"] is None:
        del values["scheduled_at"]  # the server default, now()
    return model(**values)


def _scheduled_at(run_at: Any, delay: Any) -> Any:
    """A new row's ``scheduled_at``: ``run_at`` if given, else the database's now plus the
    delay (seconds, none for now): the database's clock, so that skewed app servers agree."""
    return func.coalesce(run_at, func.now() + seconds(func.coalesce(delay, ZERO)))


_INSERTS: dict[tuple[type[TaskMixin], tuple[str, ...]], Any] = {}


def _unique_insert(model: type[TaskMixin], extra: tuple[str, ...] = ()) -> Any:
    key = (model, extra)
    if key not in _INSERTS:
        _INSERTS[key] = _build_unique_insert(model, extra)
    return _INSERTS[key]


def _build_unique_insert(model: type[TaskMixin], extra: tuple[str, ...] = ()) -> Any:
    # The whole batch travels as one JSON parameter: one statement (so the NOTIFY trigger
    # fires once), one round trip and one cached compilation for any number of rows.
    v = records(
        column("id", Uuid),
        column("name", String),
        column("queue", String),
        column("priority", Integer),
        column("args", JSONB),
        column("max_retries", Integer),
        column("timeout_seconds", Float),
        column("run_at", DateTime(timezone=True)),
        column("delay", Float),
        column("chain", JSONB),
        column("parent_id", Uuid),
        column("trace_context", JSONB),
        column("unique_key", Text),
        column("unique_states", ARRAY(String)),
        # The host's own columns, with the types the table gives them.
        *(column(name, model.__table__.c[name].type) for name in extra),  # type: ignore[attr-defined]
    )
    rows = select(
        v.c.id,
        v.c.name,
        v.c.queue,
        v.c.priority,
        v.c.args,
        v.c.max_retries,
        v.c.timeout_seconds,
        _scheduled_at(v.c.run_at, v.c.delay),
        v.c.chain,
        v.c.parent_id,
        v.c.trace_context,
        v.c.unique_key,
        v.c.unique_states,
        *(v.c[name] for name in extra),
    )
    names = [
        "id",
        "name",
        "queue",
        "priority",
        "args",
        "max_retries",
        "timeout_seconds",
        "scheduled_at",
        "chain",
        "parent_id",
        "trace_context",
        "unique_key",
        "unique_states",
        *extra,
    ]
    # A key already held (by a task in one of its unique states) skips the row; RETURNING
    # names the rows written, the caller looks up the holders of the others.
    # On the Table, not the ORM entity: a Session would take the ORM form's parameters for
    # rows of a bulk INSERT, where they are the one JSON batch.
    table: Any = model.__table__  # type: ignore[attr-defined]
    return (
        pg_insert(table)
        .from_select(names, rows)
        .on_conflict_do_nothing(
            index_elements=[table.c.unique_key], index_where=text(UNIQUE_PREDICATE)
        )
        .returning(table.c.id)
    )


def _batch_json(rows: list[dict[str, Any]]) -> str:
    # Assembled by hand: each row's arguments are JSON text already (validated and serialized
    # by pydantic), so they are spliced in rather than parsed and dumped again.
    quoted: dict[str, str] = {}  # names and queues repeat across a batch

    def q(text: str) -> str:
        if text not in quoted:
            quoted[text] = json.dumps(text)
        return quoted[text]

    parts = []
    for r in rows:
        run_at, delay, timeout, chain, parent = (
            r["scheduled_at"],
            r["delay"],
            r["timeout_seconds"],
            r["chain"],
            r.get("parent_id"),
        )
        parent_json = "null" if parent is None else f'"{parent}"'
        unique = r.get("unique")
        unique_json = (
            '"unique_key":null,"unique_states":null'
            if unique is None
            else f'"unique_key":{json.dumps(unique[0])},"unique_states":{json.dumps(unique[1])}'
        )
        trace_json = "null" if r.get("trace_context") is None else json.dumps(r["trace_context"])
        # Host columns: JSON numbers and strings, which PostgreSQL casts to the column's type
        # (dates, UUIDs and decimals travel as their text).
        own = "".join(
            f",{q(k)}:{json.dumps(v, default=str)}" for k, v in sorted(r["columns"].items())
        )
        parts.append(
            f'{{"id":"{r["id"]}","name":{q(r["name"])},"queue":{q(r["queue"])},'
            f'"priority":{int(r["priority"])},"args":{r["args_json"]},'
            f'"max_retries":{int(r["max_retries"])},'
            f'"timeout_seconds":{"null" if timeout is None else repr(float(timeout))},'
            f'"run_at":{"null" if run_at is None else json.dumps(run_at.isoformat())},'
            f'"delay":{"null" if delay is None else repr(delay.total_seconds())},'
            f'"chain":{"null" if chain is None else json.dumps(chain)},'
            f'"parent_id":{parent_json},"trace_context":{trace_json},{unique_json}{own}}}'
        )
    return "[" + ",".join(parts) + "]"


async def write_tasks(
    engine: AsyncEngine, model: type[TaskMixin], rows: list[dict[str, Any]], *, batch: bool = False
) -> list[uuid.UUID]:
    """Insert prepared rows (from :func:`task_values`) in one atomic statement; their ids.

    Runs in autocommit: a single INSERT is atomic by itself, and skipping BEGIN/COMMIT saves
    two round trips per call. Unique rows whose key is held return the holder's id.
    ``batch``: the rows come from :func:`batch_values` (they differ only in id and arguments);
    otherwise they are unique rows, or the one row of a standalone submit.
    """
    if not rows:
        return []
    extra = _extra_columns(model, rows[:1] if batch else rows)
    unique = rows[0]["unique"] is not None
    async with engine.connect() as conn:
        if batch and not unique:
            statement, params = _columnar_insert(model, extra), _columnar_params(rows, extra)
        elif not unique:
            (row,) = rows
            statement, params = _single_insert(model, extra), _single_params(row, extra)
            # The host's own columns go through SQLAlchemy, whose types may process their values.
            usable = not extra and direct.usable(engine)
            fast = direct.compiled(engine.dialect, statement) if usable else None
            if fast:
                await direct.execute(conn, fast, params)
                return [row["id"]]
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if unique:
            return await conn.run_sync(lambda c: write_unique(c.execute, model, rows))
        await conn.execute(statement, params)
    return [r["id"] for r in rows]


_SINGLES: dict[tuple[type[TaskMixin], tuple[str, ...]], Any] = {}


def _single_insert(model: type[TaskMixin], extra: tuple[str, ...]) -> Any:
    """The INSERT of one task, its values as plain parameters.

    A standalone submit's statement: cheaper for PostgreSQL than the batch forms (no JSON
    document to parse into a record set), and simple enough to run on the driver's own
    connection (see ``direct``). The columns SQLAlchemy fills with Python-side defaults are
    given here as SQL literals, so that nothing is computed at execution.
    """
    key = (model, extra)
    if key in _SINGLES:
        return _SINGLES[key]
    table: Any = model.__table__  # type: ignore[attr-defined]

    def jsonb(name: str) -> Any:
        return cast(bindparam(name, type_=Text), JSONB)

    statement = insert(table).values(
        id=bindparam("id", type_=Uuid),
        name=bindparam("name", type_=String),
        queue=bindparam("queue", type_=String),
        priority=bindparam("priority", type_=Integer),
        args=jsonb("args"),
        max_retries=bindparam("max_retries", type_=Integer),
        timeout_seconds=bindparam("timeout_seconds", type_=Float),
        scheduled_at=_scheduled_at(
            bindparam("run_at", type_=DateTime(timezone=True)),
            bindparam("delay", type_=Float),
        ),
        chain=jsonb("chain"),
        parent_id=bindparam("parent_id", type_=Uuid),
        trace_context=jsonb("trace_context"),
        state=literal_column(f"'{TaskState.PENDING.value}'"),
        errors=literal_column("'[]'"),
        attempts=ZERO,
        **{name: bindparam(f"col_{name}", type_=table.c[name].type) for name in extra},
    )
    _SINGLES[key] = statement
    return statement


def _single_params(row: dict[str, Any], extra: tuple[str, ...]) -> dict[str, Any]:
    delay, timeout, chain, trace = (
        row["delay"],
        row["timeout_seconds"],
        row["chain"],
        row.get("trace_context"),
    )
    return {
        "id": row["id"],
        "name": row["name"],
        "queue": row["queue"],
        "priority": int(row["priority"]),
        "args": row["args_json"],
        "max_retries": int(row["max_retries"]),
        "timeout_seconds": None if timeout is None else float(timeout),
        "run_at": row["scheduled_at"],
        "delay": None if delay is None else delay.total_seconds(),
        "chain": None if chain is None else json.dumps(chain),
        "parent_id": row.get("parent_id"),
        "trace_context": None if trace is None else json.dumps(trace),
        **{f"col_{name}": row["columns"][name] for name in extra},
    }


_COLUMNAR: dict[tuple[type[TaskMixin], tuple[str, ...]], Any] = {}


def _columnar_insert(model: type[TaskMixin], extra: tuple[str, ...]) -> Any:
    """The INSERT of a batch of one task: ids and arguments as two arrays, the rest once.

    Half the time of the one-JSON-document form for 1,000 rows (measured with
    ``python -m bench``): PostgreSQL neither parses the shared fields a thousand times nor
    builds a JSON document of the batch first, and the client formats no row.
    """
    key = (model, extra)
    if key in _COLUMNAR:
        return _COLUMNAR[key]
    v = (
        func.unnest(
            bindparam("ids", type_=ARRAY(Uuid)),
            cast(bindparam("args", type_=ARRAY(Text)), ARRAY(JSONB)),
        )
        .table_valued("id", "args")
        .render_derived(name="v")
    )
    table: Any = model.__table__  # type: ignore[attr-defined]
    rows = select(
        v.c.id,
        bindparam("b_name", type_=String),
        bindparam("b_queue", type_=String),
        bindparam("b_priority", type_=Integer),
        v.c.args,
        bindparam("b_max_retries", type_=Integer),
        bindparam("b_timeout_seconds", type_=Float),
        _scheduled_at(
            bindparam("b_run_at", type_=DateTime(timezone=True)),
            bindparam("b_delay", type_=Float),
        ),
        cast(bindparam("b_chain", type_=Text), JSONB),
        cast(bindparam("b_trace_context", type_=Text), JSONB),
        *(bindparam(f"b_col_{name}", type_=table.c[name].type) for name in extra),
    )
    names = [
        "id",
        "name",
        "queue",
        "priority",
        "args",
        "max_retries",
        "timeout_seconds",
        "scheduled_at",
        "chain",
        "trace_context",
        *extra,
    ]
    _COLUMNAR[key] = statement = insert(model).from_select(names, rows)
    return statement


def _columnar_params(rows: list[dict[str, Any]], extra: tuple[str, ...]) -> dict[str, Any]:
    first = rows[0]
    chain, trace, delay = first["chain"], first["trace_context"], first["delay"]
    return {
        "ids": [r["id"] for r in rows],
        "args": [r["args_json"] for r in rows],
        "b_name": first["name"],
        "b_queue": first["queue"],
        "b_priority": first["priority"],
        "b_max_retries": first["max_retries"],
        "b_timeout_seconds": first["timeout_seconds"],
        "b_run_at": first["scheduled_at"],
        "b_delay": None if delay is None else delay.total_seconds(),
        "b_chain": None if chain is None else json.dumps(chain),
        "b_trace_context": None if trace is None else json.dumps(trace),
        **{f"b_col_{name}": first["columns"][name] for name in extra},
    }


def _extra_columns(model: type[TaskMixin], rows: list[dict[str, Any]]) -> tuple[str, ...]:
    extra = tuple(sorted(rows[0]["columns"]))
    if any(tuple(sorted(r["columns"])) != extra for r in rows):
        raise TaskArgumentsError("a batch must set the same columns of its own on every task")
    if extra:
        host_columns(model, rows[0]["name"], rows[0]["columns"])
    return extra


#: How often a unique insert tries again when the task holding its key finished meanwhile.
_UNIQUE_TRIES = 20


def write_unique(
    execute: Callable[..., Any], model: type[TaskMixin], rows: list[dict[str, Any]]
) -> list[uuid.UUID]:
    """Insert unique rows, each unless its key is held; the ids written or holding the keys.

    ``execute`` runs a statement where the rows belong: an autocommit connection, or the
    caller's session (then inside their transaction). A key held by a transaction that has
    not committed yet makes the INSERT wait for it (PostgreSQL's unique index does): then the
    row is skipped if that transaction commits, written if it rolls back.
    """
    statement = _unique_insert(model, _extra_columns(model, rows))
    ids: list[uuid.UUID | None] = [None] * len(rows)
    todo = list(range(len(rows)))
    for _ in range(_UNIQUE_TRIES):
        batch = [rows[i] for i in todo]
        written = {r[0] for r in execute(statement, {"batch": _batch_json(batch)})}
        skipped = []
        for i in todo:
            if rows[i]["id"] in written:
                ids[i] = rows[i]["id"]
            else:
                skipped.append(i)
        if not skipped:
            break
        keys = sorted({rows[i]["unique"][0] for i in skipped})
        holders = dict(
            execute(
                select(model.unique_key, model.id).where(
                    model.unique_key.in_(keys), model.state == any_(model.unique_states)
                )
            ).all()
        )
        # A key whose holder finished between the two statements is free again: once more.
        todo = [i for i in skipped if holders.get(rows[i]["unique"][0]) is None]
        for i in skipped:
            ids[i] = holders.get(rows[i]["unique"][0])
        if not todo:
            break
    if any(i is None for i in ids):
        raise RuntimeError("unique tasks: the keys kept changing hands; try again")
    return [i for i in ids if i is not None]


#: When a follow-up waits for its members: not before the year 9999, until the last one
#: counts it down. Finite: 'infinity' would not load into a Python datetime.
_WAITING = datetime(9999, 1, 1, tzinfo=UTC)


def group_values(
    members: Sequence[TaskCall[Any]],
    then: TaskDefinition[Any, Any],
    arg: str,
    args: dict[str, Any],
    on_failure: str,
    *,
    default_max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[dict[str, Any]]:
    """The rows of a group: its members, then its follow-up (last); all validated first."""
    _require_task(then)
    members = list(members)
    check_members(members)
    if then.submit_options.delay is not None or then.submit_options.run_at is not None:
        raise TaskArgumentsError("a group's follow-up runs when its members are done: no delay")
    follow_up = task_values(then, (), args, default_max_retries=default_max_retries, partial=arg)
    follow_up["group_remaining"] = len(members)
    follow_up["group_spec"] = group_spec(arg, on_failure, len(members))
    if members:
        follow_up["scheduled_at"] = _WAITING
    rows = []
    for index, m in enumerate(members):
        row = task_values(m.definition, (), m.kwargs, default_max_retries=default_max_retries)
        row["group_id"], row["group_index"] = follow_up["id"], index
        rows.append(row)
    return [*rows, follow_up]


def add_group_to(session: AnySession, model: type[TaskMixin], rows: list[dict[str, Any]]) -> None:
    """Add a group's rows to the caller's session: written with its next flush, together."""
    unscoped(session).add_all([_orm_row(model, values) for values in rows])

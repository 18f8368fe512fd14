"""The task table: ``TaskState``, the ``TaskMixin`` for a host base, and the ready ``Task``.

A host app that keeps its own declarative base writes::

    class Task(TaskMixin, Base):
        __tablename__ = "tasks"
        tenant_id: Mapped[int | None]          # columns of its own are fine

and the table arrives through the app's own Alembic migrations. Apps without a base of their
own use :class:`Task`, which lives on :data:`metadata`.
"""

from __future__ import annotations

import enum
import functools
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column
from sqlalchemy.schema import SchemaItem, conv
from sqlalchemy.types import Uuid

from .schema import attach_notify_trigger

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3

#: Naming convention of the package's own :data:`metadata`; keeps Alembic output stable.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class TaskState(enum.StrEnum):
    """Where a task is in its life. A StrEnum, so ``task.state == "failed"`` works too."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})

_STATE_TYPE = SAEnum(
    TaskState,
    native_enum=False,
    create_constraint=False,  # the CHECK below is named and written out explicitly
    length=16,
    values_callable=lambda states: [s.value for s in states],
    validate_strings=True,
)
_NOW = text("now()")


#: The predicate of the unique index, and of the inserts' ON CONFLICT that names it.
UNIQUE_PREDICATE = "unique_key IS NOT NULL AND state = ANY (unique_states)"
#: The states in which a unique task blocks another by default: until it has run.
UNIQUE_STATES = ("pending", "running")


def task_table_args(table_name: str) -> tuple[SchemaItem, ...]:
    """The constraints and indexes every task table needs.

    ``TaskMixin`` uses this as its ``__table_args__``; a host model that needs table arguments
    of its own writes ``(*task_table_args(cls.__tablename__), MyIndex(...))``. Names are
    wrapped in ``conv()`` so that no naming convention of the host's metadata rewrites them.
    """
    t = table_name
    states = ", ".join(f"'{s.value}'" for s in TaskState)
    return (
        CheckConstraint(f"state IN ({states})", name=conv(f"ck_{t}_state")),
        CheckConstraint("attempts >= 0", name=conv(f"ck_{t}_attempts")),
        CheckConstraint("max_retries >= 0", name=conv(f"ck_{t}_max_retries")),
        CheckConstraint(
            "timeout_seconds IS NULL OR timeout_seconds > 0", name=conv(f"ck_{t}_timeout")
        ),
        CheckConstraint(
            "state <> 'running' OR (worker_id IS NOT NULL AND locked_until IS NOT NULL"
            " AND started_at IS NOT NULL)",
            name=conv(f"ck_{t}_running_owned"),
        ),
        CheckConstraint(
            "state NOT IN ('completed', 'failed', 'cancelled') OR completed_at IS NOT NULL",
            name=conv(f"ck_{t}_finished_at"),
        ),
        # The claim query reads pending rows in this order; the partial index keeps its cost
        # independent of how many finished rows the table holds.
        Index(
            conv(f"ix_{t}_claim"),
            text("priority DESC"),
            "scheduled_at",
            "id",
            postgresql_where=text("state = 'pending'"),
        ),
        # Workers of chosen queues read each queue in claim order from this one, so a backlog
        # in another queue costs them nothing.
        Index(
            conv(f"ix_{t}_claim_queue"),
            "queue",
            # NULLS LAST: see queries._due_by_queue (the claim asks for this very order).
            text("priority DESC NULLS LAST"),
            "scheduled_at",
            "id",
            postgresql_where=text("state = 'pending'"),
        ),
        # The steered claim (queues paused or limited) and the idle probe read pending rows
        # level by level, one (queue, name, priority) at a time, and find the levels by
        # skipping through this index: a backlog of a paused queue, a limited name, a name no
        # worker runs or tasks scheduled for later costs them one index read per level, not a
        # walk. NULLS LAST, as in ix_<t>_claim_queue: the order the level reads ask for, which
        # ix_<t>_claim cannot give (it would walk every queue's rows).
        Index(
            conv(f"ix_{t}_claim_stream"),
            "queue",
            "name",
            text("priority DESC NULLS LAST"),
            "scheduled_at",
            "id",
            postgresql_where=text("state = 'pending'"),
        ),
        # A task's children; only child rows are in it.
        Index(
            conv(f"ix_{t}_parent"),
            "parent_id",
            postgresql_where=text("parent_id IS NOT NULL"),
        ),
        # Unique tasks: one row per key among the states the submission chose.
        Index(
            conv(f"ix_{t}_unique"),
            "unique_key",
            unique=True,
            postgresql_where=text(UNIQUE_PREDICATE),
        ),
        # A group's members, in order, for its follow-up; only member rows are in it.
        Index(
            conv(f"ix_{t}_group"),
            "group_id",
            "group_index",
            postgresql_where=text("group_id IS NOT NULL"),
        ),
        # The rescuer looks for running rows whose lease has expired.
        Index(conv(f"ix_{t}_lease"), "locked_until", postgresql_where=text("state = 'running'")),
        # The history by state and completion time: retention deletes the oldest rows of a
        # state, and status and the dashboard count the last hour's, without a sequential scan
        # of every finished task kept (millions, at the default retention of a busy queue).
        # Its price: a finish adds an entry, at the end of its state's run (mid-index, so the
        # index grows to about twice its rebuilt size; measured in docs/scaling.md).
        Index(
            conv(f"ix_{t}_finished"),
            "state",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL"),
        ),
    )


def claim_index(table_name: str, *columns: str) -> Index:
    """An index that serves the claim of workers restricted by ``columns`` of your own.

    For a per-tenant worker pool (``TaskWorker(..., where={"tenant_id": 7})``), add
    ``claim_index("tasks", "tenant_id")`` to the model's ``__table_args__``: pending rows by
    those columns, then in claim order, so that such a worker reads its own rows only, however
    large the other tenants' backlogs.
    """
    if not columns:
        raise ValueError("claim_index needs at least one column")
    return Index(
        conv(f"ix_{table_name}_claim_by_{'_'.join(columns)}"),
        *columns,
        text("priority DESC"),
        "scheduled_at",
        "id",
        postgresql_where=text("state = 'pending'"),
    )


class TaskMixin:
    """The columns, constraints and indexes of a task table, for a host app's declarative base.

    The host sets ``__tablename__`` (the library's own :class:`Task` uses ``tasks``).
    Constructing a row assigns its ``id`` at once, before any flush.
    """

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )
    #: The stable name the task was registered under.
    name: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(
        String(100), default=DEFAULT_QUEUE, server_default=DEFAULT_QUEUE
    )
    #: Higher runs first among due tasks.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    state: Mapped[TaskState] = mapped_column(
        _STATE_TYPE, default=TaskState.PENDING, server_default=TaskState.PENDING.value
    )
    args: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    result: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    #: The last error, one line; the full history is in ``errors``.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: One entry per failed attempt: attempt, type, message, traceback, worker_id, at.
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list, server_default="[]")
    #: Attempts started so far; with ``worker_id`` it identifies the current owner (the fence).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Retries after the first attempt; ``max_retries + 1`` attempts at most.
    max_retries: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_MAX_RETRIES, server_default=str(DEFAULT_MAX_RETRIES)
    )
    timeout_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Tasks to submit after this one completes (``TaskDefinition.then``); None for most tasks.
    chain: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSONB(none_as_null=True), nullable=True
    )
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: The task that submitted this one through its context (``TaskContext.submit``/``add``).
    parent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    #: The submitter's OpenTelemetry trace context (W3C headers), when tracing is on.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(
        JSONB(none_as_null=True), nullable=True
    )
    #: Unique tasks: submissions with the same key are one task while its state is one of
    #: ``unique_states`` (a partial unique index, ``ix_<table>_unique``).
    unique_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    unique_states: Mapped[list[str] | None] = mapped_column(ARRAY(String(20)), nullable=True)
    #: Groups (fan-out/fan-in): a member's follow-up task, and the member's position.
    group_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    group_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: A follow-up's members not finished yet; it falls due when this reaches 0.
    group_remaining: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: A follow-up's settings: the parameter receiving the results, the failure policy.
    group_spec: Mapped[dict[str, Any] | None] = mapped_column(
        JSONB(none_as_null=True), nullable=True
    )

    @declared_attr.directive
    @classmethod
    def __table_args__(cls) -> tuple[SchemaItem, ...]:
        return task_table_args(cls.__tablename__)  # type: ignore[attr-defined]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The declarative base has mapped the class by now; a class with a table of its own
        # gets the NOTIFY trigger installed by metadata.create_all() too.
        table = cls.__dict__.get("__table__")
        if table is not None:
            attach_notify_trigger(table)
            workers_table(table)
            queues_table(table)
            limits_table(table)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.name!r} {self.state}>"

    @property
    def is_finished(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.state in FINISHED_STATES


@functools.cache
def library_columns() -> frozenset[str]:
    """The columns ``TaskMixin`` defines; any other column of a task model is the host's."""
    return frozenset(
        name
        for name in TaskMixin.__annotations__
        if not name.startswith("_") and name not in ("__tablename__",)
    )


def _declared(tasks: Table, name: str) -> Table | None:
    """The table ``name`` beside ``tasks`` (same MetaData and schema), if declared already."""
    return tasks.metadata.tables.get(name if tasks.schema is None else f"{tasks.schema}.{name}")


def workers_table(tasks: Table) -> Table:
    """The worker registry beside a task table: ``<tasks>_workers``, one row per live worker.

    Declared on the task table's own MetaData, so it arrives with the host's migrations like
    the task table. A worker upserts its row with every heartbeat and deletes it on a clean
    stop. A running task is handed to another worker only when its lease has expired *and*
    its worker's row is stale: a live worker keeps its tasks even while a row lock held by
    someone else stops it from renewing one task's lease.
    """
    name = f"{tasks.name}_workers"
    existing = _declared(tasks, name)
    if existing is not None:
        return existing
    return Table(
        name,
        tasks.metadata,
        Column("id", String(200), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("queues", ARRAY(String(100)), nullable=False, server_default="{}"),
        Column("task_names", ARRAY(String(200)), nullable=False, server_default="{}"),
        Column("concurrency", Integer, nullable=False),
        Column("version", String(50), nullable=False),
        #: How long the worker's row stays fresh without a heartbeat: its lease.
        Column("lease_seconds", Float, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False, server_default=_NOW),
        Column("last_seen_at", DateTime(timezone=True), nullable=False, server_default=_NOW),
        #: Counters (claimed, completed, retried, failed, ...), refreshed with the heartbeat.
        Column("stats", JSONB, nullable=False, server_default="{}"),
        schema=tasks.schema,
        info={"tasklib": "workers"},
    )


def queues_table(tasks: Table) -> Table:
    """The queue settings beside a task table: ``<tasks>_queues``, one row per steered queue.

    A queue without a row runs as usual. Every claim reads this small table, so a pause
    takes effect with each worker's next claim, cluster-wide.
    """
    name = f"{tasks.name}_queues"
    existing = _declared(tasks, name)
    if existing is not None:
        return existing
    return Table(
        name,
        tasks.metadata,
        Column("queue", String(100), primary_key=True),
        #: No worker claims from a paused queue; running tasks finish.
        Column("paused", Boolean, nullable=False, server_default=text("false")),
        Column("changed_at", DateTime(timezone=True), nullable=False, server_default=_NOW),
        schema=tasks.schema,
        info={"tasklib": "queues"},
    )


def limits_table(tasks: Table) -> Table:
    """The cluster-wide limits beside a task table: ``<tasks>_limits``, one row per limit.

    A row limits a queue (``kind = 'queue'``) or a task name (``kind = 'name'``): at most
    ``concurrency`` running at once, at most ``rate`` starts in any ``per_seconds`` window.
    The claim keeps the book in the row itself, under its row lock: ``holders`` are the
    ``[id, attempt, claimed epoch]`` of the tasks it let start, ``starts`` the
    ``[epoch, count]`` of its recent claims (see ``steered.py``).
    """
    name = f"{tasks.name}_limits"
    existing = _declared(tasks, name)
    if existing is not None:
        return existing
    t = tasks.name
    return Table(
        name,
        tasks.metadata,
        Column("kind", String(10), primary_key=True),
        Column("key", String(200), primary_key=True),
        Column("concurrency", Integer, nullable=True),
        Column("rate", Integer, nullable=True),
        Column("per_seconds", Float, nullable=True),
        Column("holders", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        Column("starts", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        Column("changed_at", DateTime(timezone=True), nullable=False, server_default=_NOW),
        CheckConstraint("kind IN ('queue', 'name')", name=conv(f"ck_{t}_limits_kind")),
        CheckConstraint(
            "concurrency IS NULL OR concurrency > 0", name=conv(f"ck_{t}_limits_concurrency")
        ),
        CheckConstraint(
            "(rate IS NULL AND per_seconds IS NULL) OR (rate > 0 AND per_seconds > 0)",
            name=conv(f"ck_{t}_limits_rate"),
        ),
        schema=tasks.schema,
        info={"tasklib": "limits"},
    )


def limits_table_of(model: type[TaskMixin]) -> Table:
    """The limits table of a task model."""
    return limits_table(model.__table__)  # type: ignore[attr-defined]


def queues_table_of(model: type[TaskMixin]) -> Table:
    """The queue settings table of a task model."""
    return queues_table(model.__table__)  # type: ignore[attr-defined]


def workers_table_of(model: type[TaskMixin]) -> Table:
    """The worker registry table of a task model."""
    return workers_table(model.__table__)  # type: ignore[attr-defined]


@event.listens_for(TaskMixin, "init", propagate=True)
def _assign_defaults(target: TaskMixin, args: Any, kwargs: dict[str, Any]) -> None:
    # Python-side defaults at construction, not at flush: callers get the id of a task they
    # just added, and a row built in memory reads like one loaded from the database.
    kwargs.setdefault("id", uuid.uuid4())
    kwargs.setdefault("state", TaskState.PENDING)
    kwargs.setdefault("queue", DEFAULT_QUEUE)
    kwargs.setdefault("priority", 0)
    kwargs.setdefault("attempts", 0)
    kwargs.setdefault("max_retries", DEFAULT_MAX_RETRIES)
    kwargs.setdefault("args", {})
    kwargs.setdefault("errors", [])


#: The MetaData of the library's own :class:`Task` model; pass it to Alembic as target_metadata.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Base(DeclarativeBase):
    """The declarative base of the library's own model."""

    metadata = metadata


class Task(TaskMixin, Base):
    """The ready task model, table ``tasks``."""

    __tablename__ = "tasks"

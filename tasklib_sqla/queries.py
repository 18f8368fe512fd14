"""The worker's SQL, built once per task model with SQLAlchemy constructs.

Every statement that changes a claimed task's state names its owner (``worker_id``) and the
attempt it claimed (``attempts``), and expects ``state = 'running'``: a worker whose lease was
lost, or whose task was cancelled or rescued, changes nothing, and learns so from RETURNING.

Batches travel as one JSON parameter expanded with ``jsonb_to_recordset``: one round trip and
one cached statement for any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    Interval,
    String,
    Text,
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.types import Uuid

from .models import TaskMixin, workers_table_of
from .retry import exponent_cap
from .steered import any_due, pending_levels, steered_claim

# States are rendered inline, never as parameters: asyncpg prepares statements, and a generic
# plan for "state = $1" could not use the partial indexes, whose predicate names the literal.
PENDING: ColumnClause[Any] = literal_column("'pending'")
RUNNING: ColumnClause[Any] = literal_column("'running'")
COMPLETED: ColumnClause[Any] = literal_column("'completed'")
FAILED: ColumnClause[Any] = literal_column("'failed'")
CANCELLED: ColumnClause[Any] = literal_column("'cancelled'")
ZERO: ColumnClause[Any] = literal_column("0")


def seconds(expr: Any) -> Any:
    return func.make_interval(ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, expr)


def records(*cols: Any) -> Any:
    """``jsonb_to_recordset(:batch::jsonb) AS v(col type, ...)``."""
    batch = cast(bindparam("batch", type_=Text), JSONB)
    return (
        func.jsonb_to_recordset(batch).table_valued(*cols).render_derived(name="v", with_types=True)
    )


@dataclass(frozen=True)
class WorkerQueries:
    """The statements a worker runs against one task table."""

    claim: Any
    #: The claim that honours paused queues and limits (``steered.py``), used while any queue
    #: is paused or anything is limited.
    claim_steered: Any
    #: The claim level by level, while higher priorities hold pending tasks scheduled for
    #: later (see _levelled_claim).
    claim_levelled: Any
    #: The plain and the levelled claim, each recording a batch of outcomes in the same
    #: statement (see claim_and_finish).
    claim_finishing: Any
    claim_levelled_finishing: Any
    #: Every (queue, name, priority) with pending rows, and whether it has one due (see
    #: TaskWorker._check_levels).
    levels: Any
    finish: Any
    finish_grouped: Any
    finish_chained: Any
    heartbeat: Any
    release: Any
    rescue: Any
    any_due: Any
    deregister: Any
    depth: Any

    @classmethod
    def for_model(
        cls, model: type[TaskMixin], *, by_queue: bool = False, where: Any = None
    ) -> WorkerQueries:
        """The statements for ``model``; ``by_queue`` for a worker of chosen queues.

        ``where``: a condition on the model's columns that every row the worker claims must
        meet (a per-tenant worker pool: ``Model.tenant_id == 7``).
        """
        claim = _claim_by_queue(model, where) if by_queue else _claim(model, where)
        levelled = _levelled_claim(model, by_queue=by_queue, where=where)
        return cls(
            claim=claim,
            claim_steered=steered_claim(model, by_queue=by_queue, where=where),
            claim_levelled=levelled,
            claim_finishing=claim_and_finish(model, claim),
            claim_levelled_finishing=claim_and_finish(model, levelled),
            levels=pending_levels(model),
            finish=_finish(model),
            finish_grouped=_finish_grouped(model),
            finish_chained=_finish_chained(model),
            heartbeat=_heartbeat(model),
            release=_release(model),
            rescue=_rescue(model),
            any_due=any_due(model, by_queue=by_queue, where=where),
            deregister=_deregister(model),
            depth=_depth(model),
        )


def claim_params(names: Sequence[str], queues: Sequence[str]) -> dict[str, Any]:
    """The parameters that choose which rows a worker may claim (and its probe looks for)."""
    return {"names": list(names), "queues": list(queues)}


def _due_filter(model: type[TaskMixin], where: Any = None) -> list[Any]:
    # A worker never claims a name it has not registered.
    due = [
        model.state == PENDING,
        model.scheduled_at <= func.now(),
        model.name == any_(bindparam("names", type_=ARRAY(String))),
    ]
    return due if where is None else [*due, where]


def _claim(model: type[TaskMixin], where: Any = None) -> Any:
    # A worker of every queue. SELECT ... FOR UPDATE SKIP LOCKED picks due rows no other worker
    # holds, in the order of the partial index ix_<table>_claim (priority DESC, scheduled_at);
    # the UPDATE takes them in the same statement: one round trip per batch, no window between
    # choosing and owning.
    limit = bindparam("limit", type_=Integer)
    return _take(model, _due(model, limit, where=where))


def _claim_by_queue(model: type[TaskMixin], where: Any = None) -> Any:
    limit = bindparam("limit", type_=Integer)
    return _take(model, _due_by_queue(model, limit, where=where))


def _due(model: type[TaskMixin], limit: Any, *, where: Any = None) -> Any:
    return (
        select(model.id)
        .where(*_due_filter(model, where))
        .order_by(model.priority.desc(), model.scheduled_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _due_by_queue(model: type[TaskMixin], limit: Any, *, where: Any = None) -> Any:
    # A worker of chosen queues reads each queue from ix_<table>_claim_queue (queue, priority
    # DESC, scheduled_at): its claim never walks another queue's backlog. The planner cannot
    # keep an index's order across `queue = ANY(...)`, so each queue is read on its own (a
    # LATERAL subquery, in index order, locking up to `limit` rows) and the candidates are
    # merged in priority order. Rows locked but not taken (at most `limit` per extra queue)
    # are free again when the statement ends: claims run in autocommit.
    queues = (
        func.unnest(bindparam("queues", type_=ARRAY(String)))
        .table_valued("queue_name")
        .render_derived(name="q")
    )
    per_queue = (
        select(model.id, model.priority, model.scheduled_at)
        .where(*_due_filter(model, where), model.queue == queues.c.queue_name)
        # NULLS LAST changes nothing (priority is NOT NULL) but the sort order's name: only
        # ix_<table>_claim_queue yields it. Otherwise the planner may read ix_<table>_claim in
        # order and filter it by queue, when it guesses (the queue's value being unknown at
        # plan time) that most rows match: the very scan of other queues this index avoids.
        .order_by(model.priority.desc().nulls_last(), model.scheduled_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    picked = per_queue.lateral("picked")
    return (
        select(picked.c.id)
        .select_from(queues)
        .join(picked, literal(True))
        .order_by(picked.c.priority.desc(), picked.c.scheduled_at)
        .limit(limit)
    )


def _levelled_claim(model: type[TaskMixin], *, by_queue: bool, where: Any = None) -> Any:
    """The claim, priority level by priority level: for a table whose higher priorities hold
    pending tasks scheduled for later.

    The plain claim reads in (priority, scheduled_at) order and skips rows not yet due, so
    every later task of a priority above the due ones is read on every claim (200,000 of them:
    8-14 ms a claim instead of 1.3-1.9). This one first lists the priorities with pending rows
    (a recursive CTE skipping through the claim index, one probe each; per queue for a worker
    of chosen queues), then reads each priority from its earliest task up to now, a bounded
    index range, and merges the candidates in claim order. The worker switches to it while
    its look at the pending levels finds that case (TaskWorker._check_levels).
    """
    limit = bindparam("limit", type_=Integer)
    table: Any = model.__table__  # type: ignore[attr-defined]
    # The order names which index serves each step: priority DESC (NULLS FIRST) only
    # ix_<table>_claim yields, DESC NULLS LAST after the queue only ix_<table>_claim_queue.
    first, after = table.alias("first_priority"), table.alias("next_priority")
    if by_queue:
        queues = (
            func.unnest(bindparam("queues", type_=ARRAY(String)))
            .table_valued("queue_name")
            .render_derived(name="q")
        )
        top = (
            select(first.c.priority)
            .where(first.c.state == PENDING, first.c.queue == queues.c.queue_name)
            .order_by(first.c.priority.desc().nulls_last())
            .limit(literal_column("1"))
            .lateral("top")
        )
        levels = (
            select(queues.c.queue_name.label("queue"), top.c.priority)
            .select_from(queues)
            .join(top, literal(True))
            .cte("levels", recursive=True)
        )
        below = (
            select(after.c.priority)
            .where(
                after.c.state == PENDING,
                after.c.queue == levels.c.queue,
                after.c.priority < levels.c.priority,
            )
            .order_by(after.c.priority.desc().nulls_last())
            .limit(literal_column("1"))
            .lateral("below")
        )
        levels = levels.union_all(
            select(levels.c.queue, below.c.priority).join_from(levels, below, literal(True))
        )
        same_level = [model.queue == levels.c.queue, model.priority == levels.c.priority]
    else:
        levels = (
            select(first.c.priority)
            .where(first.c.state == PENDING)
            .order_by(first.c.priority.desc())
            .limit(literal_column("1"))
            .cte("levels", recursive=True)
        )
        below = (
            select(after.c.priority)
            .where(after.c.state == PENDING, after.c.priority < levels.c.priority)
            .order_by(after.c.priority.desc())
            .limit(literal_column("1"))
            .lateral("below")
        )
        levels = levels.union_all(select(below.c.priority).join_from(levels, below, literal(True)))
        same_level = [model.priority == levels.c.priority]
    per_level = (
        select(model.id, model.priority, model.scheduled_at)
        .where(*_due_filter(model, where), *same_level)
        .order_by(model.scheduled_at, model.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .lateral("picked")
    )
    due = (
        select(per_level.c.id)
        .select_from(levels)
        .join(per_level, literal(True))
        .order_by(per_level.c.priority.desc(), per_level.c.scheduled_at)
        .limit(limit)
    )
    return _take(model, due)


def _take(model: type[TaskMixin], due: Any) -> Any:
    # `id = ANY(ARRAY(subquery))`, not `id IN (subquery)`: the ids are gathered once (an
    # InitPlan) and fetched through the primary key. With IN, the planner may join the
    # subquery to a sequential scan of the whole table instead (seen at 20,000 rows).
    return (
        update(model)
        .where(model.id == any_(func.array(due.scalar_subquery())))
        .values(
            state=RUNNING,
            worker_id=bindparam("owner", type_=String),
            attempts=model.attempts + 1,
            started_at=func.now(),
            locked_until=func.now() + bindparam("lease", type_=Interval),
        )
        .returning(
            model.id,
            model.name,
            cast(model.args, Text).label("args"),
            model.attempts,
            model.max_retries,
            model.timeout_seconds,
            (func.jsonb_typeof(model.chain) == literal_column("'array'")).label("chained"),
            model.queue,
            model.scheduled_at,
            model.parent_id,
            model.trace_context,
            model.group_id,
            model.group_spec,
        )
        .execution_options(synchronize_session=False)
    )


#: Ids per notification: 150 ids of 37 characters stay well inside pg_notify's 8,000 bytes.
_IDS_PER_NOTE = 150


def _announced(done: Any) -> Any:
    """A condition that is always true and, evaluated once, announces ``done``'s finished rows.

    ``pg_notify(:done_channel, 'id,id,...')`` for the rows of ``done`` (a CTE with ``id`` and
    ``state``) that completed or failed, in chunks that fit a notification: waiters on task
    results wake on it (``results.py``). PostgreSQL delivers it when the statement's
    transaction commits, so a waiter never reads a row before its outcome is visible.
    """
    finished = (
        select(done.c.id, (func.row_number().over() / _IDS_PER_NOTE).label("chunk"))
        .where(done.c.state.in_([COMPLETED, FAILED]))
        .subquery("finished")
    )
    notes = (
        select(
            func.pg_notify(
                bindparam("done_channel", type_=String),
                func.string_agg(cast(finished.c.id, Text), literal(",")),
            ).label("sent")
        )
        .group_by(finished.c.chunk)
        .subquery("notes")
    )
    return select(func.count()).select_from(notes).scalar_subquery() >= 0


def _finish(model: type[TaskMixin]) -> Any:
    done = _finish_update(model).returning(model.id, model.state).cte("done")
    return select(done.c.id).where(_announced(done))


def claim_and_finish(model: type[TaskMixin], claim: Any) -> Any:
    """``claim`` (an UPDATE ... RETURNING) and the finish statement for a batch of outcomes, in
    one statement: the claimed rows, then one row whose last column lists the ids recorded.

    A worker whose tasks end as its slots free would otherwise send two statements per
    cycle, the outcomes' and the next claim's. The two UPDATEs touch disjoint rows (the
    claim pending ones, the finish this worker's running ones) and see the same snapshot;
    the finish keeps its fencing. For batches without group members or chained completions
    (those have statements of their own).
    """
    done = _finish_update(model).returning(model.id, model.state).cte("done")
    taken = claim.cte("taken")
    claimed = select(*taken.c, null().label("written"))
    written = select(*(null() for _ in taken.c), func.array_agg(done.c.id)).where(_announced(done))
    return claimed.union_all(written)


def _finish_grouped(model: type[TaskMixin]) -> Any:
    # The finish statement for batches holding members of groups: each member that finished
    # counts down its follow-up in the same statement, so the follow-up falls due exactly once,
    # when its last member finishes, even when members finish at once on several workers (the
    # follow-up's row lock orders the count-downs).
    done = _finish_update(model).returning(model.id, model.state, model.group_id).cte("done")
    return select(done.c.id).where(_announced(done)).add_cte(count_down(model, done))


def count_down(model: type[TaskMixin], done: Any) -> Any:
    """An UPDATE (a CTE) counting down the follow-ups of ``done``'s finished members.

    ``done``: a CTE with ``id``, ``state`` and ``group_id`` of rows a statement just changed
    (the finish statement, the rescuer, a cancel); completed, failed and cancelled members
    count, members sent back to pending do not.
    """
    finished = (
        select(done.c.group_id, func.count().label("n"))
        .where(done.c.group_id.is_not(None), done.c.state.in_([COMPLETED, FAILED, CANCELLED]))
        .group_by(done.c.group_id)
        .subquery("finished_members")
    )
    left = model.group_remaining - finished.c.n
    return (
        update(model)
        .where(model.id == finished.c.group_id, model.state == PENDING)
        .values(
            group_remaining=left,
            # Due once the last member is done: now, not the far future it waited in.
            scheduled_at=case((left <= ZERO, func.now()), else_=model.scheduled_at),
        )
        .returning(model.id)
        .cte("counted_down")
    )


def _finish_update(model: type[TaskMixin]) -> Any:
    # One statement for a batch of outcomes: completed, retried or failed.
    v = records(
        column("id", Uuid),
        column("attempt", Integer),
        column("state", String),
        column("result", JSONB),
        column("error", Text),
        column("err", JSONB),
        column("delay", Float),
        column("refund", Integer),
    )
    retrying = v.c.state == PENDING
    return (
        update(model)
        .where(
            model.id == v.c.id,
            model.attempts == v.c.attempt,
            model.worker_id == bindparam("owner", type_=String),
            model.state == RUNNING,
        )
        .values(
            state=v.c.state,
            result=v.c.result,
            error=func.coalesce(v.c.error, model.error),
            errors=case(
                (v.c.err.is_(None), model.errors),
                else_=model.errors.op("||")(func.jsonb_build_array(v.c.err)),
            ),
            completed_at=case((retrying, null()), else_=func.now()),
            scheduled_at=case(
                (retrying, func.now() + seconds(v.c.delay)),
                else_=model.scheduled_at,
            ),
            # A retried task is nobody's until claimed again; a finished one keeps who ran it.
            worker_id=case((retrying, null()), else_=model.worker_id),
            locked_until=null(),
            # A snoozed attempt does not count (1 for Snooze, else 0).
            attempts=model.attempts - v.c.refund,
        )
        .execution_options(synchronize_session=False)
    )


def _finish_chained(model: type[TaskMixin]) -> Any:
    # The finish statement for batches holding chained tasks: the completion and the insert
    # of each completed task's successor are one statement, so a chain never breaks between
    # them. Kept apart from _finish so that the common case pays nothing for it.
    done = (
        _finish_update(model)
        .returning(model.id, model.state, model.result, model.chain)
        .cte("done")
    )
    step = done.c.chain.op("->")(ZERO)
    given = func.coalesce(step.op("->")(literal("args")), cast(literal("{}"), JSONB))
    passed = case(
        (step.op("->>")(literal("arg")).is_(None), cast(literal("{}"), JSONB)),
        else_=func.jsonb_build_object(step.op("->>")(literal("arg")), done.c.result),
    )
    successors = select(
        func.gen_random_uuid(),
        step.op("->>")(literal("name")),
        step.op("->>")(literal("queue")),
        cast(step.op("->>")(literal("priority")), Integer),
        given.op("||")(passed),
        cast(step.op("->>")(literal("max_retries")), Integer),
        cast(step.op("->>")(literal("timeout_seconds")), Float),
        func.nullif(done.c.chain.op("-")(ZERO), cast(literal("[]"), JSONB)),
        done.c.id,  # the successor's parent: the step that completed
    ).where(
        done.c.state == COMPLETED,
        func.jsonb_typeof(done.c.chain) == literal_column("'array'"),
    )
    columns = [
        "id",
        "name",
        "queue",
        "priority",
        "args",
        "max_retries",
        "timeout_seconds",
        "chain",
        "parent_id",
    ]
    spawned = insert(model).from_select(columns, successors, include_defaults=False).cte("spawned")
    return select(done.c.id).where(_announced(done)).add_cte(spawned)


def _owned(model: type[TaskMixin]) -> tuple[Any, list[Any]]:
    v = records(column("id", Uuid), column("attempt", Integer))
    return v, [
        model.id == v.c.id,
        model.attempts == v.c.attempt,
        model.worker_id == bindparam("owner", type_=String),
        model.state == RUNNING,
    ]


def _heartbeat(model: type[TaskMixin]) -> Any:
    # One round trip keeps a worker alive: it upserts the worker's registry row, renews the
    # leases of the tasks it holds, and returns those it no longer owns (cancelled, rescued).
    # Rows locked by someone else (an app's SELECT ... FOR UPDATE) are skipped rather than
    # waited for, so one locked row cannot hold up every other lease; the registry row is what
    # keeps such a task from being rescued meanwhile (see _rescue).
    w = workers_table_of(model)
    registry = (
        pg_insert(w)
        .values(
            id=bindparam("owner", type_=String),
            host=bindparam("host", type_=String),
            pid=bindparam("pid", type_=Integer),
            queues=bindparam("queues", type_=ARRAY(String)),
            task_names=bindparam("names", type_=ARRAY(String)),
            concurrency=bindparam("concurrency", type_=Integer),
            version=bindparam("version", type_=String),
            lease_seconds=bindparam("lease_seconds", type_=Float),
            stats=cast(bindparam("stats", type_=Text), JSONB),
        )
        .on_conflict_do_update(
            index_elements=[w.c.id],
            set_={"last_seen_at": func.now(), "stats": cast(bindparam("stats"), JSONB)},
        )
        .returning(w.c.id)
        .cte("seen")
    )
    v, owned = _owned(model)
    lockable = (
        select(model.id)
        .where(*owned)
        .with_for_update(skip_locked=True, of=model)
        .correlate(None)  # its own FROM tasks, not the UPDATE's
        .scalar_subquery()
    )
    renewed = (
        update(model)
        .where(model.id.in_(lockable))
        .values(locked_until=func.now() + bindparam("lease", type_=Interval))
        .returning(model.id)
        .cte("renewed")
    )
    ours = select(model.id).where(*owned).correlate_except(model)
    lost = select(v.c.id, literal_column("'lost'").label("kind")).where(~exists(ours))
    # Rows running under this worker's name that it does not hold: a claim committed but its
    # answer never arrived (the connection broke). The worker is alive, so nobody would ever
    # rescue them: give them back as if never claimed. The worker sends no claim while its
    # heartbeat runs, so no claim can be in flight here.
    held_ids = select(v.c.id).scalar_subquery()
    strays = (
        select(model.id)
        .where(
            model.worker_id == bindparam("owner", type_=String),
            model.state == RUNNING,
            model.id.not_in(held_ids),
        )
        .with_for_update(skip_locked=True, of=model)
        .correlate(None)
        .scalar_subquery()
    )
    given_back = (
        update(model)
        .where(model.id.in_(strays))
        .values(**_unclaimed(model))
        .returning(model.id)
        .cte("given_back")
    )
    returned = select(given_back.c.id, literal_column("'stray'").label("kind"))
    return union_all(lost, returned).add_cte(registry).add_cte(renewed).add_cte(given_back)


def _deregister(model: type[TaskMixin]) -> Any:
    w = workers_table_of(model)
    return delete(w).where(w.c.id == bindparam("owner", type_=String))


def _release(model: type[TaskMixin]) -> Any:
    # A graceful shutdown hands unfinished tasks back as if they had never been claimed:
    # pending, due now, and without the attempt the shutdown interrupted.
    _, owned = _owned(model)
    return (
        update(model)
        .where(*owned)
        .values(**_unclaimed(model))
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )


def _unclaimed(model: type[TaskMixin]) -> dict[str, Any]:
    """A running task as if it had never been claimed: pending, due now, its attempt returned."""
    return {
        "state": PENDING,
        "attempts": model.attempts - 1,
        "worker_id": null(),
        "locked_until": null(),
        "started_at": null(),
        "scheduled_at": func.now(),
    }


def _rescue(model: type[TaskMixin]) -> Any:
    # Running tasks whose lease expired belong to a worker that died or lost the database.
    # Back to pending with backoff, or failed for good once its attempts are spent, so that a
    # task which kills every worker that runs it does not loop forever.
    # A worker whose registry row is fresh is alive: its tasks stay its own even when a
    # lease could not be renewed (a row lock held by an app), so a live worker never has a
    # task run again behind its back.
    w = workers_table_of(model)
    alive = exists().where(
        w.c.id == model.worker_id,
        w.c.last_seen_at + seconds(w.c.lease_seconds) > func.now(),
    )
    expired = (
        select(model.id)
        .where(model.state == RUNNING, model.locked_until < func.now(), ~alive)
        .limit(1000)
        .with_for_update(skip_locked=True, of=model)
    )
    exhausted = model.attempts > model.max_retries
    message = func.concat(
        literal("worker "), model.worker_id, literal(" stopped renewing its lease (lost or killed)")
    )
    # The exponent is capped (by the caller, see retry.exponent_cap) so that no attempt count,
    # however large, overflows the power or the interval.
    exponent = func.least(model.attempts - 1, bindparam("max_exponent", type_=Integer))
    backoff = func.least(
        bindparam("base", type_=Float) * func.power(bindparam("multiplier", type_=Float), exponent),
        bindparam("max_delay", type_=Float),
    )
    rescued = (
        update(model)
        .where(model.id.in_(expired.scalar_subquery()))
        .values(
            state=case((exhausted, FAILED), else_=PENDING),
            error=message,
            errors=model.errors.op("||")(
                func.jsonb_build_array(
                    func.jsonb_build_object(
                        "attempt",
                        model.attempts,
                        "type",
                        "WorkerLost",
                        "message",
                        message,
                        "traceback",
                        None,
                        "worker_id",
                        model.worker_id,
                        "at",
                        func.now(),
                    )
                )
            ),
            completed_at=case((exhausted, func.now()), else_=null()),
            scheduled_at=case(
                (exhausted, model.scheduled_at),
                else_=func.now() + seconds(backoff),
            ),
            worker_id=case((exhausted, model.worker_id), else_=null()),
            locked_until=null(),
        )
        .returning(model.id, model.name, model.state, model.group_id)
        .execution_options(synchronize_session=False)
        .cte("rescued")
    )
    # Tasks failed for good here are announced to result waiters like any other failure, and
    # count down their group's follow-up like any other finished member.
    return (
        select(rescued.c.id, rescued.c.name, rescued.c.state)
        .where(_announced(rescued))
        .add_cte(count_down(model, rescued))
    )


def rescue_params(
    base_seconds: float,
    multiplier: float,
    max_seconds: float,
    done_channel: str = "tasklib_tasks_done",
) -> dict[str, float | int | str]:
    """The parameters of the rescue statement for these retry settings."""
    return {
        "done_channel": done_channel,
        "base": base_seconds,
        "multiplier": multiplier,
        "max_delay": max_seconds,
        "max_exponent": exponent_cap(base_seconds, multiplier, max_seconds),
    }


def _depth(model: type[TaskMixin]) -> Any:
    # Due pending tasks per queue, for the queue-depth gauge: read from the pending-only
    # index ix_<table>_claim_queue, which leads with the queue.
    return (
        select(model.queue, func.count())
        .where(model.state == PENDING, model.scheduled_at <= func.now())
        .group_by(model.queue)
    )

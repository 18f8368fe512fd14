"""The steered claim: the claim a worker runs while any queue is paused or anything is limited.

Limits hold across every worker because the claim statement itself keeps their book. A limit
is a row of ``<table>_limits`` (a queue or a task name; see ``models.limits_table``): the
statement locks the rows of the limits that concern what it could take (``FOR UPDATE``, in key
order, so concurrent claimers queue up instead of deadlocking), works out how many more tasks
each allows, claims no more than that, and writes the tasks it took into the rows, all in one
statement. Because the claimers of one limit are serialized by its row lock and read it as the
last claimer left it (a locked row is read in its newest version), no two of them can both take
the last free place.

- **Concurrency.** ``holders`` lists ``[id, attempt, epoch]`` for the tasks the limit let
  start. No other statement maintains it: each claim drops the holders whose task row shows
  that attempt has ended (finished, given back, rescued, or a newer attempt). A row it cannot
  see yet (inserted and claimed after the statement's snapshot) is counted as running, so the
  check errs on the safe side; a row that is gone (deleted) stops counting after a minute.
- **Rate.** ``starts`` lists ``[epoch, count]`` per claim; a claim may start as many as the
  limit leaves in the window ``(now - per_seconds, now]``. Checked by every claim against every
  earlier one, this bounds the starts in *any* window of that length, not only in fixed buckets.
  Entries stay for twice the period, so a claim that waited for the lock still sees the starts
  recorded meanwhile.

The claim finds its candidates level by level, a level being one (queue, name, priority) with
pending rows: it skips through ``ix_<table>_claim_stream`` to list the levels (one index read
per level, which also yields the level's earliest task), drops those of paused queues, of names
this worker does not run, of limits with no room and those with nothing due yet, and reads each
remaining level's due tasks, earliest first. A backlog that cannot be claimed (a paused queue, a
name at its limit, a name nobody runs, tasks scheduled for later at any priority) costs one
read per level, not a walk through it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, aggregate_order_by
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.types import Uuid

from .models import TaskMixin, limits_table_of, queues_table_of

#: How long a holder whose task row is gone (deleted) keeps counting: far longer than any claim
#: statement takes, so a row inserted and claimed after a claim's snapshot is never miscounted.
GONE_GRACE_SECONDS = 60
_NO_LIMIT: ColumnClause[Any] = literal_column("2147483647")
_ONE: ColumnClause[Any] = literal_column("1")
_GRACE: ColumnClause[Any] = literal_column(str(GONE_GRACE_SECONDS))
_QUEUE: ColumnClause[Any] = literal_column("'queue'")
_NAME: ColumnClause[Any] = literal_column("'name'")
_EMPTY: ColumnClause[Any] = literal_column("'[]'::jsonb")


def _item(value: Any, index: int, type_: Any) -> Any:
    """``(value ->> index)::type``: one element of a JSON array, as SQL."""
    return cast(value.op("->>")(literal_column(str(index))), type_)


def _epoch_now() -> Any:
    return cast(func.extract("epoch", func.now()), Float)


def pending_levels(model: type[TaskMixin]) -> Any:
    """The (queue, name, priority) levels with pending rows, and whether each has one due:
    one index read per level (see :func:`_levels`).

    The worker reads them now and then to learn whether the table holds pending tasks the
    plain claim would walk through: of names it does not run, or scheduled for later at a
    higher priority than tasks that are due.
    """
    levels = _levels(model)
    due = (levels.c.scheduled_at <= func.now()).label("due")
    return select(levels.c.queue, levels.c.name, levels.c.priority, due)


def open_levels(model: type[TaskMixin], *, by_queue: bool) -> Any:
    """The (queue, name, priority) levels this worker may claim from that have a task due, as
    a CTE.

    Every pending level (:func:`_levels`, one index read each), filtered: names the worker
    runs (``names``), queues that are not paused, for a worker of chosen queues those
    (``queues``), and a first task that is due. A level whose tasks all wait for later is
    dropped here, so the claim never reads through it, whatever its priority.
    """
    paused = queues_table_of(model)
    levels = _levels(model)
    wanted = [
        levels.c.name == any_(bindparam("names", type_=ARRAY(String))),
        levels.c.scheduled_at <= func.now(),
        ~exists().where(paused.c.queue == levels.c.queue, paused.c.paused),
    ]
    if by_queue:
        wanted.append(levels.c.queue == any_(bindparam("queues", type_=ARRAY(String))))
    return (
        select(levels.c.queue, levels.c.name, levels.c.priority)
        .where(*wanted)
        .cte("open_levels")
        .prefix_with("MATERIALIZED")
    )


def _due_in(model: type[TaskMixin], level: Any, where: Any) -> list[Any]:
    """The due rows of one (queue, name, priority) ``level``: its priority fixed, so
    ``scheduled_at <= now()`` bounds their range in ``ix_<table>_claim_stream``."""
    from .queries import PENDING  # queries uses this module

    due = [
        model.state == PENDING,
        model.scheduled_at <= func.now(),
        model.queue == level.c.queue,
        model.name == level.c.name,
        model.priority == level.c.priority,
    ]
    return due if where is None else [*due, where]


def _levels(model: type[TaskMixin]) -> Any:
    """Every (queue, name, priority) with pending rows and the earliest ``scheduled_at`` among
    them, as a recursive CTE that skips through ``ix_<table>_claim_stream``: each step reads
    one index entry, the first of the next lower priority of the same stream or else the first
    of the next stream. Within a level the index orders rows by time, so its first entry tells
    whether anything in it is due."""
    from .queries import PENDING  # queries uses this module

    table: Any = model.__table__  # type: ignore[attr-defined]

    def level(alias: str, conditions: Any) -> Any:
        t = table.alias(alias)
        return (
            select(t.c.queue, t.c.name, t.c.priority, t.c.scheduled_at)
            .where(t.c.state == PENDING, *conditions(t))
            .order_by(t.c.queue, t.c.name, t.c.priority.desc().nulls_last(), t.c.scheduled_at)
            .limit(_ONE)
        )

    levels = level("first_level", lambda t: ()).cte("levels", recursive=True)
    lower = level(
        "lower_level",
        lambda t: (
            t.c.queue == levels.c.queue,
            t.c.name == levels.c.name,
            t.c.priority < levels.c.priority,
        ),
    )
    later = level(
        "next_level",
        lambda t: (tuple_(t.c.queue, t.c.name) > tuple_(levels.c.queue, levels.c.name),),
    )
    step = union_all(lower, later).limit(_ONE).lateral("step")
    return levels.union_all(
        select(step.c.queue, step.c.name, step.c.priority, step.c.scheduled_at).join_from(
            levels, step, true()
        )
    )


def any_due(model: type[TaskMixin], *, by_queue: bool, where: Any = None) -> Any:
    """The idle probe: whether a task is due that this worker may claim (NULL if none).

    Asked level by level, a level being a (queue, name, priority) with pending rows in a
    stream this worker may claim from (its names, its queues, not paused): the first index
    entry of each level is its earliest task, so the answer costs one index read per level
    however many rows wait for later. The claim's own order (priority first) would read every
    pending row of a higher priority scheduled for later before concluding that nothing is
    due: 7-29 ms for 200,000 such rows. Limits are not consulted: a task held back by one is
    due all the same (a burst worker waits for it). ``where`` (a per-tenant pool's condition)
    is checked on the due rows of the levels that have any.
    """
    open_ = open_levels(model, by_queue=by_queue)
    if where is None:
        return select(_ONE).select_from(open_).limit(_ONE)
    one = (
        select(model.id)
        .where(*_due_in(model, open_, where))
        .order_by(model.scheduled_at, model.id)
        .limit(_ONE)
        .lateral("one_due")
    )
    # The first due id or NULL, not EXISTS: PostgreSQL drops ORDER BY and LIMIT inside an
    # EXISTS and may then scan the whole table.
    return select(one.c.id).join_from(open_, one, true()).limit(_ONE)


def steered_claim(model: type[TaskMixin], *, by_queue: bool, where: Any = None) -> Any:
    """The claim statement that honours paused queues and limits.

    Parameters as the plain claim: ``names``, ``limit``, ``owner``, ``lease`` (and ``queues`` for
    a worker of chosen queues); returns the same columns.
    """
    from .queries import RUNNING, _take  # queries uses this module

    table: Any = model.__table__  # type: ignore[attr-defined]
    limits = limits_table_of(model)
    open_ = open_levels(model, by_queue=by_queue)

    # The limits that concern those levels, locked in key order.
    lim = (
        select(limits)
        .where(
            or_(
                and_(limits.c.kind == _QUEUE, limits.c.key.in_(select(open_.c.queue))),
                and_(limits.c.kind == _NAME, limits.c.key.in_(select(open_.c.name))),
            )
        )
        .order_by(limits.c.kind, limits.c.key)
        .with_for_update()
        .cte("locked_limits")
        .prefix_with("MATERIALIZED")
    )

    # Their book, with what has ended dropped.
    held = (
        func.jsonb_array_elements(lim.c.holders)
        .table_valued(column("value", JSONB), with_ordinality="n")
        .render_derived(name="h")
    )
    task = table.alias("holder")
    attempt = _item(held.c.value, 1, Integer)
    alive = case(
        (
            task.c.id.is_(None),
            _item(held.c.value, 2, Float) > _epoch_now() - literal_column(str(GONE_GRACE_SECONDS)),
        ),
        else_=or_(
            task.c.attempts < attempt, and_(task.c.attempts == attempt, task.c.state == RUNNING)
        ),
    )
    holders = (
        select(func.coalesce(func.jsonb_agg(aggregate_order_by(held.c.value, held.c.n)), _EMPTY))
        .select_from(held.outerjoin(task, task.c.id == _item(held.c.value, 0, Uuid)))
        .where(alive)
        .scalar_subquery()
    )
    start = (
        func.jsonb_array_elements(lim.c.starts)
        .table_valued(column("value", JSONB), with_ordinality="n")
        .render_derived(name="s")
    )
    starts = (
        select(func.coalesce(func.jsonb_agg(aggregate_order_by(start.c.value, start.c.n)), _EMPTY))
        .where(
            _item(start.c.value, 0, Float) > _epoch_now() - literal_column("2") * lim.c.per_seconds
        )
        .scalar_subquery()
    )
    kept = (
        select(
            lim.c.kind,
            lim.c.key,
            lim.c.concurrency,
            lim.c.rate,
            lim.c.per_seconds,
            case((lim.c.concurrency.is_(None), _EMPTY), else_=holders).label("holders"),
            case((lim.c.rate.is_(None), _EMPTY), else_=starts).label("starts"),
        )
        .cte("kept")
        .prefix_with("MATERIALIZED")
    )
    recent = (
        func.jsonb_array_elements(kept.c.starts)
        .table_valued(column("value", JSONB))
        .render_derived(name="r")
    )
    started = (
        select(func.coalesce(func.sum(_item(recent.c.value, 1, Integer)), literal_column("0")))
        .where(_item(recent.c.value, 0, Float) > _epoch_now() - kept.c.per_seconds)
        .scalar_subquery()
    )
    room = (
        select(
            kept.c.kind,
            kept.c.key,
            kept.c.holders,
            kept.c.starts,
            func.greatest(
                literal_column("0"),
                func.least(
                    func.coalesce(
                        kept.c.concurrency - func.jsonb_array_length(kept.c.holders), _NO_LIMIT
                    ),
                    func.coalesce(kept.c.rate - started, _NO_LIMIT),
                ),
            ).label("room"),
        )
        .cte("room")
        .prefix_with("MATERIALIZED")
    )

    # Each open level read in claim order, no further than its limits allow.
    by_q, by_n = room.alias("queue_room"), room.alias("name_room")
    sized = (
        select(
            open_.c.queue,
            open_.c.name,
            open_.c.priority,
            by_q.c.room.label("room_q"),
            by_n.c.room.label("room_n"),
        )
        .select_from(
            open_.outerjoin(
                by_q, and_(by_q.c.kind == _QUEUE, by_q.c.key == open_.c.queue)
            ).outerjoin(by_n, and_(by_n.c.kind == _NAME, by_n.c.key == open_.c.name))
        )
        .subquery("sized")
    )
    limit = bindparam("limit", type_=Integer)
    # One level's due tasks, earliest first (see _due_in).
    per_level = (
        select(model.id, model.queue, model.name, model.priority, model.scheduled_at)
        .where(*_due_in(model, sized, where))
        .order_by(model.scheduled_at, model.id)
        .limit(func.least(limit, sized.c.room_q, sized.c.room_n))
        .with_for_update(skip_locked=True)
        .lateral("per_level")
    )
    candidates = (
        select(per_level, sized.c.room_q, sized.c.room_n)
        .join_from(sized, per_level, true())
        .cte("candidates")
    )
    # Levels read up to their name's room and their queue's room may together offer more than
    # one of them allows (levels of one stream, or streams sharing a limit): rank per name, then
    # per queue, and keep what fits both (a task refused by its name also spends its queue's
    # rank: safe side).
    order = (candidates.c.priority.desc(), candidates.c.scheduled_at, candidates.c.id)
    ranked_by_name = select(
        candidates,
        func.row_number().over(partition_by=candidates.c.name, order_by=order).label("nn"),
    ).subquery("ranked_by_name")
    fits_name = or_(
        ranked_by_name.c.room_n.is_(None), ranked_by_name.c.nn <= ranked_by_name.c.room_n
    )
    r = ranked_by_name.c
    ranked = (
        select(
            r.id,
            r.priority,
            r.scheduled_at,
            r.room_q,
            func.row_number()
            .over(partition_by=r.queue, order_by=(r.priority.desc(), r.scheduled_at, r.id))
            .label("nq"),
        )
        .where(fits_name)
        .subquery("ranked")
    )
    picked = (
        select(ranked.c.id)
        .where(or_(ranked.c.room_q.is_(None), ranked.c.nq <= ranked.c.room_q))
        .order_by(ranked.c.priority.desc(), ranked.c.scheduled_at)
        .limit(limit)
    )
    taken = _take(model, picked).cte("taken")

    # The book: holders and starts as kept, plus what this claim took.
    mine = case((limits.c.kind == _QUEUE, taken.c.queue), else_=taken.c.name) == limits.c.key
    new_holders = (
        select(func.jsonb_agg(func.jsonb_build_array(taken.c.id, taken.c.attempts, _epoch_now())))
        .where(mine)
        .scalar_subquery()
    )
    new_starts = (
        select(func.jsonb_build_array(func.jsonb_build_array(_epoch_now(), func.count())))
        .where(mine)
        .having(func.count() > literal_column("0"))
        .scalar_subquery()
    )
    booked = (
        update(limits)
        .where(limits.c.kind == room.c.kind, limits.c.key == room.c.key)
        .values(
            holders=case(
                (limits.c.concurrency.is_(None), _EMPTY),
                else_=room.c.holders.op("||")(func.coalesce(new_holders, _EMPTY)),
            ),
            starts=case(
                (limits.c.rate.is_(None), _EMPTY),
                else_=room.c.starts.op("||")(func.coalesce(new_starts, _EMPTY)),
            ),
        )
        .cte("booked")
    )
    return select(taken).add_cte(booked)

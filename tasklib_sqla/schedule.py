"""Periodic tasks: cron schedules that the ordinary workers run, each tick inserted once.

``@task(schedule="0 3 * * *")`` (or a :class:`Schedule` for a time zone, arguments and the
missed-tick policy) makes every worker that registers the task, and serves its queue, insert
its ticks as they fall due. No scheduler process: each tick is an ordinary task row whose
unique key is the task's name and the tick's time, held in every state, so whichever worker
gets there first inserts it and the others' inserts do nothing (``ix_<table>_unique``).

Cron expressions are croniter's: five fields (minute, hour, day of month, month, day of week),
or six with **seconds as the sixth** (``"* * * * * */10"``: every ten seconds), evaluated in
the schedule's time zone (daylight-saving changes included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .exceptions import TaskDefinitionError

#: Every state: a tick's key stays taken for as long as its row exists.
TICK_STATES = ("pending", "running", "completed", "failed", "cancelled")

Missed = Literal["skip", "run_once"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a periodic task runs.

    ``missed``: what a worker starting after a time without workers does about the ticks
    that fell in it: ``"skip"`` them (the default), or ``"run_once"`` (one run for the latest
    missed tick, however many were missed). ``args``: the task's arguments for every run.
    """

    cron: str
    tz: str = "UTC"
    missed: Missed = "skip"
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.cron, str) or not croniter.is_valid(self.cron):
            raise TaskDefinitionError(f"schedule: {self.cron!r} is not a cron expression")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise TaskDefinitionError(f"schedule: unknown time zone {self.tz!r}") from exc
        if self.missed not in ("skip", "run_once"):
            raise TaskDefinitionError("schedule: missed must be 'skip' or 'run_once'")

    def ticks(self, after: datetime, until: datetime, limit: int = 10_000) -> list[datetime]:
        """The ticks in (``after``, ``until``], in UTC, oldest first (at most ``limit``)."""
        out: list[datetime] = []
        for tick in self._iterate(after):
            if tick > until or len(out) >= limit:
                break
            out.append(tick)
        return out

    def next_tick(self, after: datetime) -> datetime:
        """The first tick after ``after``, in UTC."""
        return next(self._iterate(after))

    def _iterate(self, after: datetime) -> Iterator[datetime]:
        # croniter walks the zone's wall clock, naive; zoneinfo gives each wall time its UTC
        # offset. (croniter's own handling of aware times put a tick an hour off around a
        # daylight-saving change in every release before 7.) A wall time that does not exist
        # (spring forward) runs an hour later by the clock; one that occurs twice (fall back)
        # runs once, the first time.
        zone = ZoneInfo(self.tz)
        it = croniter(self.cron, after.astimezone(zone).replace(tzinfo=None))
        while True:
            wall: datetime = it.get_next(datetime)
            tick = wall.replace(tzinfo=zone).astimezone(UTC)
            if tick > after:
                yield tick


def schedule_of(value: str | Schedule | None) -> Schedule | None:
    """``@task(schedule=...)``: a cron string is a schedule in UTC that skips missed ticks."""
    if value is None or isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return Schedule(value)
    raise TaskDefinitionError(f"schedule must be a cron string or a Schedule, not {value!r}")


def starting_point(schedule: Schedule, last_inserted: datetime | None, now: datetime) -> datetime:
    """Where a starting worker begins inserting ticks: after this instant.

    ``skip`` forgets the ticks before ``now``; ``run_once`` goes back to the last tick any
    worker inserted (so that the missed ones come due, to be collapsed to one by
    :func:`due_ticks`). A schedule never run before starts now.
    """
    if schedule.missed == "skip" or last_inserted is None:
        return now
    return min(last_inserted, now)


def due_ticks(
    schedule: Schedule, after: datetime, now: datetime, *, catching_up: bool
) -> list[datetime]:
    """The ticks to insert now; when ``catching_up`` (a worker's first look), missed ticks
    count once: only the latest of them is inserted."""
    ticks = schedule.ticks(after, now)
    if catching_up and len(ticks) > 1:
        return ticks[-1:]
    return ticks


def tick_key(tick: datetime) -> str:
    """The unique key of a tick (after the task's name): fixed-width UTC, so keys sort as
    their ticks do."""
    return "@" + tick.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tick_of_key(key: str) -> datetime | None:
    """The tick a stored unique key names (``<name>:@<time>``), or None."""
    _, sep, stamp = key.rpartition(":@")
    if not sep:
        return None
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None

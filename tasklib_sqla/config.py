"""Configuration: the ``Config`` settings object and the optional process-wide ``init()``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .exceptions import ConfigError

ENV_PREFIX = "TASKLIB_"


@dataclass(frozen=True, slots=True)
class Config:
    """Settings shared by submitters and workers.

    Every field can also come from the environment (see :meth:`from_env`): the field name in
    upper case with the ``TASKLIB_`` prefix, e.g. ``TASKLIB_LOCK_TIMEOUT_SECONDS=120``.
    ``database_url`` also falls back to ``DATABASE_URL``.
    """

    #: SQLAlchemy URL of the database. ``postgresql://`` is turned into ``postgresql+asyncpg://``
    #: for the async engine the library creates itself.
    database_url: str = ""
    #: Delay before the first retry; retry *n* waits ``base * multiplier ** (n - 1)`` seconds.
    base_retry_delay_seconds: float = 5.0
    retry_backoff_multiplier: float = 2.0
    #: The longest any retry waits, however many attempts failed before.
    max_retry_delay_seconds: float = 3600.0
    #: Each retry delay is spread by this fraction (0.1: ±10%), so that tasks which failed
    #: together do not all come back at the same instant. 0 turns it off.
    retry_jitter: float = 0.1
    #: Retries after the first attempt for tasks that do not set ``max_retries`` themselves.
    default_max_retries: int = 3
    #: How long a claimed task stays locked without a heartbeat before another worker may run it.
    lock_timeout_seconds: float = 600.0
    #: How often a worker renews the leases of its running tasks; default: lock timeout / 3.
    heartbeat_interval_seconds: float | None = None
    #: How often an idle worker looks for due tasks when no notification arrives.
    poll_interval_seconds: float = 1.0
    #: How long a stopping worker waits for running tasks before giving them back.
    shutdown_grace_seconds: float = 30.0
    #: The most tasks one claim statement takes.
    claim_batch_size: int = 100
    #: The channel of the ``pg_notify`` sent when tasks are submitted.
    notify_channel: str = "tasklib_tasks"
    #: A worker's statements are cancelled after this long (``statement_timeout``), and give
    #: up waiting for a row lock after ``db_lock_timeout_seconds`` (``lock_timeout``): a slow
    #: or blocked statement is retried instead of holding up the worker's other work.
    db_statement_timeout_seconds: float = 30.0
    db_lock_timeout_seconds: float = 5.0
    #: How long a starting worker waits for a database it cannot reach (connection refused,
    #: server starting up) before it exits with an error. Errors that waiting cannot fix
    #: (unknown database, role or table, wrong password) stop it at once.
    startup_timeout_seconds: float = 15.0
    #: How long a running worker keeps trying through such errors (a table dropped, a
    #: privilege revoked) before it stops with an error.
    fatal_error_seconds: float = 60.0
    #: Retention: workers delete finished tasks older than these ages (per state), one worker
    #: at a time, in small batches, every ``prune_interval_seconds``. ``None`` keeps a state
    #: for ever; ``prune_interval_seconds=0`` switches pruning off.
    retain_completed_seconds: float | None = 7 * 86400.0
    retain_failed_seconds: float | None = 30 * 86400.0
    retain_cancelled_seconds: float | None = 7 * 86400.0
    prune_interval_seconds: float = 3600.0
    #: While a worker runs, the interpreter collects its youngest generation of objects after
    #: this many allocations instead of Python's 700: a claim brings a whole batch of tasks at
    #: once, and collections set off by every batch cost a worker process 10-20% of its CPU
    #: at concurrency 100-200 (see ``tasklib_sqla.collector``). ``None`` leaves it alone.
    gc_threshold: int | None = 10_000

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid Config: " + "; ".join(problems))

    @property
    def retention(self) -> dict[str, float]:
        """Seconds to keep finished tasks, by state; states kept for ever are absent."""
        ages = {
            "completed": self.retain_completed_seconds,
            "failed": self.retain_failed_seconds,
            "cancelled": self.retain_cancelled_seconds,
        }
        return {state: age for state, age in ages.items() if age is not None}

    @property
    def results_channel(self) -> str:
        """The channel on which workers announce finished tasks (ids, comma-separated)."""
        return f"{self.notify_channel}_done"

    @property
    def heartbeat_seconds(self) -> float:
        """The heartbeat interval actually used."""
        if self.heartbeat_interval_seconds is not None:
            return self.heartbeat_interval_seconds
        return self.lock_timeout_seconds / 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``TASKLIB_*`` environment variables; keyword arguments win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None and f.name == "database_url":
                raw = env.get("DATABASE_URL")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    try:
        if kind.startswith("float"):
            if "None" in kind and raw.strip().lower() in ("", "none", "forever"):
                return None
            return float(raw)
        if kind.startswith("int"):
            if "None" in kind and raw.strip().lower() in ("", "none"):
                return None
            return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a number") from exc
    return raw


#: Fields that must not be negative, and fields that must be positive.
_NOT_NEGATIVE = (
    "base_retry_delay_seconds",
    "poll_interval_seconds",
    "shutdown_grace_seconds",
    "startup_timeout_seconds",
    "fatal_error_seconds",
    "default_max_retries",
    "prune_interval_seconds",
)
_POSITIVE = (
    "max_retry_delay_seconds",
    "db_statement_timeout_seconds",
    "db_lock_timeout_seconds",
    "lock_timeout_seconds",
    "claim_batch_size",
)


def _problems(c: Config) -> list[str]:
    out = [f"{name} must be >= 0" for name in _NOT_NEGATIVE if getattr(c, name) < 0]
    out += [f"{name} must be > 0" for name in _POSITIVE if getattr(c, name) <= 0]
    if c.retry_backoff_multiplier < 1:
        out.append("retry_backoff_multiplier must be >= 1")
    if not 0 <= c.retry_jitter <= 1:
        out.append("retry_jitter must be between 0 and 1")
    if c.heartbeat_interval_seconds is not None and not (
        0 < c.heartbeat_interval_seconds < c.lock_timeout_seconds
    ):
        out.append("heartbeat_interval_seconds must be > 0 and below lock_timeout_seconds")
    for name in ("retain_completed_seconds", "retain_failed_seconds", "retain_cancelled_seconds"):
        value = getattr(c, name)
        if value is not None and value < 0:
            out.append(f"{name} must be >= 0, or None to keep those tasks")
    if c.gc_threshold is not None and c.gc_threshold < 1:
        out.append("gc_threshold must be >= 1, or None to leave the interpreter's alone")
    if not c.notify_channel.isidentifier():
        out.append("notify_channel must be a plain identifier")
    return out

"""``TaskWorker``: claims due tasks, runs them, records outcomes, keeps leases alive.

The worker is a handful of named loops on one event loop:

- the **claim loop** takes batches of due tasks (one ``UPDATE ... FOR UPDATE SKIP LOCKED``
  round trip per batch) whenever slots are free, woken by NOTIFY, by a finished task, by a
  retry falling due, or by the poll interval;
- the **finisher** writes outcomes, many per statement: outcomes that arrive while one write is
  in flight go out together in the next;
- the **heartbeat** refreshes the worker's registry row, renews the leases of held tasks and
  notices the ones it lost; the **watchdog** stops the tasks whose leases it can no longer
  vouch for when the heartbeat stalls;
- the **rescuer** hands the tasks of dead workers back to pending (or to failed, once their
  attempts are spent);
- the **listener** holds a LISTEN connection.

Every write names the owner and the attempt it claimed, so a worker that lost a task changes
nothing (see ``queries.py``). Every loop shares one error policy (see ``errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Text, and_, any_, cast, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import client as _client
from . import collector, direct, telemetry
from .admin import paused_queues
from .children import ChildPool, process_context
from .config import Config
from .errors import DB_ERRORS, ErrorKind, ErrorPolicy, classify, error_backoff, one_line
from .exceptions import ConfigError, WorkerError
from .finisher import Finisher, Outcome, WorkerStats, outcome_for, pairs_json
from .groups import follow_up_args
from .held import HeldConnection
from .listener import Listener
from .logs import task_fields
from .models import Task, TaskMixin, TaskState, limits_table_of
from .queries import WorkerQueries, claim_params, rescue_params
from .registry import TaskDefinition, TaskRegistry, default_registry
from .retention import prune
from .retry import DEFAULT_POLICY, RetryPolicy
from .runner import ClaimedTask, Failure, execute
from .schedule import TICK_STATES, due_ticks, starting_point, tick_key, tick_of_key
from .submit import task_values, write_tasks
from .threads import TaskThreads
from .transaction import Recorded, run_transactional, task_engine
from .urls import async_url, asyncpg_dsn

logger = logging.getLogger("tasklib_sqla.worker")

VERSION = "0.1.0"


if sys.version_info >= (3, 12):

    def _start_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # Eagerly: the task runs at once, up to its first wait, with itself as the current
        # task (asyncio.timeout, contextvars and current_task() inside see their own task, as
        # when scheduled). A task that never waits, as many quick async tasks do, ends right
        # here without a handle or a turn of the loop: 103,600 -> 91,000 instructions per
        # no-op task at concurrency 100 (python -m bench.instructions, Python 3.13).
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), name=name, eager_start=True)

else:

    def _start_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=name)


def _waited(job: ClaimedTask) -> float | None:
    """Seconds from when the task was due to now (its start), for the queue-wait histogram."""
    if job.scheduled_at is None:
        return None
    return (datetime.now(UTC) - job.scheduled_at).total_seconds()


@dataclass(frozen=True)
class Steering:
    """What the claim must honour beyond due rows: paused queues and limits, as last read."""

    paused: tuple[str, ...] = ()
    #: ``(kind, key)`` of every limit: ``("queue", "payments")``, ``("name", "send_email")``.
    limits: tuple[tuple[str, str], ...] = ()
    #: The shortest interval between two starts that a rate limit allows (``per / rate``): how
    #: soon a claim held back by a rate may find room again.
    pace: float | None = None

    def __bool__(self) -> bool:
        return bool(self.paused or self.limits)

    def describe(self) -> str:
        parts = [f"paused {', '.join(self.paused)}"] if self.paused else []
        parts += [f"limited {kind} {key}" for kind, key in self.limits]
        return "; ".join(parts) or "none"


async def _read_steering(conn: AsyncConnection, model: type[TaskMixin]) -> Steering:
    lim = limits_table_of(model)
    paused = await paused_queues(conn, model)
    rows = (
        await conn.execute(
            select(lim.c.kind, lim.c.key, lim.c.per_seconds / lim.c.rate).order_by(
                lim.c.kind, lim.c.key
            )
        )
    ).all()
    paces = [pace for _, _, pace in rows if pace is not None]
    return Steering(
        tuple(paused), tuple((kind, key) for kind, key, _ in rows), min(paces, default=None)
    )


Level = tuple[str, str, int, bool]  # queue, name, priority, whether it has a task due


def _in_queues(levels: Sequence[Level], queues: Sequence[str]) -> list[Level]:
    """The levels in a worker's queues (every level for a worker of every queue)."""
    wanted = set(queues)
    return [level for level in levels if not wanted or level[0] in wanted]


def foreign_names(
    levels: Sequence[Level], names: Sequence[str], queues: Sequence[str]
) -> list[str]:
    """Names with pending tasks in this worker's queues that it does not run."""
    mine = set(names)
    return sorted({name for _, name, _, _ in _in_queues(levels, queues) if name not in mine})


def later_above_due(levels: Sequence[Level], names: Sequence[str], queues: Sequence[str]) -> bool:
    """Whether, among the levels this worker claims from, one with nothing due sits at a
    higher priority than one with tasks due, in the same queue for a worker of chosen queues
    (it reads each queue on its own), anywhere for a worker of every queue: the plain claim
    would read through the former's tasks on every claim."""
    mine, by_queue = set(names), bool(queues)
    idle_top: dict[str | None, int] = {}
    due: list[tuple[str | None, int]] = []
    for queue, name, priority, has_due in _in_queues(levels, queues):
        if name not in mine:
            continue
        scope = queue if by_queue else None
        if has_due:
            due.append((scope, priority))
        else:
            idle_top[scope] = max(priority, idle_top.get(scope, priority))
    return any(scope in idle_top and priority < idle_top[scope] for scope, priority in due)


def rows_where(
    model: type[TaskMixin], where: Mapping[str, Any] | ColumnElement[bool] | None
) -> ColumnElement[bool] | None:
    """A worker's ``where`` as SQL; a mapping's keys must be columns of ``model``'s table."""
    if where is None or isinstance(where, ColumnElement):
        return where
    if not isinstance(where, Mapping) or not where:
        raise ConfigError("where must be a mapping of column names to values, or an expression")
    table: Any = model.__table__  # type: ignore[attr-defined]
    unknown = sorted(set(where) - set(table.c.keys()))
    if unknown:
        raise ConfigError(
            f"where: {unknown} are not columns of {table.name!r} (its columns: "
            f"{', '.join(table.c.keys())})"
        )
    return and_(*(table.c[name] == value for name, value in where.items()))


def default_worker_id() -> str:
    """host:pid:random — unique per worker run, readable in ``SELECT worker_id ...``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_engine(database_url: str, config: Config) -> AsyncEngine:
    """The worker's own small pool, in autocommit, with its statement and lock timeouts.

    Its own, also when the caller passed an engine: tasks that hold the app's connections must
    never starve the heartbeat or the outcome writes.
    """
    ms = int(config.db_statement_timeout_seconds * 1000)
    lock_ms = int(config.db_lock_timeout_seconds * 1000)
    return create_async_engine(
        database_url,
        isolation_level="AUTOCOMMIT",
        pool_size=5,
        max_overflow=5,
        connect_args={
            "timeout": 10,
            "command_timeout": config.db_statement_timeout_seconds + 5,
            "server_settings": {
                "statement_timeout": str(ms),
                "lock_timeout": str(lock_ms),
                "idle_in_transaction_session_timeout": str(ms),
                "application_name": "tasklib-worker",
                # The worker sends the same few prepared statements all day, built so that one
                # plan fits every call (states inline, parameters only where values vary).
                # Left to choose, PostgreSQL plans the large steered claim anew on every call
                # (about 1 ms each): 1.2 ms instead of 2.0 ms for a claim of 5 here.
                "plan_cache_mode": "force_generic_plan",
                # A generic plan's cost is estimated without the parameters' values, and the
                # levelled claim's estimate (a recursive CTE feeding a lateral read) passes
                # the JIT thresholds: PostgreSQL then compiled it on every call, 240 ms for a
                # claim that runs in 1.4 ms. No statement of a worker gains from JIT.
                "jit": "off",
            },
        },
    )


class TaskWorker:
    """Runs registered tasks from the queue, ``concurrency`` at a time.

    ``await worker.run()`` works until stopped (SIGTERM/SIGINT or :meth:`stop`); with
    ``burst=True`` it returns once no task it can run is due. Only tasks whose names are in
    ``registry`` are claimed; tasks of other names stay pending and visible.

    ``engine``: an engine of the app's, whose URL the worker connects to (through a small pool
    of its own, so that tasks holding the app's connections never starve it).

    ``where`` restricts the worker to rows that meet a condition on the model's columns, your
    own ones included: ``{"tenant_id": 7}`` (equalities) or a SQLAlchemy expression
    (``AppTask.tenant_id.in_([7, 8])``). Serve it with an index: ``claim_index``. ``run()`` raises
    :class:`WorkerError` when the database refuses the worker for good.
    """

    def __init__(
        self,
        config: Config,
        *,
        concurrency: int = 10,
        queues: Sequence[str] | None = None,
        registry: TaskRegistry = default_registry,
        model: type[TaskMixin] = Task,
        engine: AsyncEngine | None = None,
        burst: bool = False,
        worker_id: str | None = None,
        handle_signals: bool = True,
        batch_size: int | None = None,
        where: Mapping[str, Any] | ColumnElement[bool] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.config = config
        self.concurrency = concurrency
        self.queues = tuple(queues or ())
        self.registry = registry
        self.model = model
        self.burst = burst
        self.worker_id = worker_id or default_worker_id()
        self.handle_signals = handle_signals
        self.batch_size = batch_size or config.claim_batch_size
        self.stats = WorkerStats()
        self._callers_engine = engine
        self._engine: AsyncEngine | None = None
        self._tx_engine: AsyncEngine | None = None
        #: Paused queues and limits, as last read: while there are any, the worker claims with
        #: the steered claim (steered.py), which honours them.
        self._steering = Steering()
        #: Names of pending tasks this worker does not run, as last read (see _check_levels).
        self._foreign: list[str] = []
        #: Whether tasks scheduled for later sit above due ones (claim level by level).
        self._shadowed = False
        self._levels_checked = -math.inf
        self._steering_refresh: asyncio.Task[None] | None = None
        #: The condition every claimed row meets (a per-tenant pool), as SQL.
        self.where = rows_where(model, where)
        self._queries = WorkerQueries.for_model(model, by_queue=bool(self.queues), where=self.where)
        self._running: dict[uuid.UUID, tuple[ClaimedTask, asyncio.Task[None]]] = {}
        self._unwritten: dict[uuid.UUID, ClaimedTask] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # Claims and heartbeats never overlap: the heartbeat gives back rows running under
        # this worker's name that it does not hold, which is only sound with no claim in flight.
        self._claim_lock = asyncio.Lock()
        #: The claim loop's connection, kept between claims (see held.py).
        self._claim_conn = HeldConnection(lambda: self.engine)
        self._forced = asyncio.Event()
        # Burst mode serves scripts and tests: an error retrying cannot fix ends it at once.
        fatal_seconds = 0.0 if burst else config.fatal_error_seconds
        self._policy = ErrorPolicy(fatal_seconds, self._give_up, self._stopping)
        self._finisher = Finisher(
            lambda: self.engine,
            self._queries,
            self.worker_id,
            self._unwritten,
            self.stats,
            self._policy,
            self._wake_after,
            config.results_channel,
            on_written=self._outcomes_written,
        )
        self._executor: TaskThreads | None = None
        self._children = ChildPool(None)
        self._child_setup: tuple[Config, type[TaskMixin]] | None = None
        self._installed_client: _client.TaskClient[Any] | None = None
        self._lease = timedelta(seconds=config.lock_timeout_seconds)
        self._traced = self._measured = False
        self._log_starts = True
        #: When (monotonic) the last heartbeat that succeeded was sent.
        self._last_heartbeat = time.monotonic()

    # -- public -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new claims, running tasks get the grace period.

        A second call stops waiting for running tasks: they are given back at once.
        """
        if self._stopping.is_set():
            if not self._forced.is_set():
                logger.warning("second stop request: not waiting for running tasks")
            self._forced.set()
        self._stopping.set()
        self._wake.set()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = worker_engine(self._database_url(), self.config)
        return self._engine

    def _database_url(self) -> str:
        # An engine passed without a Config URL is enough: the worker connects to its server.
        if not self.config.database_url and self._callers_engine is not None:
            return self._callers_engine.url.render_as_string(hide_password=False)
        return async_url(self.config.database_url)

    async def run(self) -> WorkerStats:
        """Work until stopped (or, in burst mode, until nothing is due); return the stats.

        Raises :class:`WorkerError` when the database refuses the worker for good.
        """
        names = sorted(self.registry.names)
        if not names:
            raise ValueError("the registry holds no tasks: import the module that defines them")
        #: A finished task wakes the claim loop when at most this many still run: then it
        #: would claim (a quarter of the slots free, see _claim_loop).
        self._claim_at = self.concurrency - self._min_claim
        logger.info(
            "worker %s starting: %d tasks registered, queues %s, concurrency %d",
            self.worker_id,
            len(names),
            list(self.queues) or "all",
            self.concurrency,
        )
        # Signals are handled from the first statement on: a stop that arrives while the
        # worker is still starting (its first heartbeat, the child-process warm-up) ends it
        # cleanly instead of killing it mid-start.
        with self._signals():
            try:
                await self._preflight(names)
            except BaseException:
                await self._dispose()
                raise
            if self._stopping.is_set():  # stopped while starting: nothing claimed yet
                await self._deregister()
                await self._dispose()
                logger.info("worker %s stopped while starting", self.worker_id)
                return self.stats
            side = await self._start_side_tasks(names)
            try:
                with collector.young_threshold(self.config.gc_threshold):
                    await self._claim_loop(names)
            finally:
                await self._shutdown(side)
        if self._policy.fatal is not None:
            raise self._policy.fatal
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)
        return self.stats

    # -- starting -----------------------------------------------------------------------------

    async def _start_side_tasks(self, names: list[str]) -> list[asyncio.Task[Any]]:
        """Everything a working worker runs beside its claim loop, ready to go."""
        self._install_client()
        # Decided once: with OpenTelemetry absent or unconfigured, tasks pay nothing for it.
        self._traced = telemetry.tracing()
        self._measured = self._finisher.measured = telemetry.measuring()
        self._executor = TaskThreads(self.concurrency, "tasklib")
        in_children = sorted(
            {d.fn.__module__ for d in self.registry if not d.is_async and d.timeout_seconds}
        )
        self._children = ChildPool(process_context(in_children), self._child_setup)
        if in_children:
            await self._children.warm()
        side = [
            asyncio.create_task(self._finisher.run(), name="tasklib-finisher"),
            asyncio.create_task(self._heartbeat(names), name="tasklib-heartbeat"),
            asyncio.create_task(self._watchdog(), name="tasklib-watchdog"),
            asyncio.create_task(self._rescuer(), name="tasklib-rescuer"),
        ]
        if not self.burst and self.config.prune_interval_seconds > 0:
            side.append(asyncio.create_task(self._pruner(), name="tasklib-pruner"))
        periodic = self._periodic()
        if periodic and not self.burst:
            side.append(asyncio.create_task(self._scheduler(periodic), name="tasklib-scheduler"))
        if not self.burst:
            listener = Listener(
                asyncpg_dsn(self._database_url()),
                self.config.notify_channel,
                self.queues,
                self._on_listening,
                on_settings=self._steering_changed,
            )
            side.append(asyncio.create_task(listener.run(), name="tasklib-listener"))
        return side

    async def _preflight(self, names: list[str]) -> None:
        """Check the database before working: reachable, the tables there, ours to write.

        Runs the real claim statement for zero rows and the first heartbeat (which registers
        the worker), so a wrong URL, role, password, database or table fails here, in one
        line, instead of in every loop forever.
        """
        started = time.monotonic()
        errors = 0
        where = make_url(self._database_url()).render_as_string(hide_password=True)
        while True:
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(
                        self._queries.claim, {**self._claim_params(names), "limit": 0}
                    )
                    await conn.execute(self._queries.heartbeat, self._heartbeat_params(names, []))
                    self._steering = await _read_steering(conn, self.model)
                self._last_heartbeat = started
                return
            except DB_ERRORS as exc:
                kind = classify(exc)
                waited = time.monotonic() - started
                if kind is not ErrorKind.TRANSIENT:
                    raise WorkerError(f"cannot start on {where}: {one_line(exc)}") from exc
                if waited >= self.config.startup_timeout_seconds or self._stopping.is_set():
                    raise WorkerError(
                        f"cannot reach the database at {where} after {waited:.0f} s: "
                        f"{one_line(exc)}"
                    ) from exc
                errors += 1
                if errors == 1:
                    logger.warning("waiting for the database at %s: %s", where, one_line(exc))
                await asyncio.sleep(error_backoff(errors + 1))

    def _install_client(self) -> None:
        # Tasks submit tasks with submit_task(): give this process, and the child processes of
        # timed sync tasks, a client when the app did not install one.
        try:
            client = _client.get_client()
        except Exception:
            client = _client.init(
                self.config.replace(database_url=self._database_url()),
                model=self.model,
                registry=self.registry,
            )
            self._installed_client = client
        self._child_setup = (client.config, client.model)

    async def _uninstall_client(self) -> None:
        installed, self._installed_client = self._installed_client, None
        if installed is not None:
            _client.uninstall(installed)
            await installed.dispose()

    # -- claiming -----------------------------------------------------------------------------

    def _claim_params(self, names: list[str]) -> dict[str, Any]:
        return {**claim_params(names, self.queues), "owner": self.worker_id, "lease": self._lease}

    async def _claim_loop(self, names: list[str]) -> None:
        params = self._claim_params(names)
        # Set when a poll (not a wake-up) follows a claim that found nothing: ask the idle
        # probe first. The claim reads in priority order and would read every pending row of
        # a higher priority scheduled for later before finding that nothing is due; the probe
        # asks per priority level, one bounded index probe each.
        idle_poll = False
        while not self._stopping.is_set():
            self._wake.clear()
            found_nothing = False
            free = self.concurrency - len(self._running)
            # Claim in batches: wait for a quarter of the slots unless nothing runs, so that
            # short tasks finishing one by one do not turn into one claim per task.
            if free > 0 and (free >= self._min_claim or not self._running):
                want = min(free, self.batch_size)
                if idle_poll and not await self._anything_due(params):
                    jobs = []
                else:
                    try:
                        jobs = await self._claim(params, want)
                    except DB_ERRORS as exc:
                        await self._policy.failed("claim", exc)
                        continue
                    self._policy.succeeded("claim")
                    self._start_claimed(jobs)
                if len(jobs) == want:
                    idle_poll = False
                    continue  # more may be due: claim again at once
                found_nothing = not jobs
                if self.burst and not jobs and not self._running:
                    drained = await self._burst_drained(params)
                    if drained is None:
                        return
                    if not drained:
                        continue
            # Wait for a NOTIFY, a freed slot, a retry falling due or a stop; poll as a
            # fallback (tasks scheduled by others, missed notifications, room freed in a limit
            # by another worker). Burst mode has no listener and waits for slots only, unless
            # limits may hold back what is due.
            polls = not self.burst or bool(self._steering.limits)
            timeout = self.config.poll_interval_seconds if polls else None
            if timeout is not None and self._steering.pace is not None:
                timeout = min(timeout, max(self._steering.pace, 0.05))
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    woken = await self._wake.wait()
            # Limits hold tasks back that are due: their claim is steered, and cheap, anyway.
            idle_poll = not woken and found_nothing and not self._steering.limits

    def _start_claimed(self, jobs: list[ClaimedTask]) -> None:
        # One claim's tasks share their lease: checked once for the batch.
        if jobs and self._lease_at_risk(jobs[0]):
            self._give_back_late_claims(jobs)
            return
        # Whether to log each start, asked once a claim rather than once a task.
        self._log_starts = logger.isEnabledFor(logging.INFO)
        for job in jobs:
            self._start(job)

    async def _burst_drained(self, params: dict[str, Any]) -> bool | None:
        """Burst mode claimed nothing and runs nothing: None to stop (nothing due), False to
        claim again at once, True to wait a poll (what is due may be held back by a limit
        whose room other workers' tasks hold)."""
        await self._flush_unless_stopped()
        if self._stopping.is_set() or not await self._anything_due(params):
            return None
        return bool(self._steering.limits)

    async def _flush_unless_stopped(self) -> None:
        flush = asyncio.ensure_future(self._finisher.flush())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([flush, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            flush.cancel()
            stop.cancel()

    @property
    def _min_claim(self) -> int:
        return max(1, min(self.concurrency, self.batch_size) // 4)

    @property
    def _steered(self) -> bool:
        """Whether to claim with the steered claim (level by level, limits kept): queues
        paused, limits set, or pending tasks of names this worker does not run, whose backlog
        the plain claim would walk through."""
        return bool(self._steering) or bool(self._foreign)

    async def _check_levels(self, conn: AsyncConnection, names: Sequence[str]) -> None:
        """Read the pending (queue, name, priority) levels, at most once a poll interval (one
        index read per level), and note what the plain claim would have to walk past: names
        this worker does not run, or tasks scheduled for later above due ones."""
        now = time.monotonic()
        if now < self._levels_checked + max(self.config.poll_interval_seconds, 1.0):
            return
        self._levels_checked = now
        levels = [tuple(r) for r in await conn.execute(self._queries.levels)]
        foreign = foreign_names(levels, names, self.queues)
        if bool(foreign) != bool(self._foreign):
            if foreign:
                logger.info(
                    "pending tasks of names this worker does not run (%s): claiming level by "
                    "level with the steered claim, which passes over them",
                    ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else ""),
                )
            else:
                logger.info("no pending tasks of names this worker does not run any more")
        self._foreign = foreign
        shadowed = later_above_due(levels, names, self.queues)
        if shadowed != self._shadowed:
            logger.info(
                "tasks scheduled for later at a higher priority than due ones: claiming level "
                "by level, which passes over them"
                if shadowed
                else "no tasks scheduled for later above due ones any more"
            )
        self._shadowed = shadowed

    def _claim_statement(self, finishing: bool) -> Any:
        q = self._queries
        if self._steered:
            return q.claim_steered
        if self._shadowed:
            return q.claim_levelled_finishing if finishing else q.claim_levelled
        return q.claim_finishing if finishing else q.claim

    async def _claim(self, params: dict[str, Any], limit: int) -> list[ClaimedTask]:
        async with self._claim_lock, self._claim_conn.connect() as conn:
            await self._check_levels(conn, params["names"])
            # Outcomes waiting for the writer go in the claim's own statement (not with the
            # steered claim, a statement of its own kind): one round trip for both.
            carried = [] if self._steered else self._finisher.take_for_claim()
            statement = self._claim_statement(bool(carried))
            values = {**params, "limit": limit}
            if carried:  # the finish statement's parameters, as the writer's own
                values.update(self._finisher.statement(carried)[1])
            sent = time.monotonic()
            try:
                rows: Sequence[Any] = await direct.fetch(conn, statement, values)
            except BaseException as exc:
                if not carried:
                    raise
                self._finisher.carried_back(carried)
                if not isinstance(exc, DB_ERRORS) or conn.invalidated:
                    raise  # cancelled, or the connection is lost: the claim's error policy
                # The outcomes may be at fault (one the database refuses, a row lock on a
                # finished task's row): the writer takes them over, one by one if need be,
                # and the claim goes again at once without them.
                carried = []
                try:
                    rows = await direct.fetch(conn, self._claim_statement(False), values)
                except DB_ERRORS:
                    raise exc from None  # the first error says what went wrong
        if carried:
            # One row, its claim columns empty, lists the ids the finish recorded; the others
            # are the claimed tasks, with that column empty.
            written: Sequence[uuid.UUID] = ()
            claimed = []
            for row in rows:
                if row[0] is None:
                    written = row[-1] or ()
                else:
                    claimed.append(row[:-1])
            self._finisher.carried_written(carried, set(written))
            rows = claimed
        self.stats.claimed += len(rows)
        # Unpacked by position: a Row's attribute lookup by name, fourteen per task, was the
        # largest single item of the worker's CPU per task (profiled with py-spy).
        return [
            ClaimedTask(
                tid,
                name,
                args,
                attempts,
                max_retries,
                timeout,
                chained,
                queue,
                scheduled_at,
                parent_id,
                trace_context,
                group_id,
                group_spec,
                sent,  # started
                sent,  # leased_at
            )
            for (
                tid,
                name,
                args,
                attempts,
                max_retries,
                timeout,
                chained,
                queue,
                scheduled_at,
                parent_id,
                trace_context,
                group_id,
                group_spec,
            ) in rows
        ]

    async def _anything_due(self, params: dict[str, Any]) -> bool:
        """Whether a task this worker may claim is due (limits aside): the idle probe."""
        while not self._stopping.is_set():
            try:
                probe_params = claim_params(params["names"], params["queues"])
                async with self.engine.connect() as conn:
                    due = await conn.scalar(self._queries.any_due, probe_params)
                self._policy.succeeded("claim")
                return bool(due)
            except DB_ERRORS as exc:
                await self._policy.failed("claim", exc)
        return False

    @property
    def _lease_limit(self) -> float:
        """How long after its last confirmation a lease is trusted: lease minus half a beat."""
        return self.config.lock_timeout_seconds - self.config.heartbeat_seconds / 2

    def _lease_at_risk(self, job: ClaimedTask) -> bool:
        return time.monotonic() - max(job.leased_at, self._last_heartbeat) > self._lease_limit

    def _give_back_late_claims(self, jobs: list[ClaimedTask]) -> None:
        # The claim's answer came so late (a stalled connection) that the leases it took may
        # have run out already: running these now could run them twice. They never started,
        # and this worker does not hold them, so its next heartbeat gives them back as if
        # never claimed (ownership-checked: nothing happens if another worker rescued them).
        logger.warning("%d tasks claimed too late to run safely: giving them back", len(jobs))

    def _wake_after(self, delay: float) -> None:
        # A retry this worker scheduled: claim it when it falls due rather than at the next
        # poll (no NOTIFY announces a retry).
        asyncio.get_running_loop().call_later(max(delay, 0.0) + 0.01, self._wake.set)

    def _on_listening(self) -> None:
        self._policy.reachable()
        self._wake.set()

    # -- paused queues and limits -----------------------------------------------------------

    def _steering_changed(self) -> None:
        """A queue was paused or resumed, a limit set or removed (or the listener reconnected):
        read them again."""
        if self._steering_refresh is None or self._steering_refresh.done():
            self._steering_refresh = asyncio.create_task(self._refresh_steering_quietly())

    async def _refresh_steering_quietly(self) -> None:
        changed = True  # unread: claim again all the same
        with contextlib.suppress(*DB_ERRORS):
            changed = await self._refresh_steering()
        if changed:
            self._wake.set()  # a resumed queue or a raised limit may have work waiting

    async def _refresh_steering(self) -> bool:
        """Read paused queues and limits; the claim honours them until the next change.
        Returns whether they changed."""
        async with self.engine.connect() as conn:
            steering = await _read_steering(conn, self.model)
        changed = steering != self._steering
        if changed:
            logger.info("paused queues and limits: %s", steering.describe())
        self._steering = steering
        return changed

    def _outcomes_written(self) -> None:
        # Finished tasks free room in their limits: claim again rather than at the next poll.
        if self._steering.limits:
            self._wake.set()

    # -- running ------------------------------------------------------------------------------

    def _start(self, job: ClaimedTask) -> None:
        self._unwritten[job.id] = job
        # Named by the task's name only: formatting its id for every task cost more than the
        # rest of starting it; the id is in every log line of the attempt.
        task = _start_task(self._run_one(job), job.name)
        # On Python 3.12+ a task that never waits has ended already, its outcome handed over
        # and its place freed (_run_one's finally ran before this line).
        if not task.done():
            self._running[job.id] = (job, task)

    async def _run_one(self, job: ClaimedTask) -> None:
        if self._log_starts:  # the hot path: build the fields only if logged
            fields = task_fields(job, self.worker_id)
            logger.info(
                "task %s [%s] attempt %d started", job.name, job.id, job.attempt, extra=fields
            )
        result: str | Failure | Recorded
        try:
            definition = self.registry.get(job.name)
            if self._measured:
                telemetry.started(job.name, job.queue, _waited(job))
            if self._traced:
                with telemetry.processing(
                    job.name, job.queue, str(job.id), job.attempt, job.trace_context
                ) as span:
                    result = await self._attempt(definition, job)
                    if isinstance(result, Failure) and result.snooze is None:
                        telemetry.mark_failed(span, result.type, result.message)
            else:  # no span to enter: a context manager per task cost three calls for nothing
                result = await self._attempt(definition, job)
        except Exception as exc:  # a fault of ours, not the task's; recorded all the same
            logger.exception(
                "task %s [%s]: worker error",
                job.name,
                job.id,
                extra=task_fields(job, self.worker_id),
            )
            result = Failure.from_exception(exc)
        finally:
            running = self._running
            running.pop(job.id, None)
            # Wake the claim loop only when it would claim (see _claim_loop); waking it for
            # each task cost a call per task.
            if len(running) <= self._claim_at:
                self._wake.set()
        if job.abandoned or isinstance(result, Recorded):
            return
        if type(result) is str:  # completed, most outcomes: nothing to decide
            self._finisher.put(Outcome(job, TaskState.COMPLETED, result_json=result))
            return
        try:
            outcome = self._decide(job, result)
        except Exception as exc:  # never leave a task running for ever behind a renewed lease
            logger.exception(
                "task %s [%s]: cannot decide its outcome",
                job.name,
                job.id,
                extra=task_fields(job, self.worker_id),
            )
            outcome = Outcome(
                job, TaskState.FAILED, failure=Failure.from_exception(exc, retryable=False)
            )
        self._finisher.put(outcome)

    def _attempt(
        self, definition: TaskDefinition[Any, Any], job: ClaimedTask, gathered: bool = False
    ) -> Awaitable[str | Failure | Recorded]:
        """One attempt, to await. A plain function that hands back the run's coroutine: a
        coroutine of its own around it would cost every task another frame to step."""
        if job.group_spec is not None and not gathered:
            return self._attempt_follow_up(definition, job)
        if definition.transactional:  # records its own outcome (Recorded)
            return run_transactional(
                definition, job, self._task_engine(), self._finisher, self._decide, self.worker_id
            )
        assert self._executor is not None
        return execute(definition, job, self._executor, self._children, self.worker_id)

    async def _attempt_follow_up(
        self, definition: TaskDefinition[Any, Any], job: ClaimedTask
    ) -> str | Failure | Recorded:
        """A group's follow-up: its members' outcomes into its arguments, then the attempt;
        or the failure its members' outcomes call for."""
        refused = await self._gather_group(job)
        if refused is not None:
            return refused
        return await self._attempt(definition, job, gathered=True)

    async def _gather_group(self, job: ClaimedTask) -> Failure | None:
        """A group's follow-up: its members' outcomes into its arguments, in order; or the
        failure to record instead of running it (a member failed, ``on_failure="fail"``)."""
        assert job.group_spec is not None
        m = self.model
        query = (
            select(m.group_index, m.id, m.state, cast(m.result, Text), m.error)
            .where(m.group_id == job.id)
            .order_by(m.group_index)
        )
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except DB_ERRORS as exc:
            return Failure.from_exception(exc)  # retried like any failed attempt
        members = [(i, mid, str(state), result, error) for i, mid, state, result, error in rows]
        filled = follow_up_args(job.args_json, job.group_spec, members)
        if isinstance(filled, tuple):
            return Failure(type=filled[0], message=filled[1], traceback=None, retryable=False)
        job.args_json = filled
        return None

    def _decide(self, job: ClaimedTask, result: str | Failure) -> Outcome:
        return outcome_for(job, result, self.config, self._policy_of(job))

    def _task_engine(self) -> AsyncEngine:
        # Created on the first transactional task: workers without any pay nothing for it.
        if self._tx_engine is None:
            self._tx_engine = task_engine(self._database_url(), self.config, self.concurrency)
        return self._tx_engine

    def _policy_of(self, job: ClaimedTask) -> RetryPolicy:
        return self.registry.get(job.name).retry if job.name in self.registry else DEFAULT_POLICY

    # -- leases -------------------------------------------------------------------------------

    def _heartbeat_params(self, names: list[str], held: list[ClaimedTask]) -> dict[str, Any]:
        s = self.stats
        return {
            "batch": pairs_json(held),
            "owner": self.worker_id,
            "lease": self._lease,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(self.queues),
            "names": names,
            "concurrency": self.concurrency,
            "version": VERSION,
            "lease_seconds": self.config.lock_timeout_seconds,
            "stats": json.dumps(
                {
                    "claimed": s.claimed,
                    "completed": s.completed,
                    "retried": s.retried,
                    "failed": s.failed,
                    "dropped": s.dropped,
                    "rescued": s.rescued,
                    "running": len(self._running),
                }
            ),
        }

    async def _heartbeat(self, names: list[str]) -> None:
        # A fixed cadence from each beat's sending time, so that slow statements do not
        # stretch the time between renewals.
        next_beat = time.monotonic() + self.config.heartbeat_seconds
        while True:
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            sent = await self._beat(names)
            next_beat = sent + self.config.heartbeat_seconds
            # A fallback for pause/limit notifications missed (the listener was away).
            self._steering_changed()

    async def _beat(self, names: list[str]) -> float:
        """One heartbeat, retried until it goes through; returns when it was sent."""
        while True:
            try:
                async with self._claim_lock, self.engine.connect() as conn:
                    held = list(self._unwritten.values())
                    sent = time.monotonic()
                    rows = (
                        await conn.execute(
                            self._queries.heartbeat, self._heartbeat_params(names, held)
                        )
                    ).all()
            except DB_ERRORS as exc:
                await self._policy.failed("heartbeat", exc)
                continue
            self._policy.succeeded("heartbeat")
            self._last_heartbeat = sent
            lost = {r.id for r in rows if r.kind == "lost"}
            strays = [r.id for r in rows if r.kind == "stray"]
            if strays:
                logger.warning(
                    "gave back %d tasks whose claim reached the database but whose answer did "
                    "not reach this worker",
                    len(strays),
                )
                self._wake.set()
            for job in held:
                if job.id in lost and job.id in self._unwritten:
                    self._abandon(job, "is no longer ours (cancelled, or rescued)")
            return sent

    async def _watchdog(self) -> None:
        """Stop the tasks whose leases may run out: the heartbeat has not got through.

        Past ``lease - heartbeat / 2`` without a successful heartbeat another worker may soon
        take the tasks over; they are stopped (async tasks cancelled, child processes
        killed) and recorded as failed attempts, retried as usual. Fencing refuses that
        record if another worker took the task over meanwhile.
        """
        while True:
            await asyncio.sleep(min(1.0, self.config.heartbeat_seconds / 4))
            for job, task in list(self._running.values()):
                if job.abandoned or not self._lease_at_risk(job):
                    continue
                silent = time.monotonic() - max(job.leased_at, self._last_heartbeat)
                job.abandoned = True  # its own outcome, if any, comes too late to count
                task.cancel()
                logger.error(
                    "task %s [%s] attempt %d stopped: no heartbeat got through for %.0f s, "
                    "its lease may expire",
                    job.name,
                    job.id,
                    job.attempt,
                    silent,
                )
                failure = Failure(
                    type="LeaseLost",
                    message=f"stopped after {silent:.0f} s without a heartbeat reaching the "
                    "database, before the lease could expire",
                    traceback=None,
                )
                self._finisher.put(outcome_for(job, failure, self.config, self._policy_of(job)))

    def _abandon(self, job: ClaimedTask, why: str) -> None:
        job.abandoned = True
        self._unwritten.pop(job.id, None)
        entry = self._running.get(job.id)
        if entry is not None:
            entry[1].cancel()  # stops async tasks and kills child processes; threads run on
        logger.warning(
            "task %s [%s] attempt %d %s",
            job.name,
            job.id,
            job.attempt,
            why,
            extra=task_fields(job, self.worker_id),
        )

    async def _rescuer(self) -> None:
        interval = min(self.config.heartbeat_seconds, 60.0)
        c = self.config
        params = rescue_params(
            c.base_retry_delay_seconds,
            c.retry_backoff_multiplier,
            c.max_retry_delay_seconds,
            c.results_channel,
        )
        while True:
            try:
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(self._queries.rescue, params)).all()
                self._policy.succeeded("rescue")
            except DB_ERRORS as exc:
                await self._policy.failed("rescue", exc)
                # The database was away, perhaps for longer than a lease: every worker's
                # registry row looks stale until its next heartbeat gets through. Give them
                # all the time for one before judging any of them dead.
                await asyncio.sleep(self.config.heartbeat_seconds * 1.5)
                continue
            for r in rows:
                self.stats.rescued += 1
                logger.warning(
                    "task %s [%s] rescued from a lost worker: now %s", r.name, r.id, r.state
                )
            if rows:
                self._wake.set()
            await self._count_depth()
            await asyncio.sleep(interval)

    async def _count_depth(self) -> None:
        """Refresh the queue-depth gauge (only when metrics are collected)."""
        if not self._measured:
            return
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(self._queries.depth)).all()
        except DB_ERRORS as exc:
            logger.debug("could not count the queues: %s", one_line(exc))
            return
        telemetry.queue_depth({queue: n for queue, n in rows})

    # -- periodic tasks -------------------------------------------------------------------

    def _periodic(self) -> list[TaskDefinition[Any, Any]]:
        """The scheduled tasks this worker inserts ticks for: those it would also run.

        A worker restricted by ``where`` (a tenant's pool) leaves schedules to the others.
        """
        if self.where is not None:
            return []
        return [
            d
            for d in self.registry
            if d.schedule is not None and (not self.queues or d.queue in self.queues)
        ]

    async def _scheduler(self, periodic: list[TaskDefinition[Any, Any]]) -> None:
        """Insert each scheduled task's ticks as they fall due, racing the other workers.

        A tick's row has the unique key ``<name>:@<tick>`` in every state, so the first insert
        wins and the others insert nothing: one run per tick however many workers run.
        """
        after: dict[str, datetime] = {}
        while not after:
            try:
                now = datetime.now(UTC)
                for d in periodic:
                    assert d.schedule is not None
                    last = await self._last_tick(d.name)
                    after[d.name] = starting_point(d.schedule, last, now)
            except DB_ERRORS as exc:
                after.clear()
                await self._policy.failed("schedule", exc)
        catching_up = True
        while True:
            now = datetime.now(UTC)
            try:
                for d in periodic:
                    assert d.schedule is not None
                    ticks = due_ticks(d.schedule, after[d.name], now, catching_up=catching_up)
                    if ticks:
                        await self._insert_ticks(d, ticks)
                    after[d.name] = now
                catching_up = False
                self._policy.succeeded("schedule")
            except DB_ERRORS as exc:
                # Nothing advanced: the same ticks come due again on the next try.
                await self._policy.failed("schedule", exc)
                continue
            soonest = min(d.schedule.next_tick(after[d.name]) for d in periodic if d.schedule)
            await asyncio.sleep(max(0.0, (soonest - datetime.now(UTC)).total_seconds()))

    async def _last_tick(self, name: str) -> datetime | None:
        m = self.model
        prefix = f"{name}:@"
        query = (
            select(m.unique_key)
            .where(
                m.unique_key >= prefix,
                m.unique_key < prefix + "\uffff",
                m.state == any_(m.unique_states),  # the partial unique index's predicate
            )
            .order_by(m.unique_key.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            key = await conn.scalar(query)
        return None if key is None else tick_of_key(key)

    async def _insert_ticks(self, d: TaskDefinition[Any, Any], ticks: list[datetime]) -> None:
        assert d.schedule is not None
        args = dict(d.schedule.args)
        rows = [
            task_values(
                d.options(run_at=tick, unique_key=tick_key(tick), unique_states=TICK_STATES),
                (),
                args,
                default_max_retries=self.config.default_max_retries,
            )
            for tick in ticks
        ]
        ids = await write_tasks(self.engine, self.model, rows)
        inserted = sum(1 for row, i in zip(rows, ids, strict=True) if row["id"] == i)
        if inserted:
            logger.info("scheduled %s: %d tick(s), the last due %s", d.name, inserted, ticks[-1])

    async def _pruner(self) -> None:
        """Retention: delete old finished tasks, one worker at a time (see retention.py)."""
        interval = self.config.prune_interval_seconds
        # Not all at once when a fleet starts: a random part of the first interval (a minute
        # at most), then every interval.
        await asyncio.sleep(random.uniform(0.1, 1.0) * min(interval, 60.0))
        while True:
            try:
                counts = await prune(self.engine, self.model, self.config.retention)
                self._policy.succeeded("prune")
            except DB_ERRORS as exc:
                await self._policy.failed("prune", exc)
                continue
            if counts and any(counts.values()):
                self.stats.pruned += sum(n for state, n in counts.items() if state != "workers")
                logger.info("pruned old finished tasks and dead workers: %s", counts)
            await asyncio.sleep(interval)

    # -- stopping -----------------------------------------------------------------------------

    def _give_up(self, error: WorkerError) -> None:
        self.stop()
        self.stop()  # no grace: nothing can be recorded anyway

    async def _shutdown(self, side: list[asyncio.Task[Any]]) -> None:
        await self._wait_for_running()
        leftover = [job for job, _ in self._running.values()]
        for job in leftover:
            self._abandon(job, "interrupted by shutdown")
        if self._policy.fatal is None:
            await self._flush_quietly()
            if leftover:
                await self._release(leftover)
        if self._steering_refresh is not None:
            side.append(self._steering_refresh)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if self._policy.fatal is None:
            await self._deregister()
        if self._executor is not None:
            self._executor.shutdown()
        await self._children.close()
        await self._uninstall_client()
        await self._dispose()

    async def _wait_for_running(self) -> None:
        if not self._running or self._forced.is_set():
            return
        logger.info(
            "waiting up to %.0f s for %d running tasks",
            self.config.shutdown_grace_seconds,
            len(self._running),
        )
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            async with asyncio.timeout(self.config.shutdown_grace_seconds):
                while self._running and not self._forced.is_set():
                    running = [t for _, t in self._running.values()]
                    await asyncio.wait([*running, forced], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            forced.cancel()

    async def _dispose(self) -> None:
        await self._claim_conn.close()
        await self._finisher.close()
        for engine in (self._engine, self._tx_engine):
            if engine is not None:
                await engine.dispose()
        self._engine = self._tx_engine = None

    async def _flush_quietly(self) -> None:
        # Including a write already in flight: cancelling it could lose a completed outcome,
        # and the task would run again once its lease expired.
        try:
            async with asyncio.timeout(10):
                await self._finisher.flush()
        except TimeoutError:
            logger.error("could not write %d outcomes before stopping", self._finisher.pending)

    async def _release(self, jobs: list[ClaimedTask]) -> None:
        try:
            async with self.engine.connect() as conn:
                rows = await conn.execute(
                    self._queries.release, {"batch": pairs_json(jobs), "owner": self.worker_id}
                )
                self.stats.released += len(rows.all())
            logger.info("gave %d unfinished tasks back to the queue", self.stats.released)
        except DB_ERRORS as exc:
            logger.error("could not give back unfinished tasks (their leases will expire): %s", exc)

    async def _deregister(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(self._queries.deregister, {"owner": self.worker_id})
        except DB_ERRORS as exc:
            logger.warning("could not remove this worker's registry row: %s", one_line(exc))

    @contextlib.contextmanager
    def _signals(self) -> Any:
        loop = asyncio.get_running_loop()
        installed = []
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
                except (RuntimeError, ValueError, NotImplementedError):
                    pass  # not the main thread, or no signal support on this loop
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

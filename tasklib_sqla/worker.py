"""``TaskWorker``: claims due tasks, runs them, records outcomes, keeps leases alive.

The worker is a handful of named loops on one event loop:

- the **claim loop** takes batches of due tasks (one ``UPDATE ... FOR UPDATE SKIP LOCKED``
  round trip per batch) whenever slots are free, woken by NOTIFY, by a finished task, or by the
  poll interval;
- the **finisher** writes outcomes, many per statement: outcomes that arrive while one write is
  in flight go out together in the next;
- the **heartbeat** renews the leases of held tasks and notices the ones it lost;
- the **rescuer** hands expired leases of dead workers back to pending (or to failed, once
  their attempts are spent);
- the **listener** holds a LISTEN connection.

Every write names the owner and the attempt it claimed, so a worker that lost a task changes
nothing (see ``queries.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .client import async_url
from .config import Config
from .finisher import DB_ERRORS, Finisher, WorkerStats, outcome_for, pairs_json
from .listener import Listener, asyncpg_dsn
from .models import Task, TaskMixin
from .queries import WorkerQueries
from .registry import TaskRegistry, default_registry
from .runner import ClaimedTask, Failure, execute, process_context

logger = logging.getLogger("tasklib_sqla.worker")


def default_worker_id() -> str:
    """host:pid:random — unique per worker run, readable in ``SELECT worker_id ...``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class TaskWorker:
    """Runs registered tasks from the queue, ``concurrency`` at a time.

    ``await worker.run()`` works until stopped (SIGTERM/SIGINT or :meth:`stop`); with
    ``burst=True`` it returns once no task it can run is due. Only tasks whose names are in
    ``registry`` are claimed; tasks of other names stay pending and visible.
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
        # Every worker statement is atomic on its own and must take effect at once: run them in
        # autocommit, also on an engine the caller passed (a copy sharing its pool).
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT") if engine else None
        self._owns_engine = engine is None
        self._queries = WorkerQueries.for_model(model)
        self._running: dict[uuid.UUID, tuple[ClaimedTask, asyncio.Task[None]]] = {}
        self._unwritten: dict[uuid.UUID, ClaimedTask] = {}
        self._finisher = Finisher(
            lambda: self.engine,
            self._queries,
            self.worker_id,
            self._unwritten,
            self.stats,
            self._backoff,
        )
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._force = False
        self._executor: ThreadPoolExecutor | None = None
        self._mp_context: Any = None
        self._lease = timedelta(seconds=config.lock_timeout_seconds)

    # -- public -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new claims, running tasks get the grace period."""
        if self._stopping.is_set():
            self._force = True
            logger.warning("second stop request: not waiting for running tasks")
        self._stopping.set()
        self._wake.set()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = create_async_engine(
                async_url(self.config.database_url),
                isolation_level="AUTOCOMMIT",
                pool_size=5,
                max_overflow=5,
            )
        return self._engine

    def _database_url(self) -> str:
        # An engine passed without a Config URL is enough: LISTEN connects to the same server.
        if not self.config.database_url and self._engine is not None:
            return self._engine.url.render_as_string(hide_password=False)
        return async_url(self.config.database_url)

    async def run(self) -> WorkerStats:
        """Work until stopped (or, in burst mode, until nothing is due); return the stats."""
        names = sorted(self.registry.names)
        if not names:
            raise ValueError("the registry holds no tasks: import the module that defines them")
        logger.info(
            "worker %s starting: %d tasks registered, queues %s, concurrency %d",
            self.worker_id,
            len(names),
            list(self.queues) or "all",
            self.concurrency,
        )
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tasklib")
        self._mp_context = process_context()
        side = [
            asyncio.create_task(self._finisher.run(), name="tasklib-finisher"),
            asyncio.create_task(self._heartbeat(), name="tasklib-heartbeat"),
            asyncio.create_task(self._rescuer(), name="tasklib-rescuer"),
        ]
        if not self.burst:
            listener = Listener(
                asyncpg_dsn(self._database_url()),
                self.config.notify_channel,
                self.queues,
                self._wake.set,
            )
            side.append(asyncio.create_task(listener.run(), name="tasklib-listener"))
        with self._signals():
            try:
                await self._claim_loop(names)
            finally:
                await self._shutdown(side)
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)
        return self.stats

    # -- claiming -----------------------------------------------------------------------------

    async def _claim_loop(self, names: list[str]) -> None:
        params = {
            "names": names,
            "queues": list(self.queues),
            "owner": self.worker_id,
            "lease": self._lease,
        }
        errors = 0
        while not self._stopping.is_set():
            self._wake.clear()
            free = self.concurrency - len(self._running)
            # Claim in batches: wait for a quarter of the slots unless nothing runs, so that
            # short tasks finishing one by one do not turn into one claim per task.
            if free > 0 and (free >= self._min_claim or not self._running):
                want = min(free, self.batch_size)
                try:
                    jobs = await self._claim(params, want)
                    errors = 0
                except DB_ERRORS as exc:
                    errors += 1
                    await self._backoff("claim", exc, errors)
                    continue
                for job in jobs:
                    self._start(job)
                if len(jobs) == want:
                    continue  # more may be due: claim again at once
                if self.burst and not jobs and not self._running:
                    await self._finisher.flush()
                    if not await self._anything_due(params):
                        return
                    continue
            # Wait for a NOTIFY, a freed slot or a stop; poll as a fallback (scheduled tasks,
            # missed notifications). Burst mode has no listener and waits for slots only.
            timeout = None if self.burst else self.config.poll_interval_seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    @property
    def _min_claim(self) -> int:
        return max(1, min(self.concurrency, self.batch_size) // 4)

    async def _claim(self, params: dict[str, Any], limit: int) -> list[ClaimedTask]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._queries.claim, {**params, "limit": limit})).all()
        self.stats.claimed += len(rows)
        return [
            ClaimedTask(
                r.id, r.name, r.args, r.attempts, r.max_retries, r.timeout_seconds, r.chained
            )
            for r in rows
        ]

    async def _anything_due(self, params: dict[str, Any]) -> bool:
        async with self.engine.connect() as conn:
            due = await conn.scalar(
                self._queries.any_due, {"names": params["names"], "queues": params["queues"]}
            )
        return bool(due)

    # -- running ------------------------------------------------------------------------------

    def _start(self, job: ClaimedTask) -> None:
        task = asyncio.create_task(self._run_one(job), name=f"tasklib:{job.name}:{job.id}")
        self._running[job.id] = (job, task)
        self._unwritten[job.id] = job

    async def _run_one(self, job: ClaimedTask) -> None:
        logger.info("task %s [%s] attempt %d started", job.name, job.id, job.attempt)
        result: str | Failure
        try:
            assert self._executor is not None
            definition = self.registry.get(job.name)
            result = await execute(definition, job, self._executor, self._mp_context)
        except Exception as exc:  # a fault of ours, not the task's; recorded all the same
            logger.exception("task %s [%s]: worker error", job.name, job.id)
            result = Failure.from_exception(exc)
        finally:
            self._running.pop(job.id, None)
            self._wake.set()
        if job.abandoned:
            return
        self._finisher.put(outcome_for(job, result, self.config))

    # -- leases -------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            held = list(self._unwritten.values())
            if not held:
                continue
            try:
                async with self.engine.connect() as conn:
                    rows = await conn.execute(
                        self._queries.heartbeat,
                        {"batch": pairs_json(held), "owner": self.worker_id, "lease": self._lease},
                    )
                    kept = {r[0] for r in rows}
            except DB_ERRORS as exc:
                logger.warning("heartbeat failed: %s", exc)
                continue
            for job in held:
                if job.id not in kept and job.id in self._unwritten:
                    self._abandon(job, "lost its lease (expired, cancelled or rescued)")

    def _abandon(self, job: ClaimedTask, why: str) -> None:
        job.abandoned = True
        self._unwritten.pop(job.id, None)
        entry = self._running.get(job.id)
        if entry is not None:
            entry[1].cancel()  # stops async tasks and kills child processes; threads run on
        logger.warning("task %s [%s] attempt %d %s", job.name, job.id, job.attempt, why)

    async def _rescuer(self) -> None:
        interval = min(self.config.heartbeat_seconds, 60.0)
        params = {
            "base": self.config.base_retry_delay_seconds,
            "multiplier": self.config.retry_backoff_multiplier,
        }
        while True:
            try:
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(self._queries.rescue, params)).all()
                for r in rows:
                    self.stats.rescued += 1
                    logger.warning(
                        "task %s [%s] rescued from a lost worker: now %s", r.name, r.id, r.state
                    )
                if rows:
                    self._wake.set()
            except DB_ERRORS as exc:
                logger.warning("rescue failed: %s", exc)
            await asyncio.sleep(interval)

    # -- stopping -----------------------------------------------------------------------------

    async def _shutdown(self, side: list[asyncio.Task[Any]]) -> None:
        running = [t for _, t in self._running.values()]
        if running and not self._force:
            logger.info(
                "waiting up to %.0f s for %d running tasks",
                self.config.shutdown_grace_seconds,
                len(running),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.shutdown_grace_seconds):
                    while self._running and not self._force:
                        await asyncio.wait(
                            [t for _, t in self._running.values()],
                            return_when=asyncio.FIRST_COMPLETED,
                        )
        leftover = [job for job, _ in self._running.values()]
        for job in leftover:
            self._abandon(job, "interrupted by shutdown")
        await self._flush_quietly()
        if leftover:
            await self._release(leftover)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None

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

    async def _backoff(self, what: str, exc: BaseException, errors: int) -> None:
        delay = min(0.1 * 2 ** (errors - 1), 30.0)
        logger.warning(
            "%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

"""Recording outcomes: what a finished attempt means for its task, and the batched writer.

Outcomes that arrive while one write is in flight go out together in the next write: one
ownership-checked UPDATE for any number of tasks (see ``queries.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import direct, telemetry
from .config import Config
from .errors import DB_ERRORS, ErrorKind, ErrorPolicy, classify, one_line
from .held import HeldConnection
from .logs import task_fields
from .models import TaskState
from .queries import WorkerQueries
from .retry import DEFAULT_POLICY, RetryPolicy
from .runner import ClaimedTask, Failure

logger = logging.getLogger("tasklib_sqla.worker")


@dataclass(slots=True)
class WorkerStats:
    """Counters of what a worker did, for logs, tests and benchmarks."""

    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    #: Outcomes refused by the database because the task was no longer ours.
    dropped: int = 0
    rescued: int = 0
    released: int = 0
    #: Attempts that raised Snooze (run again later, attempt not counted).
    snoozed: int = 0
    #: Old finished tasks this worker deleted (retention).
    pruned: int = 0


@dataclass(slots=True)
class Outcome:
    """The next state of a task whose attempt ended."""

    job: ClaimedTask
    state: TaskState
    result_json: str | None = None
    failure: Failure | None = None
    delay: float | None = None
    #: Snoozed: back to pending after ``delay`` with the attempt given back, no error recorded.
    snoozed: bool = False


def outcome_for(
    job: ClaimedTask,
    result: str | Failure,
    config: Config,
    policy: RetryPolicy = DEFAULT_POLICY,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """Completed with its result, snoozed, or the retry decision for a failure."""
    if not isinstance(result, Failure):
        return Outcome(job, TaskState.COMPLETED, result_json=result)
    if result.snooze is not None:
        return Outcome(job, TaskState.PENDING, delay=result.snooze, snoozed=True)
    if not (result.retryable and job.attempt <= job.max_retries):
        return Outcome(job, TaskState.FAILED, failure=result)
    delay = policy.delay(
        job.attempt,
        base=config.base_retry_delay_seconds,
        multiplier=config.retry_backoff_multiplier,
        max_seconds=config.max_retry_delay_seconds,
        jitter=config.retry_jitter,
        rand=rand,
    )
    return Outcome(job, TaskState.PENDING, failure=result, delay=delay)


def _kind(o: Outcome) -> str:
    if o.snoozed:
        return "snoozed"
    if o.failure is None:
        return "completed"
    return "retried" if o.state is TaskState.PENDING else "failed"


def record_json(o: Outcome, worker_id: str) -> str:
    """One element of the finish statement's batch."""
    # Hand-assembled: result_json is validated JSON text already, the rest is ours.
    f = o.failure
    if f is None and not o.snoozed:  # completed: most of every batch
        return (
            f'{{"id":"{o.job.id}","attempt":{o.job.attempt},"state":"completed",'
            f'"result":{o.result_json or "null"},"error":null,"err":null,"delay":null,'
            '"refund":0}'
        )
    err = error = "null"
    if f is not None:
        error = json.dumps(f.summary)
        err = json.dumps(
            {
                "attempt": o.job.attempt,
                "type": f.type,
                "message": f.message,
                "traceback": f.traceback,
                "worker_id": worker_id,
                "at": datetime.now(UTC).isoformat(),
            }
        )
    return (
        f'{{"id":"{o.job.id}","attempt":{o.job.attempt},"state":"{o.state.value}",'
        f'"result":{o.result_json or "null"},"error":{error},"err":{err},'
        f'"delay":{"null" if o.delay is None else repr(float(o.delay))},'
        f'"refund":{1 if o.snoozed else 0}}}'
    )


def pairs_json(jobs: Sequence[ClaimedTask]) -> str:
    """(id, attempt) of each job: the batch of the heartbeat and release statements."""
    return json.dumps([{"id": str(j.id), "attempt": j.attempt} for j in jobs])


def _parts(batch: list[Outcome]) -> list[list[Outcome]]:
    """The batch as the statements that write it: group members go in one of their own (it
    counts down their follow-ups), so that a chained completion among the others still gets
    the statement that inserts its successor. Usually one part."""
    members = [o for o in batch if o.job.group_id is not None]
    if not members:
        return [batch]
    others = [o for o in batch if o.job.group_id is None]
    return [members, others] if others else [members]


class Finisher:
    """Writes outcomes in batches; keeps them, and retries, while the database is away.

    The error policy decides: a transient or fatal error keeps the whole batch for the next
    try (the tasks are still ours: the heartbeat keeps their leases), a data error (the
    database refused one outcome's values) finds the outcome at fault and records it as a
    failure of its task.
    """

    def __init__(
        self,
        engine: Callable[[], AsyncEngine],
        queries: WorkerQueries,
        worker_id: str,
        held: dict[uuid.UUID, ClaimedTask],
        stats: WorkerStats,
        policy: ErrorPolicy,
        on_retry: Callable[[float], None] = lambda _delay: None,
        done_channel: str = "tasklib_tasks_done",
        on_written: Callable[[], None] = lambda: None,
    ) -> None:
        #: Called after outcomes were written (finished tasks free room in limits).
        self._on_written = on_written
        #: Where finished tasks are announced to result waiters (Config.results_channel).
        self._done_channel = done_channel
        #: The writer's connection, kept between writes (see held.py).
        self._conn = HeldConnection(engine)
        self._queries = queries
        self._worker_id = self.worker_id = worker_id
        #: Tasks claimed and not yet recorded: shared with the worker, whose heartbeat renews them.
        self._held = held
        self._stats = stats
        #: Whether OpenTelemetry metrics are collected (set by the worker when it starts).
        self.measured = False
        self._policy = policy
        self._on_retry = on_retry
        self._outcomes: list[Outcome] = []
        self._ready = asyncio.Event()
        self._writing = False
        #: Outcomes a claim has taken to record in its own statement, not yet answered.
        self._carried = 0
        #: Whether claims may carry outcomes: not after a claim's statement failed with them
        #: until the writer has written its own again (a row lock or a refused outcome would
        #: otherwise stall every claim in turn).
        self._carrying = True

    def put(self, outcome: Outcome) -> None:
        # Set when the first outcome arrives; the writer takes them all at once, so a list that
        # is not empty has had its event set already (one call less per task).
        if not self._outcomes:
            self._ready.set()
        self._outcomes.append(outcome)

    @property
    def pending(self) -> int:
        return len(self._outcomes) + self._carried + (1 if self._writing else 0)

    def take_for_claim(self) -> list[Outcome]:
        """The outcomes a claim about to be sent records in its own statement
        (``queries.claim_and_finish``): all but group members and chained completions, which
        need statements of their own. The claim answers with ``carried_written`` or, if its
        statement failed, ``carried_back``."""
        outcomes = self._outcomes
        if not outcomes or not self._carrying:
            return []  # not the list itself: put() appends to it
        carried: list[Outcome] = []
        kept: list[Outcome] = []
        for o in outcomes:
            job = o.job
            plain = job.group_id is None and not (job.chained and o.failure is None)
            (carried if plain else kept).append(o)
        self._outcomes = kept
        self._carried += len(carried)
        return carried

    def carried_written(self, carried: Sequence[Outcome], written: Collection[uuid.UUID]) -> None:
        """The claim's statement recorded ``written`` of ``carried`` (the rest were fenced)."""
        self._carried -= len(carried)
        self.settle(carried, written)

    def carried_back(self, carried: list[Outcome]) -> None:
        """The claim's statement failed: the writer records ``carried`` itself (if the
        statement did commit, fencing refuses the second write), and claims carry nothing
        until it has written a batch of its own."""
        self._carried -= len(carried)
        if carried:
            self._carrying = False
            self._keep(carried)

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            # One turn of the event loop first: a claim woken by the same finished tasks
            # takes their outcomes into its own statement (take_for_claim), one round trip
            # instead of two; what it leaves is written here.
            await asyncio.sleep(0)
            batch, self._outcomes = self._outcomes, []
            if not batch:
                continue
            self._writing = True
            try:
                await self._write_or_keep(batch)
            finally:
                self._writing = False

    async def _write_or_keep(self, batch: list[Outcome]) -> None:
        parts = _parts(batch)
        for i, part in enumerate(parts):
            try:
                await self._write(part)
            except DB_ERRORS as exc:
                if classify(exc) is ErrorKind.DATA:
                    await self._write_one_by_one(part, exc)
                    continue
                # Only what is not written yet is kept: the parts before this one are.
                self._keep([o for rest in parts[i:] for o in rest])
                await self._policy.failed("finish", exc)
                return
        self._policy.succeeded("finish")
        self._carrying = True

    def _keep(self, outcomes: list[Outcome]) -> None:
        self._outcomes[:0] = outcomes
        self._ready.set()

    async def _write_one_by_one(self, batch: list[Outcome], exc: BaseException) -> None:
        """A batch the database refused: find the outcome at fault, record it as a failure.

        One bad outcome (say, a chain step that no longer casts) must not hold back the others,
        nor loop forever: it becomes a failed attempt that names the database's objection.
        """
        logger.warning("finish refused (%s); recording %d outcomes one by one", exc, len(batch))
        for i, o in enumerate(batch):
            try:
                await self._write([o])
                continue
            except DB_ERRORS as one_exc:
                if classify(one_exc) is not ErrorKind.DATA:
                    self._keep(batch[i:])
                    await self._policy.failed("finish", one_exc)
                    return
                why = one_exc.__cause__ or one_exc
            failure = Failure(
                type="OutcomeNotRecorded",
                message=f"the database refused this task's outcome: {one_line(why)}",
                traceback=None,
                retryable=False,
            )
            try:
                await self._write([Outcome(o.job, TaskState.FAILED, failure=failure)])
            except DB_ERRORS as last:
                if classify(last) is not ErrorKind.DATA:
                    self._keep([Outcome(o.job, TaskState.FAILED, failure=failure), *batch[i + 1 :]])
                    await self._policy.failed("finish", last)
                    return
                self._held.pop(o.job.id, None)
                logger.error(
                    "task %s [%s]: even its failure cannot be recorded (%s); its lease will expire",
                    o.job.name,
                    o.job.id,
                    one_line(last),
                    extra=task_fields(o.job, self._worker_id),
                )
        self._policy.succeeded("finish")

    async def flush(self) -> None:
        """Wait until every outcome produced so far is written, those in flight included
        (the writer's and a claim's)."""
        while self._outcomes or self._writing or self._carried:
            self._ready.set()
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        """Give back the writer's kept connection (the worker is stopping)."""
        await self._conn.close()

    def statement(self, batch: Sequence[Outcome]) -> tuple[Any, dict[str, Any]]:
        """The finish statement recording ``batch``, and its parameters."""
        worker_id = self._worker_id
        grouped = chained = False
        records = []
        for o in batch:  # one pass: three generators over the batch cost a resume per task each
            records.append(record_json(o, worker_id))
            if o.job.group_id is not None:
                grouped = True
            elif o.job.chained and o.failure is None:
                chained = True
        payload = "[" + ",".join(records) + "]"
        if grouped:
            statement = self._queries.finish_grouped
        elif chained:
            statement = self._queries.finish_chained
        else:
            statement = self._queries.finish
        params = {"batch": payload, "owner": self._worker_id, "done_channel": self._done_channel}
        return statement, params

    async def _write(self, batch: list[Outcome]) -> None:
        statement, params = self.statement(batch)
        async with self._conn.connect() as conn:
            written = {row[0] for row in await direct.fetch(conn, statement, params)}
        self.settle(batch, written)

    def settle(self, batch: Sequence[Outcome], written: Collection[uuid.UUID]) -> None:
        """Account for outcomes the database has answered: ``written`` were recorded, the rest
        were refused by fencing (the task was no longer ours)."""
        # Nothing to log or measure: a completion only counts (the hot path, checked once).
        quiet = not (self.measured or logger.isEnabledFor(logging.INFO))
        for o in batch:
            self._held.pop(o.job.id, None)
            if o.job.id in written:
                if quiet and o.failure is None and not o.snoozed:
                    self._stats.completed += 1
                    continue
                self._log(o)
                if o.state is TaskState.PENDING:
                    self._on_retry(o.delay or 0.0)
            else:
                self._stats.dropped += 1
                logger.warning(
                    "task %s [%s] attempt %d: outcome dropped, the task is no longer ours "
                    "(lease expired, cancelled or rescued)",
                    o.job.name,
                    o.job.id,
                    o.job.attempt,
                    extra=task_fields(o.job, self._worker_id),
                )
        if written:
            self._on_written()

    def _log(self, o: Outcome) -> None:
        f = o.failure
        if f is None and not o.snoozed:  # completed: most outcomes, the hot path
            self._stats.completed += 1
            logged = logger.isEnabledFor(logging.INFO)
            ms = (time.monotonic() - o.job.started) * 1000
            if self.measured:
                telemetry.finished(o.job.name, o.job.queue, "completed", ms / 1000)
            if logged:
                logger.info(
                    "task %s [%s] attempt %d completed in %.1f ms",
                    o.job.name,
                    o.job.id,
                    o.job.attempt,
                    ms,
                    extra=task_fields(o.job, self._worker_id),
                )
            return
        ms = (time.monotonic() - o.job.started) * 1000
        kind = _kind(o)
        if self.measured:
            telemetry.finished(o.job.name, o.job.queue, kind, ms / 1000)
        name, tid, attempt = o.job.name, o.job.id, o.job.attempt
        if f is None:  # snoozed
            self._stats.snoozed += 1
            logger.info(
                "task %s [%s] attempt %d snoozed for %.1f s (attempt not counted)",
                name,
                tid,
                attempt,
                o.delay or 0.0,
                extra=task_fields(o.job, self._worker_id),
            )
            return
        fields = task_fields(o.job, self._worker_id, error_type=f.type)
        if kind == "retried":
            self._stats.retried += 1
            logger.warning(
                "task %s [%s] attempt %d failed (%s: %s); retry in %.1f s",
                name,
                tid,
                attempt,
                f.type,
                f.message,
                o.delay or 0.0,
                extra=fields,
            )
        else:
            self._stats.failed += 1
            logger.error(
                "task %s [%s] attempt %d failed for good (%s: %s)",
                name,
                tid,
                attempt,
                f.type,
                f.message,
                extra=fields,
            )

"""Results: a handle on a submitted task that waits for its outcome and returns it typed.

``submit_task`` (and every other submit) returns a :class:`TaskHandle`: the task's id (a
``uuid.UUID``, usable wherever the id was) that can also wait for the task::

    handle = await submit_task(resize, image_id=7)
    size = await handle.result(timeout=30)   # typed: what ``resize`` returns

Waiting does not poll the row: a worker that records a task's completion or failure sends a
``pg_notify`` on the results channel (``Config.notify_channel + "_done"``) in the same
statement, and a waiter wakes on it. One LISTEN connection per client and event loop serves all
the waits in progress, opened with the first and closed with the last; after every
(re)connect each waiter reads its row again, since notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import asyncpg

from .exceptions import TaskCancelledError, TaskFailedError, TaskNotFoundError

if TYPE_CHECKING:
    from .client import TaskClient
    from .definition import TaskDefinition

logger = logging.getLogger("tasklib_sqla.results")

R = TypeVar("R")
T = TypeVar("T")

#: States after which a task never changes by itself.
_DONE = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Finished:
    """A finished task's outcome, as its row holds it."""

    state: str
    #: The result as JSON text (completed tasks).
    result_json: str | None
    error: str | None
    errors: list[dict[str, Any]]


class TaskHandle(uuid.UUID, Generic[R]):
    """A submitted task's id that can wait for the task and return its result.

    It *is* the id (``uuid.UUID``): compare it, store it, pass it to ``get_task``. Get one for
    an id you kept (in another process, say) with ``definition.handle(task_id)``.
    """

    __slots__ = ("_client", "_definition")
    _definition: TaskDefinition[Any, R] | None
    _client: TaskClient[Any] | None

    def __init__(
        self,
        task_id: uuid.UUID | str,
        definition: TaskDefinition[Any, R] | None = None,
        client: TaskClient[Any] | None = None,
    ) -> None:
        if type(task_id) is uuid.UUID:
            # A valid id already: copy its fields rather than validate them again (a batch
            # submit makes a handle per task).
            object.__setattr__(self, "int", task_id.int)
            object.__setattr__(self, "is_safe", task_id.is_safe)
        else:
            value = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id))
            super().__init__(int=value.int)
        object.__setattr__(self, "_definition", definition)
        object.__setattr__(self, "_client", client)

    def __reduce__(self) -> Any:
        return (uuid.UUID, (str(self),))  # a pickled handle is the id

    def __repr__(self) -> str:
        name = self._definition.name if self._definition is not None else "?"
        return f"TaskHandle('{self}', task={name!r})"

    @property
    def id(self) -> uuid.UUID:
        """The plain id."""
        return uuid.UUID(int=self.int)

    @overload
    async def result(
        self: TaskHandle[Coroutine[Any, Any, T]], timeout: float | None = None
    ) -> T: ...
    @overload
    async def result(self: TaskHandle[T], timeout: float | None = None) -> T: ...
    async def result(self, timeout: float | None = None) -> Any:
        """Wait until the task finishes; return its result, validated into its declared type.

        Raises :class:`TaskFailedError` (with the error and history) when it failed for good,
        :class:`TaskCancelledError` when it was cancelled, ``TimeoutError`` when ``timeout``
        seconds pass first, :class:`TaskNotFoundError` for an unknown id.
        """
        return self._outcome(await self.wait(timeout))

    @overload
    def result_sync(
        self: TaskHandle[Coroutine[Any, Any, T]], timeout: float | None = None
    ) -> T: ...
    @overload
    def result_sync(self: TaskHandle[T], timeout: float | None = None) -> T: ...
    def result_sync(self, timeout: float | None = None) -> Any:
        """:meth:`result` for synchronous code (not inside a running event loop)."""
        from .blocking import background

        return background.run(lambda: self.result(timeout))

    async def wait(self, timeout: float | None = None) -> Finished:
        """Wait until the task finishes (completed, failed or cancelled) and return its outcome."""
        client = self._client
        if client is None:
            from .client import current_client

            client = current_client()
        try:
            async with asyncio.timeout(timeout):
                return await _wait(client, self.id)
        except TimeoutError:
            raise TimeoutError(f"task {self} did not finish within {timeout} s") from None

    def _outcome(self, done: Finished) -> Any:
        name = self._definition.name if self._definition is not None else "task"
        if done.state == "failed":
            raise TaskFailedError(self.id, name, done.error, done.errors)
        if done.state == "cancelled":
            raise TaskCancelledError(self.id, name, done.error, done.errors)
        text = done.result_json or "null"
        if self._definition is None:
            import json

            return json.loads(text)
        return self._definition.load_result(text)


async def _wait(client: TaskClient[Any], task_id: uuid.UUID) -> Finished:
    waiter = client.result_waiter()
    woken = waiter.watch(task_id)
    try:
        while True:
            await waiter.listening()
            woken.clear()  # cleared before the read: a notification after it is not missed
            done = await client.finished(task_id)
            if done is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            if done.state in _DONE:
                return done
            await woken.wait()
    finally:
        waiter.forget(task_id, woken)


class ResultWaiter:
    """The waits of one client on one event loop, and their LISTEN connection."""

    def __init__(self, dsn: str, channel: str) -> None:
        self._dsn = dsn
        self._channel = channel
        self._watches: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, task_id: uuid.UUID) -> asyncio.Event:
        event = asyncio.Event()
        self._watches.setdefault(task_id, set()).add(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        return event

    def forget(self, task_id: uuid.UUID, event: asyncio.Event) -> None:
        events = self._watches.get(task_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watches[task_id]
        if not self._watches and self._task is not None:
            self._task.cancel()  # the last wait is over: close the connection
            self._task = None
            self._listening.clear()

    async def listening(self) -> None:
        await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _wake_all(self) -> None:
        for events in self._watches.values():
            for e in events:
                e.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        for text in payload.split(","):
            try:
                events = self._watches.get(uuid.UUID(text))
            except ValueError:
                continue
            for e in events or ():
                e.set()

    async def _listen(self) -> None:
        delay = 0.1
        conn: Any = None
        try:
            while True:
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                try:
                    conn = await asyncpg.connect(self._dsn, timeout=10)
                    conn.add_termination_listener(functools.partial(_set_done, lost))
                    await conn.add_listener(self._channel, self._on_notify)
                    delay = 0.1
                    self._listening.set()
                    self._wake_all()  # what finished before LISTEN is read from the rows
                    await lost
                    logger.warning("results LISTEN connection lost; reconnecting")
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                    logger.warning("results LISTEN failed (%s); retrying in %.1f s", e, delay)
                self._listening.clear()
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        finally:
            self._listening.clear()
            if conn is not None and not conn.is_closed():
                conn.terminate()


def _set_done(fut: asyncio.Future[None], _conn: Any) -> None:
    if not fut.done():
        fut.set_result(None)

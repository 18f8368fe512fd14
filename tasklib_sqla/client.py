"""``TaskClient``: submitting and inspecting tasks for one engine, model and registry.

The module-level functions (``submit_task``, ``add_task``, ``get_task``, ...) use the client that
:func:`init` installs. Nothing requires that global: a ``TaskClient`` built explicitly does all
the same, for any model made from ``TaskMixin``.
"""

from __future__ import annotations

import asyncio
import typing
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from . import admin as _admin
from . import inspection as _inspect
from . import limits as _limits
from .blocking import background
from .config import Config
from .exceptions import ConfigError
from .groups import OnFailure, TaskCall
from .limits import Limit
from .models import FINISHED_STATES, Task, TaskMixin, TaskState
from .registry import TaskDefinition, TaskRegistry, default_registry
from .results import Finished, ResultWaiter, TaskHandle
from .submit import (
    AnySession,
    AsyncAnySession,
    SyncSession,
    add_group_to,
    add_task_to,
    add_tasks_to,
    batch_values,
    group_values,
    task_values,
    unscoped,
    write_tasks,
)
from .urls import async_url, asyncpg_dsn

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=TaskMixin)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

TaskId = uuid.UUID | str


class ById(Protocol[T_co]):
    """An operation on one task, by id: a plain call with a sync ``Session`` (in the caller's
    transaction), awaitable with an ``AsyncSession`` or with no session (one of its own)."""

    @overload
    def __call__(self, task_id: TaskId, session: SyncSession) -> T_co: ...
    @overload
    def __call__(
        self, task_id: TaskId, session: AsyncAnySession | None = None
    ) -> Coroutine[Any, Any, T_co]: ...


class _ById:
    # One implementation per operation, written against a sync Session: called directly for a
    # Session, through run_sync for an AsyncSession or a short session of the client's own.
    def __init__(
        self,
        client: TaskClient[Any],
        op: Callable[[Session, TaskId], Any],
        *,
        commit: bool = False,
    ) -> None:
        self._client = client
        self._op = op
        self._commit = commit

    def __call__(self, task_id: TaskId, session: AnySession | None = None) -> Any:
        return self._client._run(lambda s: self._op(s, task_id), session, commit=self._commit)


class _Forward:
    """A module-level twin of a client operation: the installed client's, or with a caller's
    session (no engine needed) the default one's."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, task_id: TaskId, session: AnySession | None = None) -> Any:
        return getattr(_for(session), self._name)(task_id, session)


class TaskClient(Generic[M]):
    """Submit and inspect tasks of one model through one async engine.

    ``get``, ``is_completed``, ``cancel`` and ``retry`` take ``(task_id, session=None)``: with
    a sync ``Session`` they run in its transaction and return at once; with an
    ``AsyncSession``, or none (a short transaction of the client's own), they are awaited.

    ``engine`` defaults to one created from ``config.database_url`` on first use (and closed by
    :meth:`dispose`). Session-bound methods never commit: the caller's transaction decides.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        model: type[M] | None = None,
        engine: AsyncEngine | None = None,
        registry: TaskRegistry = default_registry,
    ) -> None:
        self.config = config or Config()
        self.model: type[M] = model if model is not None else typing.cast(type[M], Task)
        self.registry = registry
        self._callers_engine = engine
        self._engines = LoopEngines(self._create_engine)
        self._waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResultWaiter] = (
            weakref.WeakKeyDictionary()
        )
        m = self.model
        self.get: ById[M | None] = _ById(self, lambda s, i: _inspect.fetch_task(s, m, i))
        """``get(task_id, session=None)``: the task row, or None."""
        self.is_completed: ById[bool] = _ById(
            self, lambda s, i: _inspect.task_is_completed(s, m, i)
        )
        """``is_completed(task_id, session=None)``: TaskNotFoundError for an unknown id."""
        self.cancel: ById[bool] = _ById(
            self,
            lambda s, i: _inspect.cancel(s, m, i, self.config.results_channel),
            commit=True,
        )
        """``cancel(task_id, session=None)``: True if this call cancelled the task."""
        self.retry: ById[bool] = _ById(
            self, lambda s, i: _inspect.retry(s, m, i, self.config.notify_channel), commit=True
        )
        """``retry(task_id, session=None)``: a failed or cancelled task back to pending."""

    def _create_engine(self) -> AsyncEngine:
        if self._callers_engine is not None:
            # Another loop's twin of the caller's engine; a caller who pools nothing (NullPool:
            # tests, serverless) gets no pool here either.
            pooled = not isinstance(self._callers_engine.pool, NullPool)
            return create_async_engine(
                self._callers_engine.url.render_as_string(hide_password=False),
                **({} if pooled else {"poolclass": NullPool}),
            )
        return create_async_engine(async_url(self.config.database_url))

    @property
    def engine(self) -> AsyncEngine:
        """The engine for the running event loop.

        A caller's engine serves the first loop that uses it. Any other loop (a sync task's
        ``asyncio.run(submit_task(...))``, say) gets a small pool of its own to the same
        database, closed when that loop shuts down: connections never cross event loops.
        """
        return self._engines.get(self._callers_engine)

    async def dispose(self) -> None:
        """Close the engines this client created (never the caller's)."""
        waiter = self._waiters.pop(asyncio.get_running_loop(), None)
        if waiter is not None:
            await waiter.close()
        await self._engines.dispose()

    # -- submitting --------------------------------------------------------------------------

    def add(
        self, session: AnySession, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """Add a task to the caller's ``Session`` or ``AsyncSession``; return its handle at once.

        It is written with the session's next flush and exists only if the caller commits.
        """
        return self.add_call(session, fn, args, kwargs)

    def add_call(
        self,
        session: AnySession,
        fn: TaskDefinition[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        parent_id: uuid.UUID | None = None,
    ) -> TaskHandle[R]:
        """:meth:`add` with the call's arguments as values (and a parent, for TaskContext)."""
        task_id = add_task_to(
            session,
            self.model,
            fn,
            args,
            kwargs,
            default_max_retries=self.config.default_max_retries,
            parent_id=parent_id,
        )
        return self.handle(fn, task_id)

    async def insert(
        self,
        session: AsyncAnySession,
        fn: TaskDefinition[P, R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> TaskHandle[R]:
        """Insert a task into the caller's ``AsyncSession`` now, inside their transaction.

        :meth:`add` with the INSERT sent at once instead of at the next flush: the form a
        unique task needs there, since it learns only from the database whether its key is
        taken (its handle is then the holder's). A sync ``Session`` does this in :meth:`add`.
        """
        plain = unscoped(session)
        if not isinstance(plain, AsyncSession):
            raise TypeError("insert() takes an AsyncSession; with a Session, use add()")
        return await plain.run_sync(lambda s: self.add_call(s, fn, args, kwargs))

    def add_many(
        self, session: AnySession, fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
    ) -> list[TaskHandle[R]]:
        """Add one task per mapping of keyword arguments; all are validated before any is added."""
        ids = add_tasks_to(
            session, self.model, fn, calls, default_max_retries=self.config.default_max_retries
        )
        return [self.handle(fn, i) for i in ids]

    async def submit(
        self, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """Submit a task in a transaction of its own; return its handle once it is committed."""
        return await self.submit_call(fn, args, kwargs)

    async def submit_call(
        self,
        fn: TaskDefinition[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        parent_id: uuid.UUID | None = None,
    ) -> TaskHandle[R]:
        """:meth:`submit` with the call's arguments as values (and a parent, for TaskContext)."""
        row = task_values(
            fn,
            args,
            kwargs,
            default_max_retries=self.config.default_max_retries,
            parent_id=parent_id,
        )
        (task_id,) = await write_tasks(self.engine, self.model, [row])
        return self.handle(fn, task_id)

    async def submit_many(
        self, fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
    ) -> list[TaskHandle[R]]:
        """Submit many tasks of one kind in one statement; all or none are written."""
        rows = batch_values(fn, calls, default_max_retries=self.config.default_max_retries)
        ids = await write_tasks(self.engine, self.model, rows, batch=True)
        return [self.handle(fn, i) for i in ids]

    def submit_sync(
        self, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """:meth:`submit` for synchronous code, through the process's background loop."""
        return background.run(lambda: self.submit(fn, *args, **kwargs))

    def submit_many_sync(
        self, fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
    ) -> list[TaskHandle[R]]:
        """:meth:`submit_many` for synchronous code."""
        return background.run(lambda: self.submit_many(fn, calls))

    # -- groups ------------------------------------------------------------------------------

    def add_group(
        self,
        session: AnySession,
        members: Sequence[TaskCall[Any]],
        then: TaskDefinition[Any, R],
        arg: str,
        /,
        *,
        on_failure: OnFailure = "fail",
        **args: Any,
    ) -> TaskHandle[R]:
        """Add a group to the caller's session: ``members`` (``fn.call(...)``) run in parallel,
        then ``then`` once, with their results in order as its argument ``arg`` (``args`` are
        its other arguments). Returns the follow-up's handle. See ``tasklib_sqla.groups``."""
        rows = self._group_rows(members, then, arg, args, on_failure)
        add_group_to(session, self.model, rows)
        return self.handle(then, rows[-1]["id"])

    async def submit_group(
        self,
        members: Sequence[TaskCall[Any]],
        then: TaskDefinition[Any, R],
        arg: str,
        /,
        *,
        on_failure: OnFailure = "fail",
        **args: Any,
    ) -> TaskHandle[R]:
        """:meth:`add_group` in a transaction of its own: all the rows, or none."""
        rows = self._group_rows(members, then, arg, args, on_failure)
        async with AsyncSession(self.engine) as session, session.begin():
            add_group_to(session, self.model, rows)
        return self.handle(then, rows[-1]["id"])

    def _group_rows(
        self,
        members: Sequence[TaskCall[Any]],
        then: TaskDefinition[Any, Any],
        arg: str,
        args: dict[str, Any],
        on_failure: str,
    ) -> list[dict[str, Any]]:
        return group_values(
            members,
            then,
            arg,
            args,
            on_failure,
            default_max_retries=self.config.default_max_retries,
        )

    # -- queues ------------------------------------------------------------------------------

    async def pause_queue(self, queue: str) -> None:
        """Stop every worker from claiming tasks of ``queue``; running tasks finish.

        Takes effect with each worker's next claim after the change's notification (and at
        their next heartbeat at the latest). Tasks may still be submitted to it.
        """
        await _admin.set_paused(self.engine, self.model, queue, True, self.config.notify_channel)

    async def resume_queue(self, queue: str) -> None:
        """Let workers claim from ``queue`` again; its idle workers are woken at once."""
        await _admin.set_paused(self.engine, self.model, queue, False, self.config.notify_channel)

    async def paused_queues(self) -> list[str]:
        """The queues paused now."""
        settings = await _admin.queue_settings(self.engine, self.model)
        return [queue for queue, paused in settings.items() if paused]

    async def set_limit(
        self,
        *,
        queue: str | None = None,
        name: str | TaskDefinition[Any, Any] | None = None,
        concurrency: int | None = None,
        rate: int | None = None,
        per: float | timedelta | None = None,
    ) -> None:
        """Limit a queue or a task name across every worker, replacing its limit if it had one.

        ``concurrency``: at most that many of its tasks running at once. ``rate`` and ``per``
        (seconds or a ``timedelta``): at most ``rate`` starts in any window of ``per`` seconds.
        Either or both. Tasks running already count against it. Workers honour it from their
        next claim after the change's notification (their next heartbeat at the latest).
        """
        kind, key = _limits.target(queue, name.name if isinstance(name, TaskDefinition) else name)
        checked = _limits.settings(concurrency, rate, per)
        channel = self.config.notify_channel
        await _limits.set_limit(self.engine, self.model, channel, kind, key, *checked)

    async def remove_limit(
        self, *, queue: str | None = None, name: str | TaskDefinition[Any, Any] | None = None
    ) -> bool:
        """Remove the limit on a queue or a task name; False if it had none."""
        kind, key = _limits.target(queue, name.name if isinstance(name, TaskDefinition) else name)
        return await _limits.remove_limit(
            self.engine, self.model, self.config.notify_channel, kind, key
        )

    async def limits(self) -> list[Limit]:
        """Every limit, with the tasks running under it and its recent starts."""
        return await _limits.list_limits(self.engine, self.model)

    # -- results -----------------------------------------------------------------------------

    def handle(self, fn: TaskDefinition[Any, R], task_id: TaskId) -> TaskHandle[R]:
        """A handle on task ``task_id`` of ``fn``, whose ``result()`` waits through this client."""
        # The library's default client has no database of its own: its handles wait through
        # whatever client is installed when they are awaited.
        return TaskHandle(task_id, fn, None if self is _DEFAULT else self)

    def result_waiter(self) -> ResultWaiter:
        """The running loop's LISTEN for finished tasks (see ``results.py``)."""
        loop = asyncio.get_running_loop()
        waiter = self._waiters.get(loop)
        if waiter is None:
            url = self.engine.url.render_as_string(hide_password=False)
            waiter = ResultWaiter(asyncpg_dsn(url), self.config.results_channel)
            self._waiters[loop] = waiter
        return waiter

    async def finished(self, task_id: TaskId) -> Finished | None:
        """The outcome columns of a task (None for an unknown id), finished or not."""
        m = self.model
        query = select(m.state, cast(m.result, Text), m.error, m.errors).where(m.id == task_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return Finished(str(row[0]), row[1], row[2], list(row[3] or []))

    # -- inspecting --------------------------------------------------------------------------

    @overload
    def purge(
        self, older_than: timedelta, session: SyncSession, *, states: frozenset[TaskState] = ...
    ) -> int: ...
    @overload
    def purge(
        self,
        older_than: timedelta,
        session: AsyncAnySession | None = None,
        *,
        states: frozenset[TaskState] = ...,
    ) -> Coroutine[Any, Any, int]: ...
    def purge(
        self,
        older_than: timedelta,
        session: AnySession | None = None,
        *,
        states: frozenset[TaskState] = FINISHED_STATES,
    ) -> Any:
        """Delete tasks in ``states`` (default: all finished) that finished over ``older_than`` ago.

        Returns the number deleted. Only finished states may be purged.
        """

        def op(s: Session) -> int:
            return _inspect.purge(s, self.model, older_than=older_than, states=states)

        return self._run(op, session, commit=True)

    def _run(
        self, op: Callable[[Session], Any], session: AnySession | None, *, commit: bool
    ) -> Any:
        if session is not None:
            session = unscoped(session)
        if isinstance(session, Session):
            return op(session)
        engine = None if session is not None else self.engine
        return _inspect.run_in_session(session, engine, op, commit=commit)


class LoopEngines:
    """One engine per event loop, each closed as its loop shuts down.

    asyncpg connections belong to the loop that opened them. A pool shared across loops hands
    a connection of a finished ``asyncio.run()`` to the next one ("attached to a different
    loop", "Event loop is closed"). So each loop gets its own engine, and an async generator
    parked in that loop disposes of it when ``asyncio.run()`` (or ``Runner.close()``) shuts
    the loop's async generators down, before the loop closes.
    """

    def __init__(self, create: Callable[[], AsyncEngine]) -> None:
        self._create = create
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = (
            weakref.WeakKeyDictionary()
        )
        self._guards: set[Any] = set()
        self._home: tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncEngine] | None = None
        self._outside: AsyncEngine | None = None

    def get(self, callers: AsyncEngine | None) -> AsyncEngine:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in a loop: an engine to inspect, not to connect with yet
            if callers is not None:
                return callers
            if self._outside is None:
                self._outside = self._create()
            return self._outside
        if callers is not None:
            if self._home is None:
                self._home = (weakref.ref(loop), callers)
            if self._home[0]() is loop:
                return callers
        engine = self._by_loop.get(loop)
        if engine is None:
            engine = self._outside if self._outside is not None else self._create()
            self._outside = None
            self._by_loop[loop] = engine
            guard = _dispose_with_loop(engine, self._by_loop, loop)
            # The loop keeps only weak references to its async generators and tasks.
            self._guards.add(guard)
            task = loop.create_task(_park(guard))
            self._guards.add(task)
            task.add_done_callback(self._guards.discard)
        return engine

    async def dispose(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        # The engines of other loops cannot be closed from this one; their guards close them
        # when those loops shut down.
        engine = self._by_loop.pop(loop) if loop is not None and loop in self._by_loop else None
        if engine is not None:
            await engine.dispose()
        if self._outside is not None:
            await self._outside.dispose()
            self._outside = None


async def _dispose_with_loop(
    engine: AsyncEngine,
    registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine],
    loop: asyncio.AbstractEventLoop,
) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if registry.get(loop) is engine:
            del registry[loop]
        await engine.dispose()


async def _park(guard: AsyncIterator[None]) -> None:
    # Run the guard to its yield: from now on the loop's shutdown_asyncgens() closes it.
    await guard.__anext__()


_client: TaskClient[Any] | None = None


def init(
    config: Config | None = None,
    *,
    model: type[TaskMixin] = Task,
    engine: AsyncEngine | None = None,
    registry: TaskRegistry = default_registry,
) -> TaskClient[Any]:
    """Install the process-wide client behind ``submit_task``, ``get_task`` and friends.

    ``config`` defaults to :meth:`Config.from_env`. Calling it again replaces the client.
    """
    global _client
    _client = TaskClient(config or Config.from_env(), model=model, engine=engine, registry=registry)
    return _client


def install(client: TaskClient[Any] | None) -> TaskClient[Any] | None:
    """Make ``client`` the process-wide client (None: no client); return the one it replaces."""
    global _client
    previous, _client = _client, client
    return previous


def uninstall(client: TaskClient[Any]) -> None:
    """Remove ``client`` as the process-wide client, if it still is (a worker's, at its stop)."""
    global _client
    if _client is client:
        _client = None


def current_client() -> TaskClient[Any]:
    """The installed client, or the library's default one (``Task``, ``Config()``)."""
    return _client or _DEFAULT


def get_client() -> TaskClient[Any]:
    """The client installed by :func:`init`."""
    if _client is None:
        raise ConfigError("tasklib_sqla.init(config) has not been called")
    return _client


async def submit_task(
    fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> TaskHandle[R]:
    """Submit a task in a transaction of its own (needs :func:`init`).

    Returns its handle: the task's id (a ``uuid.UUID``) whose ``await handle.result()`` waits
    for the task and returns its result.
    """
    return await get_client().submit(fn, *args, **kwargs)


async def submit_tasks(
    fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
) -> list[TaskHandle[R]]:
    """Submit many tasks of one kind in one statement (needs :func:`init`)."""
    return await get_client().submit_many(fn, calls)


def submit_task_sync(
    fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> TaskHandle[R]:
    """:func:`submit_task` for synchronous code: Flask views, scripts, ``def`` tasks.

    Runs on one event loop on a background thread, shared by the whole process, so calls
    reuse pooled connections. Not for ``async`` code, which awaits :func:`submit_task`.
    """
    return get_client().submit_sync(fn, *args, **kwargs)


def submit_tasks_sync(
    fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
) -> list[TaskHandle[R]]:
    """:func:`submit_tasks` for synchronous code."""
    return get_client().submit_many_sync(fn, calls)


def add_task(
    session: AnySession, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> TaskHandle[R]:
    """Add a task to the caller's session, inside their transaction; return its handle at once.

    The task is written with the session's next flush and exists if and only if the caller's
    transaction commits: a rollback leaves no trace and no worker ever sees it. Works alike for
    ``Session`` and ``AsyncSession``. Without :func:`init` it uses the library's ``Task`` model.
    """
    client = _client or _DEFAULT
    return client.add(session, fn, *args, **kwargs)


async def insert_task(
    session: AsyncAnySession, fn: TaskDefinition[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> TaskHandle[R]:
    """Insert a task into the caller's ``AsyncSession`` now (see :meth:`TaskClient.insert`).

    For unique tasks in an ``AsyncSession``: the handle is the existing task's when its key is
    taken. Exists if and only if the caller's transaction commits, like :func:`add_task`.
    """
    return await (_client or _DEFAULT).insert(session, fn, *args, **kwargs)


async def submit_group(
    members: Sequence[TaskCall[Any]],
    then: TaskDefinition[Any, R],
    arg: str,
    /,
    *,
    on_failure: OnFailure = "fail",
    **args: Any,
) -> TaskHandle[R]:
    """Submit a group (see :meth:`TaskClient.submit_group`; needs :func:`init`)."""
    return await get_client().submit_group(members, then, arg, on_failure=on_failure, **args)


def add_group(
    session: AnySession,
    members: Sequence[TaskCall[Any]],
    then: TaskDefinition[Any, R],
    arg: str,
    /,
    *,
    on_failure: OnFailure = "fail",
    **args: Any,
) -> TaskHandle[R]:
    """Add a group to the caller's session (see :meth:`TaskClient.add_group`)."""
    client = _client or _DEFAULT
    return client.add_group(session, members, then, arg, on_failure=on_failure, **args)


async def pause_queue(queue: str) -> None:
    """Pause ``queue`` cluster-wide (see :meth:`TaskClient.pause_queue`; needs :func:`init`)."""
    await get_client().pause_queue(queue)


async def resume_queue(queue: str) -> None:
    """Resume ``queue`` cluster-wide (see :meth:`TaskClient.resume_queue`)."""
    await get_client().resume_queue(queue)


async def set_limit(
    *,
    queue: str | None = None,
    name: str | TaskDefinition[Any, Any] | None = None,
    concurrency: int | None = None,
    rate: int | None = None,
    per: float | timedelta | None = None,
) -> None:
    """Limit a queue or a task name cluster-wide (see :meth:`TaskClient.set_limit`)."""
    await get_client().set_limit(
        queue=queue, name=name, concurrency=concurrency, rate=rate, per=per
    )


async def remove_limit(
    *, queue: str | None = None, name: str | TaskDefinition[Any, Any] | None = None
) -> bool:
    """Remove a limit (see :meth:`TaskClient.remove_limit`)."""
    return await get_client().remove_limit(queue=queue, name=name)


def add_tasks(
    session: AnySession, fn: TaskDefinition[P, R], calls: Iterable[Mapping[str, Any]]
) -> list[TaskHandle[R]]:
    """Add many tasks of one kind to the caller's session; written in one batched INSERT."""
    return (_client or _DEFAULT).add_many(session, fn, calls)


get_task: ById[Any] = _Forward("get")
"""The task row, or None: ``await get_task(id)``, or a plain call with a sync ``Session``."""

is_completed: ById[bool] = _Forward("is_completed")
"""Whether the task completed: ``await is_completed(id)``, or a plain call with a ``Session``."""

cancel_task: ById[bool] = _Forward("cancel")
"""Cancel a pending or running task; True if this call cancelled it."""

retry_task: ById[bool] = _Forward("retry")
"""Put a failed or cancelled task back to pending with one more attempt; True if it did."""


_DEFAULT: TaskClient[Any] = TaskClient(Config())


def _for(session: AnySession | None) -> TaskClient[Any]:
    # With a caller's session no engine is needed, so init() is optional there.
    if session is None:
        return get_client()
    return _client or _DEFAULT

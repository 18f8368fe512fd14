"""Warm child processes for timed ``def`` tasks: started once, reused, killed at a deadline.

A thread cannot be stopped, a process can: a synchronous task with a timeout runs in a child
process. Starting one per task costs a fork and the child's setup (tens of milliseconds from a
preloaded forkserver, a second or more without); this pool keeps children that have started
and run one task after another, so a timed task costs a pipe round trip. A child whose task
overruns its timeout is killed (the only way to stop it) and replaced; so is one whose task
died, or that has run ``TASKS_PER_CHILD`` tasks (memory a task leaks goes with it).

Each child holds a *lifeline*, a pipe whose other end only the worker holds: when the worker
dies (even by SIGKILL), the child sees end-of-file and kills itself, so no orphan goes on
committing side effects while another worker reruns its task. It also arms its own deadline
for each task, in case the worker is alive but cannot kill it. Only JSON text and plain values
cross the pipes; the task is found in the child by its module and name, taken from the
registered definition, never from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

#: Tasks a child runs before it is replaced by a fresh one.
TASKS_PER_CHILD = 500
#: How long past its deadline a child waits for the worker to kill it before it dies anyway.
CHILD_DEADLINE_GRACE = 2.0


def process_context(preload: list[str] | None = None) -> Any:
    """The multiprocessing context for timed sync tasks.

    ``preload``: modules the forkserver imports once, before it forks any child (the modules
    of the timed sync tasks). Each child then starts as a fork of a process that has them,
    instead of importing them, SQLAlchemy and pydantic again: milliseconds instead of a second
    or more of CPU per task.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        # Only takes effect if this process has not started its forkserver yet.
        ctx.set_forkserver_preload(["tasklib_sqla.runner", *preload])
    return ctx


class ChildDied(Exception):
    """The child process ended before it answered (killed, crashed, ``os._exit``)."""


@dataclass
class Child:
    proc: Any
    conn: multiprocessing.connection.Connection
    lifeline: multiprocessing.connection.Connection
    tasks: int = field(default=0)

    def alive(self) -> bool:
        return bool(self.proc.is_alive())


class ChildPool:
    """Idle children ready for a task; at most one task per child at a time."""

    def __init__(self, ctx: Any, setup: Any = None) -> None:
        self._ctx = ctx
        #: The worker's client settings, handed to each child once (see ``child_loop``).
        self._setup = setup
        self._idle: list[Child] = []
        self._busy: set[int] = set()
        self._closed = False

    async def warm(self, n: int = 1) -> None:
        """Start ``n`` children now, so that the first tasks do not wait for them."""
        for _ in range(n):
            self._idle.append(await self._start())

    async def run(self, message: tuple[Any, ...], within: float | None) -> Any:
        """Send ``message`` to an idle child and return its answer.

        Raises ``TimeoutError`` after ``within`` seconds (the child is killed) and
        :class:`ChildDied` if the child ended without answering. Cancelled, it kills the child:
        the task goes on running otherwise.
        """
        child = await self._acquire()
        answered = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, child.conn.send, message)
            await _readable(child.conn, within)
            try:
                answer = child.conn.recv()
            except (EOFError, OSError) as exc:
                raise ChildDied(f"exit code {await _exit_code(child)}") from exc
            answered = True
            return answer
        finally:
            child.tasks += 1
            self._busy.discard(id(child))
            if answered and child.tasks < TASKS_PER_CHILD and not self._closed:
                self._idle.append(child)
            else:
                await _kill(child)

    async def close(self) -> None:
        """Kill every idle child (busy ones are killed by the task that holds them)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for child in idle:
            await _kill(child)

    async def _acquire(self) -> Child:
        while self._idle:
            child = self._idle.pop()
            if child.alive():
                self._busy.add(id(child))
                return child
            await _kill(child)
        child = await self._start()
        self._busy.add(id(child))
        return child

    async def _start(self) -> Child:
        ours, theirs = self._ctx.Pipe(duplex=True)
        life_in, life_out = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=child_loop,
            args=(theirs, life_in, self._setup),
            name="tasklib-child",
            daemon=True,
        )
        # start() talks to the forkserver and waits for it to fork: off the event loop, which
        # must keep the heartbeat going.
        await asyncio.get_running_loop().run_in_executor(None, proc.start)
        theirs.close()
        life_in.close()
        return Child(proc, ours, life_out)


async def _readable(conn: multiprocessing.connection.Connection, within: float | None) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(conn.fileno(), _resolve, ready)
    try:
        async with asyncio.timeout(within):
            await ready
    finally:
        loop.remove_reader(conn.fileno())


async def _exit_code(child: Child) -> int | None:
    await _exited(child.proc, 5)
    return child.proc.exitcode  # type: ignore[no-any-return]


async def _kill(child: Child) -> None:
    if child.alive():
        child.proc.kill()
    await _exited(child.proc, 5)
    with contextlib.suppress(OSError):
        child.conn.close()
    with contextlib.suppress(OSError):
        child.lifeline.close()


async def _exited(proc: Any, within: float) -> None:
    """Wait for a child to end without blocking the event loop (the heartbeat runs on it)."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    try:
        loop.add_reader(proc.sentinel, _resolve, gone)
    except (ValueError, OSError):  # the process was never started
        return
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await gone
    finally:
        loop.remove_reader(proc.sentinel)
    proc.join(0)  # reap it


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- in the child ---------------------------------------------------------------------------


def child_loop(
    conn: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
    setup: Any,
) -> None:
    """A child's life: set up once, then run the tasks the worker sends, one at a time."""
    _watch_lifeline(lifeline)
    if setup is not None:
        # The worker's client settings, so that tasks can submit tasks here too.
        from .client import init

        config, model = setup
        init(config, model=model)
    from .runner import run_here  # the runner imports this module

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe: done
        deadline = message[-1]
        # The child's own deadline, should the worker be unable to kill it.
        timer = threading.Timer(deadline + CHILD_DEADLINE_GRACE, _die)
        timer.daemon = True
        timer.start()
        try:
            answer = run_here(*message[:-1])
        finally:
            timer.cancel()
        conn.send(answer)


def _watch_lifeline(lifeline: multiprocessing.connection.Connection) -> None:
    """Kill this process when the worker dies (end of file on the lifeline)."""

    def watch() -> None:
        with contextlib.suppress(OSError, EOFError):
            lifeline.recv()  # nothing is ever sent: returns (raises) at end of file
        _die()

    threading.Thread(target=watch, name="tasklib-lifeline", daemon=True).start()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

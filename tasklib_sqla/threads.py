"""The threads that run ``def`` tasks, handing their outcomes back to the event loop in bunches.

``loop.run_in_executor`` hands each call over through a ``concurrent.futures`` future (a lock,
a condition, a callback) and wakes the event loop once per finished call to copy that
future's state into an asyncio one. For short sync tasks the handoff was most of what they
cost the worker: no-op calls through ten threads took 55-70 µs of process CPU each that way,
19-32 µs here (20,000 calls, ten at a time, three runs each way). A worker draining 20,000
no-op ``def`` tasks (``python -m bench.workerproc lib --kind sync``, alternating runs): at
concurrency 10, 2.49-2.77 CPU seconds against 3.71-4.60 before (the hand-written baseline's
2.62-3.13); at concurrency 100, 1.06-1.10 against 1.79-1.83, and 10,700 tasks/s against
7,600-8,000.

Here a thread that finishes a call appends the outcome to a list and wakes the loop only if
no wake-up is on its way already; the loop then settles every call that finished meanwhile in
one callback. Threads are started as calls find none idle, up to ``size``, like
``ThreadPoolExecutor``'s, and like its threads they are waited for at interpreter exit while
they still run a call (an idle thread never holds the exit up).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextvars
import threading
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

#: Every pool, for the interpreter's exit: idle threads are told to end, and threads still
#: running a call are waited for (what ``ThreadPoolExecutor`` does for its own).
_POOLS: weakref.WeakSet[TaskThreads] = weakref.WeakSet()


def _at_exit() -> None:
    pools = list(_POOLS)
    for pool in pools:
        pool._end_threads()
    for pool in pools:
        for thread in pool._threads:
            thread.join()


atexit.register(_at_exit)

_Call = tuple["asyncio.Future[Any]", contextvars.Context, Callable[..., Any], tuple[Any, ...]]
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class TaskThreads:
    """Up to ``size`` threads running calls for one event loop (see the module)."""

    def __init__(self, size: int, name: str = "tasklib") -> None:
        self._size = size
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._finished: collections.deque[_Outcome] = collections.deque()
        self._wake_pending = False
        self._closed = False
        _POOLS.add(self)

    def run(self, fn: Callable[..., Any], /, *args: Any) -> asyncio.Future[Any]:
        """Call ``fn(*args)`` on a thread, in a copy of the caller's context; its future.

        Called on the event loop's thread. Cancelling the future does not stop a call that
        has started (no thread can be stopped); its outcome is then dropped.
        """
        if self._closed:
            raise RuntimeError("the task threads are shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((future, contextvars.copy_context(), fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return future

    def shutdown(self) -> None:
        """End the threads once their current call returns; calls not started are cancelled.

        Called on the event loop's thread. Closed only once the queue is emptied here
        (``_end_threads``): a thread taking a call meanwhile still runs it and hands it back.
        """
        while True:
            try:
                call = self._calls.get_nowait()
            except Empty:
                break
            if call is not None:
                call[0].cancel()
        self._end_threads()

    def _end_threads(self) -> None:
        self._closed = True  # a call still queued is dropped by the thread that takes it
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                return
            if self._closed:  # queued before the shutdown (at the interpreter's exit)
                continue
            future, context, fn, args = call
            try:
                outcome: _Outcome = (future, context.run(fn, *args), None)
            except BaseException as exc:  # the task's SystemExit too: its outcome, not ours
                outcome = (future, None, exc)
            del call, fn, args  # not kept alive while the thread waits for the next call
            # Idle before the outcome is handed back: a caller woken by it that runs its next
            # call at once must find this thread, not start another one.
            self._idle.release()
            self._hand_back(outcome)
            del outcome, future

    def _hand_back(self, outcome: _Outcome) -> None:
        with self._lock:
            self._finished.append(outcome)
            if self._wake_pending:
                return  # the loop's callback will take this one too
            self._wake_pending = True
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop is closed: nobody waits for these outcomes any more
            with self._lock:
                self._finished.clear()
                self._wake_pending = False

    def _settle(self) -> None:
        with self._lock:
            finished = list(self._finished)
            self._finished.clear()
            self._wake_pending = False
        for future, value, exc in finished:
            if future.done():  # cancelled by its caller meanwhile
                continue
            if exc is None:
                future.set_result(value)
            elif isinstance(exc, StopIteration):  # a future refuses it (generators)
                future.set_exception(RuntimeError(f"the task raised StopIteration: {exc!r}"))
            else:
                future.set_exception(exc)

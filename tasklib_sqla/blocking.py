"""Calling the async client from synchronous code: one event loop on a thread of its own.

``submit_task_sync`` and friends hand their coroutine to a loop that runs on a background
thread for the life of the process, so synchronous callers (Flask views, scripts, sync tasks)
share one engine and its pooled connections instead of opening a connection per call, as
``asyncio.run(submit_task(...))`` must. The thread starts on first use, starts again in a
forked child (threads do not survive ``fork``: gunicorn's preloaded workers), and closes its
connections at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """An event loop on a daemon thread that runs coroutines for synchronous callers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._registered = False

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the background loop and wait for its result (or its exception)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            # Blocking here would freeze the caller's own loop while ours does the work.
            raise RuntimeError(
                "a *_sync function was called from a running event loop: await the async "
                "form (submit_task, ...) instead"
            )
        loop = self._ensure()
        return asyncio.run_coroutine_threadsafe(make(), loop).result()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="tasklib-sync", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                if not self._registered:
                    atexit.register(self.stop)
                    self._registered = True
            return self._loop

    def stop(self) -> None:
        """Close the loop's engines (their guards run at async-generator shutdown), then stop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or self._pid != os.getpid() or not thread.is_alive():
            return
        # At exit, closing connections politely is a courtesy, not a duty.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


#: The process's background loop, shared by every ``*_sync`` function.
background = BackgroundLoop()

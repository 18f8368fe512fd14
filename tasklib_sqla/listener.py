"""LISTEN for task notifications on a dedicated asyncpg connection, reconnecting on loss."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Collection
from typing import Any

import asyncpg

logger = logging.getLogger("tasklib_sqla.worker")


class Listener:
    """Calls ``wake()`` whenever a task lands on one of ``queues`` (all queues if empty).

    A lost connection is retried with a short capped backoff (a second at most: waiting costs
    one connection attempt a second, coming back late after an outage costs throughput);
    after every (re)connect ``wake()`` is called once, since notifications sent while
    disconnected are gone.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        queues: Collection[str],
        wake: Callable[[], None],
        max_backoff: float = 1.0,
        on_settings: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._queues = frozenset(queues)
        self._wake = wake
        self._max_backoff = max_backoff
        #: Called when a queue is paused or resumed (``<channel>_queues``), and after every
        #: (re)connect, since changes announced meanwhile are lost.
        self._on_settings = on_settings

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if not self._queues or payload in self._queues:
            self._wake()

    def _settings_changed(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        if self._on_settings is not None:
            self._on_settings()

    async def run(self) -> None:
        """Listen until cancelled."""
        delay = 0.2
        while True:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                conn.add_termination_listener(functools.partial(_set_done, lost))
                await conn.add_listener(self._channel, self._on_notify)
                if self._on_settings is not None:
                    await conn.add_listener(f"{self._channel}_queues", self._settings_changed)
                    self._on_settings()
                self._wake()
                delay = 0.2
                await lost
                logger.warning("LISTEN connection lost; reconnecting")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                logger.warning("LISTEN connection failed (%s); retrying in %.1f s", exc, delay)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)


def _set_done(fut: asyncio.Future[None], _conn: Any) -> None:
    if not fut.done():
        fut.set_result(None)

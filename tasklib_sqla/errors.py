"""The worker's error policy: which database errors are worth retrying, and for how long.

Every loop of the worker (startup, claim, heartbeat, rescue, finish) asks :func:`classify`
about an error and hands it to one :class:`ErrorPolicy`, so they all agree:

- ``TRANSIENT``: the server restarts, a connection was lost, a lock or statement timed out, a
  serialization failure or deadlock. Retried until it succeeds, with a short capped backoff
  (at most about a second, so a worker is back within a second or two of the server).
  An outcome is never dropped for such an error while the worker lives.
- ``FATAL``: retrying cannot help without a human: a wrong database, role, password or host,
  a missing table or column, a missing privilege. A starting worker stops at once with one
  line; a running worker keeps trying for ``Config.fatal_error_seconds`` (a migration may be
  under way) and then stops with :class:`WorkerError`.
- ``DATA``: the statement's own input was refused (a value out of range, a constraint). The
  same statement will fail again, but other statements are fine: the finisher records such an
  outcome as a failure of its task instead of retrying it.

Unreachable servers (connection refused, timeouts) count as transient, also at startup, for
``Config.startup_timeout_seconds``: a worker often starts before its database does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import time
from collections.abc import Callable

import asyncpg
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .exceptions import WorkerError

logger = logging.getLogger("tasklib_sqla.worker")


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    FATAL = "fatal"
    DATA = "data"


# SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_TRANSIENT_CLASSES = ("08", "53", "58")  # connection, insufficient resources, system error
_TRANSIENT_CODES = frozenset(
    {
        "57P01",  # admin_shutdown: the server is shutting down
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up, or in recovery
        "57P05",  # idle_session_timeout
        "57014",  # query_canceled: our statement_timeout
        "55P03",  # lock_not_available: our lock_timeout
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "25P03",  # idle_in_transaction_session_timeout
        "XX000",  # internal_error: rare, and not about our statement
    }
)
_FATAL_CLASSES = ("28", "3D", "3F", "42", "0A", "25", "2F", "39", "F0", "HV", "P0")
_DATA_CLASSES = ("22", "23", "54")

#: Errors the worker's loops catch: everything the database or the network may raise.
# SQLAlchemy before 2.0.3x lets some of asyncpg's own exceptions out unwrapped: a failed
# connect's, and InternalClientError ("another operation is in progress") from a connection
# killed mid-statement. The lowest-versions CI run met both; either used to end the worker.
DB_ERRORS = (
    SQLAlchemyError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, wrapped by SQLAlchemy or not."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        for candidate in (getattr(cur, "orig", None), cur):
            code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
            if isinstance(code, str) and len(code) == 5:
                return code
        cur = cur.__cause__
        seen += 1
    return None


def classify(exc: BaseException) -> ErrorKind:
    """Transient, fatal or data: see the module docstring."""
    code = sqlstate(exc)
    if code is not None:
        if code in _TRANSIENT_CODES or code.startswith(_TRANSIENT_CLASSES):
            return ErrorKind.TRANSIENT
        if code.startswith(_DATA_CLASSES):
            return ErrorKind.DATA
        if code.startswith(_FATAL_CLASSES):
            return ErrorKind.FATAL
        return ErrorKind.DATA
    if isinstance(exc, socket.gaierror | ArgumentError | NoSuchModuleError):
        return ErrorKind.FATAL  # a host that does not resolve, a malformed URL
    if isinstance(exc, DBAPIError):
        # No SQLSTATE: the driver's own complaint, mostly "connection is closed".
        return ErrorKind.TRANSIENT
    if isinstance(exc, OSError | TimeoutError | PoolTimeoutError | asyncio.TimeoutError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, SQLAlchemyError):
        return ErrorKind.FATAL  # a fault of ours (compilation, mapping): retrying will not help
    return ErrorKind.TRANSIENT


def one_line(exc: BaseException) -> str:
    """The first line of an error's text, without SQLAlchemy's "(driver.Error)" prefix."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if first.startswith("(") and ") " in first:
        first = first.split(") ", 1)[1]
    return first


def error_backoff(errors: int, cap: float = 1.0) -> float:
    """Seconds to wait after ``errors`` consecutive failures: 0.05, 0.1, 0.2, ... up to ``cap``.

    Pure; jitter is applied by the caller. The cap is low on purpose: waiting is cheap for a
    worker (one failed connection attempt a second), coming back late after an outage is not.
    """
    if errors < 1:
        return 0.0
    return float(min(0.05 * 2 ** min(errors - 1, 20), cap))


class ErrorPolicy:
    """Shared by a worker's loops: backs off, logs once per episode, and gives up when fatal.

    ``failed()`` waits the backoff (cut short by ``stopping`` or by :meth:`reachable`, which
    the listener calls when it reconnects); ``succeeded()`` ends an episode. A fatal error
    that lasts ``fatal_seconds`` sets :attr:`fatal` and calls ``give_up``.
    """

    def __init__(
        self,
        fatal_seconds: float,
        give_up: Callable[[WorkerError], None],
        stopping: asyncio.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fatal_seconds = fatal_seconds
        self._give_up = give_up
        self._stopping = stopping
        self._clock = clock
        self._errors: dict[str, int] = {}
        self._episode_start: float | None = None
        self._fatal_since: float | None = None
        self._back = asyncio.Event()
        self.fatal: WorkerError | None = None

    def reachable(self) -> None:
        """The database answers again (the listener reconnected): cut waits short."""
        self._back.set()

    def succeeded(self, what: str) -> None:
        if self._errors.pop(what, 0) and not self._errors and self._episode_start is not None:
            logger.warning(
                "database usable again after %.1f s", self._clock() - self._episode_start
            )
            self._episode_start = None
        if not self._errors:
            self._fatal_since = None

    async def failed(self, what: str, exc: BaseException) -> ErrorKind:
        """Log, count and wait; return the error's kind."""
        kind = classify(exc)
        n = self._errors.get(what, 0) + 1
        self._errors[what] = n
        now = self._clock()
        if self._episode_start is None:
            self._episode_start = now
        if kind is ErrorKind.FATAL:
            if self._fatal_since is None:
                self._fatal_since = now
            if now - self._fatal_since >= self.fatal_seconds and self.fatal is None:
                self.fatal = WorkerError(
                    f"giving up after {now - self._fatal_since:.0f} s: {what} failed: "
                    f"{one_line(exc)}"
                )
                logger.error("%s", self.fatal)
                self._give_up(self.fatal)
                return kind
        delay = error_backoff(n) * random.uniform(0.5, 1.0)
        # Every failure of a long outage would be noise: log the first few and then rarely.
        level = logging.WARNING if n <= 3 or n % 30 == 0 else logging.DEBUG
        logger.log(
            level,
            "%s failed (%s, %s: %s); retry %d in %.2f s",
            what,
            kind.value,
            type(exc).__name__,
            one_line(exc),
            n,
            delay,
        )
        self._back.clear()
        stop = asyncio.ensure_future(self._stopping.wait())
        back = asyncio.ensure_future(self._back.wait())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await asyncio.wait([stop, back], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            back.cancel()
        return kind

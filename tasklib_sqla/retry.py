"""Pure retry decisions: the backoff schedule and what happens after a failed attempt.

No I/O here; the worker asks, then writes the answer in one statement.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .models import TaskState

#: The longest a retry waits by default: an hour.
DEFAULT_MAX_DELAY = 3600.0


def exponent_cap(base_seconds: float, multiplier: float, max_seconds: float) -> int:
    """The smallest exponent ``n`` at which ``base * multiplier ** n`` reaches ``max_seconds``.

    Exponents past it change nothing but can overflow a float (or PostgreSQL's ``power``), so
    both this module and the rescue statement stop there.
    """
    if base_seconds <= 0 or multiplier <= 1 or max_seconds <= base_seconds:
        return 0
    return max(0, math.ceil(math.log(max_seconds / base_seconds) / math.log(multiplier)))


def backoff_delay(
    attempt: int,
    base_seconds: float,
    multiplier: float,
    max_seconds: float = DEFAULT_MAX_DELAY,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``base * multiplier ** (attempt - 1)``, at most ``max_seconds``: 5 s, 10 s, 20 s, ... with
    the defaults. Never overflows, whatever the attempt number.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    exponent = min(attempt - 1, exponent_cap(base_seconds, multiplier, max_seconds))
    return float(min(base_seconds * multiplier**exponent, max_seconds))


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do with a task whose attempt just failed."""

    state: TaskState
    #: Seconds until the next attempt may start; None when the task has failed for good.
    delay_seconds: float | None
    #: The same, as a time on the clock that was passed in.
    run_at: datetime | None

    @property
    def will_retry(self) -> bool:
        return self.state is TaskState.PENDING


def decide_retry(
    *,
    attempt: int,
    max_retries: int,
    now: datetime,
    base_seconds: float,
    multiplier: float,
    retryable: bool = True,
    max_seconds: float = DEFAULT_MAX_DELAY,
) -> RetryDecision:
    """Retry with backoff while retries remain (attempt <= max_retries), else fail for good.

    ``attempt`` is the number of the attempt that failed; ``max_retries`` counts retries after
    the first attempt, so a task runs at most ``max_retries + 1`` times. Errors that cannot
    succeed on a second try (arguments that no longer validate, a non-JSON result) pass
    ``retryable=False``.
    """
    if retryable and attempt <= max_retries:
        delay = backoff_delay(attempt, base_seconds, multiplier, max_seconds)
        return RetryDecision(TaskState.PENDING, delay, now + timedelta(seconds=delay))
    return RetryDecision(TaskState.FAILED, None, None)


def jittered(delay: float, jitter: float, max_seconds: float, rand: Callable[[], float]) -> float:
    """``delay`` spread by ``±jitter`` (a fraction), never past ``max_seconds`` nor below 0.

    A burst of tasks failing together then comes back spread out instead of in lockstep.
    ``rand`` returns a float in [0, 1) (``random.random``; fixed in tests).
    """
    if jitter <= 0 or delay <= 0:
        return delay
    spread = delay * jitter * (2 * rand() - 1)
    return max(0.0, min(delay + spread, max_seconds))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task's failed attempts are retried; ``None`` fields take the ``Config``'s value.

    ``@task(retry=RetryPolicy(base_delay=1, max_delay=60, retry_on=(httpx.HTTPError,)))``.
    ``retry_on``: only these exceptions are retried (default: every exception);
    ``no_retry_on``: these fail the task at once (checked first). Raising
    :class:`~tasklib_sqla.FailNow` fails it at once too; :class:`~tasklib_sqla.Snooze` retries
    after a delay without spending an attempt.
    """

    #: Seconds before the first retry (``Config.base_retry_delay_seconds``).
    base_delay: float | None = None
    #: Growth per retry (``Config.retry_backoff_multiplier``).
    multiplier: float | None = None
    #: The longest any retry waits (``Config.max_retry_delay_seconds``).
    max_delay: float | None = None
    #: Spread of each delay, as a fraction: 0.1 is ±10% (``Config.retry_jitter``).
    jitter: float | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    no_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.base_delay is not None and not self.base_delay >= 0:
            problems.append("base_delay must be >= 0")
        if self.multiplier is not None and not self.multiplier >= 1:
            problems.append("multiplier must be >= 1")
        if self.max_delay is not None and not self.max_delay >= 0:
            problems.append("max_delay must be >= 0")
        if self.jitter is not None and not 0 <= self.jitter <= 1:
            problems.append("jitter must be between 0 and 1")
        for name in ("retry_on", "no_retry_on"):
            kinds = getattr(self, name)
            if kinds is not None and not (
                isinstance(kinds, tuple)
                and all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds)
            ):
                problems.append(f"{name} must be a tuple of exception classes")
        if problems:
            raise ValueError("invalid RetryPolicy: " + "; ".join(problems))

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure by ``exc`` may be retried (if attempts remain)."""
        if isinstance(exc, self.no_retry_on):
            return False
        return self.retry_on is None or isinstance(exc, self.retry_on)

    def delay(
        self,
        attempt: int,
        *,
        base: float,
        multiplier: float,
        max_seconds: float,
        jitter: float,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The wait after failed attempt ``attempt``: this policy's values over the defaults."""
        b = base if self.base_delay is None else self.base_delay
        m = multiplier if self.multiplier is None else self.multiplier
        cap = max_seconds if self.max_delay is None else self.max_delay
        j = jitter if self.jitter is None else self.jitter
        return jittered(backoff_delay(attempt, b, m, cap), j, cap, rand)


#: The policy of tasks that set none: the Config's values, every exception retried.
DEFAULT_POLICY = RetryPolicy()

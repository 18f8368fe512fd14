"""Pure retry decisions: the backoff schedule and what happens after a failed attempt.

No I/O here; the worker asks, then writes the answer in one statement.
"""

from __future__ import annotations

import math
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

"""The interpreter's garbage collector while workers run: the youngest generation less often.

A claim brings a batch of tasks into the process at once, each with its asyncio task,
coroutine, arguments and record: some ten objects the collector tracks. CPython collects its
youngest generation once allocations outnumber deallocations by 700, so with batches of 100
nearly every claim set off a collection walking every task in flight, every tenth one a
larger one, and the tasks in flight at those moments were promoted to the oldest generation,
whose collections walk every object of the process (SQLAlchemy's and pydantic's included,
some 90,000). Measured on one worker process draining 20,000 no-op tasks (``gc.callbacks``):
at concurrency 100, 212 collections and 85 ms of its 0.67 CPU seconds; at concurrency 200,
315 collections and 162 ms of 0.71; with the threshold at 10,000, 14 collections and 35-52 ms.

Objects are still freed by reference counting the moment they are dropped: the threshold only
decides how long garbage in reference cycles waits, at most that many allocations' worth.
It applies while at least one worker runs in the process and is put back after the last one
stops (unless someone changed it meanwhile). ``Config.gc_threshold=None`` leaves it alone.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_running = 0
#: The thresholds before the first running worker raised them, and what it set.
_saved: tuple[int, int, int] | None = None
_set: tuple[int, int, int] | None = None


@contextlib.contextmanager
def young_threshold(threshold: int | None) -> Iterator[None]:
    """Raise the youngest generation's threshold to ``threshold`` while the block runs."""
    global _running, _saved, _set
    if threshold is None:
        yield
        return
    if _running == 0:
        current = gc.get_threshold()
        _saved = current
        _set = (max(current[0], threshold), current[1], current[2])
        gc.set_threshold(*_set)
    _running += 1
    try:
        yield
    finally:
        _running -= 1
        if _running == 0 and _saved is not None:
            if gc.get_threshold() == _set:  # not changed by someone else meanwhile
                gc.set_threshold(*_saved)
            _saved = _set = None

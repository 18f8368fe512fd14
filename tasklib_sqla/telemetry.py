"""OpenTelemetry traces and metrics, when the app has set up OpenTelemetry (extra ``otel``).

- **Traces**: submitting opens a PRODUCER span (``<task name> publish``) and stores its trace
  context on the task's row (``trace_context``); each attempt runs inside a CONSUMER span
  (``<task name> process``) that continues that trace, so a request's trace shows the tasks it
  started and what they did, whichever worker ran them. Spans the task itself opens are
  children of the attempt's span, in async and sync tasks alike.
- **Metrics** (meter ``tasklib_sqla``), by ``messaging.destination.name`` (the queue) and
  ``tasklib.task.name``: counters ``tasklib.tasks.started``, ``.completed``, ``.retried``,
  ``.failed``, ``.snoozed``; histograms ``tasklib.task.duration`` and
  ``tasklib.task.queue_wait`` (seconds from due to started); and the observable gauge
  ``tasklib.queue.depth`` (due pending tasks per queue, as the worker last counted them).

Without the ``opentelemetry-api`` package, or with no SDK provider configured (the API's
default no-op providers), every hook here returns at its first check: no spans, no
instruments, no row data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import metrics, propagate, trace
except ImportError:  # the extra is not installed
    trace = metrics = propagate = None  # type: ignore[assignment]

SYSTEM = "tasklib"
_NOOP_METER_PROVIDERS = {"_ProxyMeterProvider", "NoOpMeterProvider"}

# Set by tests (and by apps that keep providers of their own rather than global ones).
_tracer_provider: Any = None
_meter_provider: Any = None


def use_providers(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Use these providers instead of OpenTelemetry's global ones (None: the global ones)."""
    global _tracer_provider, _meter_provider, _instruments
    _tracer_provider, _meter_provider, _instruments = tracer_provider, meter_provider, None


#: The provider last looked at and its tracer (None: nobody collects spans), so that the
#: check on every submit and attempt is one identity comparison.
_tracer_for: tuple[Any, Any] = (None, None)


def _tracer() -> Any:
    global _tracer_for
    if trace is None:
        return None
    provider = _tracer_provider or trace.get_tracer_provider()
    if _tracer_for[0] is not provider:
        noop = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        _tracer_for = (provider, None if noop else provider.get_tracer("tasklib_sqla"))
    return _tracer_for[1]


def tracing() -> bool:
    """Whether spans are being collected."""
    return _tracer() is not None


# -- producer ----------------------------------------------------------------------------------


@contextlib.contextmanager
def publishing(name: str, queue: str, count: int = 1) -> Iterator[dict[str, str] | None]:
    """A PRODUCER span around a submit; yields the carrier to store on the rows (or None)."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "publish",
        "messaging.destination.name": queue,
        "tasklib.task.name": name,
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    with tracer.start_as_current_span(
        f"{name} publish", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier or None


# -- consumer ----------------------------------------------------------------------------------


@contextlib.contextmanager
def processing(
    name: str, queue: str, task_id: str, attempt: int, carrier: dict[str, str] | None
) -> Iterator[Any]:
    """A CONSUMER span for one attempt, current while the task runs; yields it (or None)."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    parent = propagate.extract(carrier) if carrier else None
    span = tracer.start_span(
        f"{name} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "messaging.message.id": task_id,
            "tasklib.task.name": name,
            "tasklib.attempt": attempt,
        },
    )
    with trace.use_span(span, end_on_exit=True):
        yield span


def mark_failed(span: Any, error_type: str, message: str) -> None:
    """Record an attempt's failure on its span."""
    if span is None:
        return
    span.set_attribute("error.type", error_type)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{error_type}: {message}"[:500]))


# -- metrics -----------------------------------------------------------------------------------


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.started = meter.create_counter("tasklib.tasks.started", unit="{task}")
        self.outcomes = {
            kind: meter.create_counter(f"tasklib.tasks.{kind}", unit="{task}")
            for kind in ("completed", "retried", "failed", "snoozed")
        }
        self.duration = meter.create_histogram("tasklib.task.duration", unit="s")
        self.queue_wait = meter.create_histogram("tasklib.task.queue_wait", unit="s")
        self.depth: dict[str, int] = {}
        meter.create_observable_gauge(
            "tasklib.queue.depth", callbacks=[self._observe_depth], unit="{task}"
        )

    def _observe_depth(self, _options: Any) -> list[Any]:
        return [
            metrics.Observation(n, {"messaging.destination.name": queue})
            for queue, n in self.depth.items()
        ]


_instruments: _Instruments | None = None


def _meters() -> _Instruments | None:
    global _instruments
    if metrics is None:
        return None
    provider = _meter_provider or metrics.get_meter_provider()
    if type(provider).__name__ in _NOOP_METER_PROVIDERS:
        return None
    if _instruments is None:
        _instruments = _Instruments(provider.get_meter("tasklib_sqla"))
    return _instruments


def measuring() -> bool:
    """Whether metrics are being collected."""
    return _meters() is not None


def _labels(name: str, queue: str) -> dict[str, str]:
    return {"messaging.destination.name": queue, "tasklib.task.name": name}


def started(name: str, queue: str, waited: float | None) -> None:
    m = _meters()
    if m is None:
        return
    labels = _labels(name, queue)
    m.started.add(1, labels)
    if waited is not None:
        m.queue_wait.record(max(0.0, waited), labels)


def finished(name: str, queue: str, kind: str, seconds: float) -> None:
    """``kind``: completed, retried, failed or snoozed."""
    m = _meters()
    if m is None:
        return
    labels = _labels(name, queue)
    m.outcomes[kind].add(1, labels)
    m.duration.record(seconds, labels)


def queue_depth(depth: dict[str, int]) -> None:
    """The due pending tasks per queue, reported by the gauge until the next count."""
    m = _meters()
    if m is not None:
        m.depth = dict(depth)

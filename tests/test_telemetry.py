"""OpenTelemetry: a trace that crosses the queue, and the worker's metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tasklib_sqla import TaskRegistry, submit_task, submit_tasks, telemetry
from tasklib_sqla.testing import TaskQueue
from tests import tasks as t


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


class Otel:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        data = self.reader.get_metrics_data()
        out: dict[tuple[tuple[str, Any], ...], Any] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        for p in m.data.data_points:
                            key = tuple(sorted((p.attributes or {}).items()))
                            out[key] = getattr(p, "value", None) or getattr(p, "count", None)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    telemetry.use_providers(o.tracer_provider, o.meter_provider)
    yield o
    telemetry.use_providers(None, None)
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


def _labels(name: str, queue: str = "default") -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({"messaging.destination.name": queue, "tasklib.task.name": name}.items()))


async def test_a_trace_crosses_the_queue(otel: Otel, tasklib: TaskQueue) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("POST /signup") as request:
        async_id = await submit_task(t.trace_async)
        await submit_task(t.trace_thread)
    row = await tasklib.aassert_submitted(t.trace_async)
    assert row.trace_context and "traceparent" in row.trace_context

    await tasklib.arun()
    trace_id = format(request.get_span_context().trace_id, "032x")
    (publish,) = otel.finished("tests.trace_async publish")
    (process,) = otel.finished("tests.trace_async process")
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert (
        publish.parent is not None and publish.parent.span_id == request.get_span_context().span_id
    )
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == str(async_id)
    assert process.attributes["tasklib.attempt"] == 1
    # Inside the task (on the event loop, and on a worker thread) the attempt's span is current.
    for name in ("tests.trace_async", "tests.trace_thread"):
        assert (await tasklib.aassert_submitted(getattr(t, name.split(".")[1]))).result == trace_id


async def test_a_batch_is_one_publish_span(otel: Otel, tasklib: TaskQueue) -> None:
    await submit_tasks(t.add, [{"a": i} for i in range(5)])
    (publish,) = otel.finished("tests.add publish")
    assert publish.attributes is not None
    assert publish.attributes["messaging.batch.message_count"] == 5
    rows = await tasklib.asubmitted(t.add)
    assert len({str(r.trace_context) for r in rows}) == 1


async def test_failures_mark_the_span_and_the_metrics_count(otel: Otel, tasklib: TaskQueue) -> None:
    await submit_task(t.always_fails, message="boom")
    await submit_task(t.add, a=1)
    await tasklib.arun(check=False)
    spans = otel.finished("tests.fail process")
    assert len(spans) == 3  # one per attempt
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert spans[-1].attributes is not None and spans[-1].attributes["error.type"] == "RuntimeError"

    fail, add = _labels("tests.fail"), _labels("tests.add")
    assert otel.points("tasklib.tasks.started") == {fail: 3, add: 1}
    assert otel.points("tasklib.tasks.retried") == {fail: 2}
    assert otel.points("tasklib.tasks.failed") == {fail: 1}
    assert otel.points("tasklib.tasks.completed") == {add: 1}
    assert otel.points("tasklib.task.duration") == {fail: 3, add: 1}  # histogram counts
    assert otel.points("tasklib.task.queue_wait")[add] == 1


async def test_the_queue_depth_gauge(otel: Otel, tasklib: TaskQueue) -> None:
    await submit_tasks(t.add.options(queue="mail"), [{"a": i} for i in range(3)])
    await submit_task(t.add.options(delay=3600), a=9)  # not due: not counted
    from tasklib_sqla import Config, TaskWorker

    worker = TaskWorker(
        Config(database_url=tasklib.config.database_url), registry=TaskRegistry(), burst=True
    )
    worker._measured = telemetry.measuring()  # what run() decides at start
    try:
        await worker._count_depth()
    finally:
        await worker._dispose()
    assert otel.points("tasklib.queue.depth") == {
        (("messaging.destination.name", "mail"),): 3,
    }


async def test_without_a_provider_nothing_is_recorded(tasklib: TaskQueue) -> None:
    assert not telemetry.tracing() and not telemetry.measuring()
    await submit_task(t.add, a=1)
    assert (await tasklib.aassert_submitted(t.add)).trace_context is None

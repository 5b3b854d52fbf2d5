"""W3C trace context end to end: publisher span -> event fields -> worker handler span.

Spans are captured with the SDK's in-memory exporter; the cross-process chain runs real worker
processes (tests/_trace_worker.py) that write their spans to files.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from agentstreams import Event, Publisher, Worker
from agentstreams.server import LocalServer
from agentstreams.tracing import current_trace_headers, tracing_available
from conftest import wait_for

WORKER_OPTIONS: dict[str, Any] = {"block_ms": 200, "probe_server": False,
                                  "retry_delay_s": 0.01, "retry_delay_max_s": 0.05}
TRACE_WORKER = Path(__file__).with_name("_trace_worker.py")
#: Two worker processes start (imports included) and hand one event along.
CHAIN_TIMEOUT_S = 60.0


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider installed globally for one test, then the previous one restored.

    OpenTelemetry allows setting the global provider only once per process, so the test
    swaps the globals (as opentelemetry's own test utilities do) and leaves the process as it
    found it: other tests keep measuring agentstreams with no provider configured.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = (otel_trace._TRACER_PROVIDER, otel_trace._TRACER_PROVIDER_SET_ONCE)
    otel_trace._TRACER_PROVIDER_SET_ONCE = Once()
    otel_trace._TRACER_PROVIDER = None
    otel_trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    otel_trace._TRACER_PROVIDER, otel_trace._TRACER_PROVIDER_SET_ONCE = saved


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Workers a test starts; stopped at teardown even when the test fails."""
    started: list[Worker] = []
    yield started
    for worker in started:
        await worker.stop(timeout_s=2)


def traceparent_of(span: otel_trace.Span) -> str:
    """The W3C traceparent of ``span`` (flags: sampled, plus random-trace-id on newer SDKs)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def entry_fields(client: aioredis.Redis, stream: str,
                       msg_id: str | None = None) -> dict[bytes, bytes]:
    """The stored fields of one entry (the first of the stream when no id is given)."""
    rows: Any = await client.xrange(stream, min=msg_id or "-", max=msg_id or "+", count=1)
    assert rows, f"no entry {msg_id} in {stream}"
    return dict(rows[0][1])


def handler_spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def wait_for_spans(exporter: InMemorySpanExporter, name: str, count: int = 1) -> None:
    async def finished() -> bool:
        return len(handler_spans(exporter, name)) >= count

    await wait_for(finished, message=f"{count} finished span(s) named {name!r}")


def test_opentelemetry_api_is_detected() -> None:
    assert tracing_available()


async def test_handler_span_is_child_of_publisher_span(
        exporter: InMemorySpanExporter, redis_url: str, stream_name: str, raw: aioredis.Redis,
        workers: list[Worker]) -> None:
    seen: list[tuple[Event, otel_trace.SpanContext]] = []
    worker = Worker(redis_url, stream_name, "g", "c1", **WORKER_OPTIONS)
    workers.append(worker)

    @worker.handler("handoff_ready")
    async def handle(event: Event) -> None:
        seen.append((event, otel_trace.get_current_span().get_span_context()))

    await worker.start()
    tracer = otel_trace.get_tracer("test")
    with tracer.start_as_current_span("user request") as root:
        msg_id = await Publisher(raw, stream_name).publish("handoff_ready", {"task": "t1"})
        expected_tp = traceparent_of(root)

    # The context travels as a plain field of the entry.
    assert (await entry_fields(raw, stream_name, msg_id))[b"_tp"].decode() == expected_tp

    await wait_for_spans(exporter, "handoff_ready process")
    [span] = handler_spans(exporter, "handoff_ready process")
    root_context = root.get_span_context()
    assert span.context is not None
    assert span.context.trace_id == root_context.trace_id
    assert span.parent is not None
    assert span.parent.span_id == root_context.span_id
    assert span.parent.is_remote
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == msg_id
    assert span.attributes["messaging.destination.name"] == stream_name
    assert span.attributes["messaging.consumer.group.name"] == "g"
    assert span.attributes["agentstreams.consumer"] == "c1"
    # Inside the handler, the handler span is the current span (what the handler's own spans
    # and its publishes attach to).
    [(event, current)] = seen
    assert event.traceparent == expected_tp
    assert current.span_id == span.context.span_id


async def test_untraced_event_starts_a_new_trace_even_if_the_worker_started_in_a_span(
        exporter: InMemorySpanExporter, redis_url: str, stream_name: str, raw: aioredis.Redis,
        workers: list[Worker]) -> None:
    worker = Worker(redis_url, stream_name, "g", **WORKER_OPTIONS)
    workers.append(worker)

    @worker.handler()
    async def handle(event: Event) -> None:
        return None

    tracer = otel_trace.get_tracer("test")
    # Tasks copy the context they are created in: a worker started inside a span must not make
    # every handler span a child of that (long-finished) start-up span.
    with tracer.start_as_current_span("application start-up"):
        await worker.start()
    msg_id = await Publisher(raw, stream_name).publish("state_changed", {"k": "v"})
    assert b"_tp" not in await entry_fields(raw, stream_name, msg_id)

    await wait_for_spans(exporter, "state_changed process")
    [span] = handler_spans(exporter, "state_changed process")
    assert span.parent is None


async def test_publish_outside_a_span_writes_no_trace_fields(
        redis_url: str, stream_name: str, raw: aioredis.Redis) -> None:
    assert current_trace_headers() == (None, None)
    msg_id = await Publisher(raw, stream_name).publish("tool_result", {"r": 1})
    ids = await Publisher(raw, stream_name).publish_many([{"type": "tool_result", "r": 2}])
    for entry_id in (msg_id, *ids):
        fields = await entry_fields(raw, stream_name, entry_id)
        assert b"_tp" not in fields
        assert b"_tstate" not in fields


async def test_tracestate_and_batches_carry_the_context(
        exporter: InMemorySpanExporter, redis_url: str, stream_name: str,
        raw: aioredis.Redis) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    parent = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C,
                         span_id=0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "opaque")]))
    with otel_trace.use_span(NonRecordingSpan(parent)):
        ids = await Publisher(raw, stream_name).publish_many(
            [{"type": "tool_result", "n": n} for n in range(3)])
    for entry_id in ids:
        fields = await entry_fields(raw, stream_name, entry_id)
        assert fields[b"_tp"] == b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        assert fields[b"_tstate"] == b"vendor=opaque"


async def test_failed_handler_span_records_the_error_and_the_retry_stays_in_the_trace(
        exporter: InMemorySpanExporter, redis_url: str, stream_name: str, raw: aioredis.Redis,
        workers: list[Worker]) -> None:
    worker = Worker(redis_url, stream_name, "g", max_deliveries=2, **WORKER_OPTIONS)
    workers.append(worker)

    @worker.handler("tool_result")
    async def handle(event: Event) -> None:
        if event.delivery_count == 1:
            raise RuntimeError("tool timed out")

    await worker.start()
    with otel_trace.get_tracer("test").start_as_current_span("request") as root:
        await Publisher(raw, stream_name).publish("tool_result", {"r": 1})

    await wait_for_spans(exporter, "tool_result process", count=2)
    first, second = sorted(handler_spans(exporter, "tool_result process"),
                           key=lambda s: s.start_time or 0)
    assert first.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" and e.attributes is not None
               and e.attributes["exception.message"] == "tool timed out" for e in first.events)
    assert second.status.status_code is StatusCode.UNSET
    assert first.attributes is not None
    assert second.attributes is not None
    assert (first.attributes["agentstreams.delivery_count"],
            second.attributes["agentstreams.delivery_count"]) == (1, 2)
    for span in (first, second):
        assert span.context is not None
        assert span.parent is not None
        assert span.context.trace_id == root.get_span_context().trace_id
        assert span.parent.span_id == root.get_span_context().span_id


async def test_handoff_chain_in_one_process_is_one_trace(
        exporter: InMemorySpanExporter, redis_url: str, stream_name: str, raw: aioredis.Redis,
        workers: list[Worker]) -> None:
    first_stream, second_stream = stream_name, f"{stream_name}-next"
    planner = Worker(redis_url, first_stream, "planner", **WORKER_OPTIONS)
    writer = Worker(redis_url, second_stream, "writer", **WORKER_OPTIONS)
    workers.extend([planner, writer])

    @planner.handler("handoff_ready")
    async def plan(event: Event) -> None:
        await Publisher(planner.client, second_stream).publish(
            "agent_completed", {"task": event["task"]})

    @writer.handler("agent_completed")
    async def write(event: Event) -> None:
        return None

    await planner.start()
    await writer.start()
    with otel_trace.get_tracer("test").start_as_current_span("request") as root:
        await Publisher(raw, first_stream).publish("handoff_ready", {"task": "t"})
    await wait_for_spans(exporter, "agent_completed process")
    [a] = handler_spans(exporter, "handoff_ready process")
    [b] = handler_spans(exporter, "agent_completed process")
    assert a.context is not None
    assert b.context is not None
    assert a.parent is not None
    assert b.parent is not None
    trace_id = root.get_span_context().trace_id
    assert a.context.trace_id == b.context.trace_id == trace_id
    assert a.parent.span_id == root.get_span_context().span_id
    assert b.parent.span_id == a.context.span_id


async def test_handoff_chain_across_processes_is_one_trace(
        exporter: InMemorySpanExporter, valkey_server: LocalServer, stream_name: str,
        tmp_path: Path) -> None:
    url = valkey_server.url
    first, second = f"{stream_name}-a", f"{stream_name}-b"
    a_spans, b_spans = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    client = aioredis.Redis.from_url(url)
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, str(TRACE_WORKER), url, first,
                                             str(a_spans), second),
        await asyncio.create_subprocess_exec(sys.executable, str(TRACE_WORKER), url, second,
                                             str(b_spans)),
    ]
    try:
        # The workers' groups start at 0, so publishing before they are up loses nothing.
        with otel_trace.get_tracer("test").start_as_current_span("user request") as root:
            await Publisher(client, first).publish("handoff_ready", {"task": "t1"})
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)),
                                       CHAIN_TIMEOUT_S)
        assert codes == [0, 0]
        [a] = [json.loads(line) for line in a_spans.read_text().splitlines()]
        [b] = [json.loads(line) for line in b_spans.read_text().splitlines()]
        next_fields = await entry_fields(client, second)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await client.delete(first, second)
        await client.aclose()

    root_context = root.get_span_context()
    trace_id = f"{root_context.trace_id:032x}"
    assert a["name"] == b["name"] == "handoff_ready process"
    assert a["kind"] == b["kind"] == "CONSUMER"
    assert a["trace_id"] == b["trace_id"] == trace_id
    assert a["parent_span_id"] == f"{root_context.span_id:016x}"
    assert b["parent_span_id"] == a["span_id"]
    # Worker A's publish, made inside its handler span, carried that span's context.
    assert next_fields[b"_tp"].decode() == f"00-{trace_id}-{a['span_id']}-{a['trace_flags']}"
    assert a["attributes"]["messaging.destination.name"] == first
    assert b["attributes"]["messaging.destination.name"] == second

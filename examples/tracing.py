"""Trace context across a handoff: the handler's span is a child of the publisher's span.

Run: python examples/tracing.py   (uses $REDIS_URL or an embedded Valkey; extra ``otel`` plus
the OpenTelemetry SDK, which your application brings)
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from _server import server_url, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentstreams import AgentCoordinator, Event, Worker


async def main(url: str) -> None:
    exporter = InMemorySpanExporter()  # in production: an OTLP exporter
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("example")

    stream = f"example:{uuid.uuid4().hex[:8]}"
    worker = Worker(url, stream, "researchers")
    handled: list[str] = []

    @worker.handler("handoff_ready")
    async def on_handoff(event: Event) -> None:
        handled.append(event.msg_id)

    async with AgentCoordinator(url, stream) as producer, worker:
        with tracer.start_as_current_span("user request"):
            await producer.publish_handoff_ready("triage", "research", "s1", {"q": "streams"})
        await wait_until(lambda: len(handled) == 1)
    provider.shutdown()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request, handler = spans["user request"], spans["handoff_ready process"]
    assert request.context is not None
    assert handler.context is not None
    print(f"publisher span  trace {request.context.trace_id:032x} span "
          f"{request.context.span_id:016x}")
    parent = handler.parent.span_id if handler.parent else 0
    print(f"handler span    trace {handler.context.trace_id:032x} parent {parent:016x}")
    print(f"one trace: {request.context.trace_id == handler.context.trace_id}, "
          f"handler is the child: {parent == request.context.span_id}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    with server_url() as url:
        asyncio.run(main(url))

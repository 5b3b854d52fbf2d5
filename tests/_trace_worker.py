"""A traced worker in its own process, for test_tracing's cross-process handoff chain.

usage: python _trace_worker.py REDIS_URL STREAM SPANS_FILE [NEXT_STREAM]

Handles one ``handoff_ready`` event on STREAM (group ``g``); with NEXT_STREAM it publishes the
next handoff there from inside its handler, so the next worker's span is a child of this one.
Then it stops and writes its finished spans to SPANS_FILE as JSON lines (ids in hex). Exits 1
when no event arrives within TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentstreams import Event, Publisher, Worker

TIMEOUT_S = 30.0


async def main(redis_url: str, stream: str, spans_file: Path, next_stream: str | None) -> int:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": f"worker-{stream}"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    done = asyncio.Event()
    worker = Worker(redis_url, stream, "g", block_ms=200, probe_server=False)

    @worker.handler("handoff_ready")
    async def handle(event: Event) -> None:
        if next_stream is not None:
            await Publisher(worker.client, next_stream).publish(
                "handoff_ready", {"from_agent": stream, "task": event["task"]})
        done.set()

    await worker.start()
    try:
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
    except TimeoutError:
        return 1
    finally:
        await worker.stop(timeout_s=5)
    with spans_file.open("w") as out:
        for span in exporter.get_finished_spans():
            context = span.get_span_context()
            assert context is not None
            out.write(json.dumps({
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}",
                "trace_flags": f"{int(context.trace_flags):02x}",
                "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "attributes": dict(span.attributes or {}),
            }) + "\n")
    provider.shutdown()
    return 0


if __name__ == "__main__":
    url, stream_arg, spans_arg = sys.argv[1:4]
    next_arg = sys.argv[4] if len(sys.argv) > 4 else None
    sys.exit(asyncio.run(main(url, stream_arg, Path(spans_arg), next_arg)))

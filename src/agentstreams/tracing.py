"""W3C trace context across processes (extra ``otel``; OpenTelemetry API only).

Publishers write the current span's ``traceparent``/``tracestate`` into the event; a worker
runs each handler inside a span whose parent is that context, so a chain of handoffs across
processes is one trace. Without the OpenTelemetry API installed everything here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentstreams.events import Event

__all__ = ["current_trace_headers", "handler_span", "tracing_available"]

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace

    _AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    _AVAILABLE = False

_TRACER_NAME = "agentstreams"


def tracing_available() -> bool:
    """True when the OpenTelemetry API is importable."""
    return _AVAILABLE


def current_trace_headers() -> tuple[str | None, str | None]:
    """(traceparent, tracestate) of the active span, or (None, None) when there is none."""
    if not _AVAILABLE:
        return None, None
    span = _otel_trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None, None
    carrier: dict[str, str] = {}
    _otel_propagate.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate")


@contextlib.contextmanager
def handler_span(event: Event, *, group: str, consumer: str) -> Iterator[Any]:
    """A CONSUMER span for one handler call, child of the publisher's context when present."""
    if not _AVAILABLE:
        yield None
        return
    # The parent is the event's context and nothing else: worker tasks inherit the context the
    # worker was started in, and an untraced event must start its own trace, not become a child
    # of whatever span happened to be current at start-up.
    parent = _otel_context.Context()
    if event.traceparent:
        carrier = {"traceparent": event.traceparent}
        if event.tracestate:
            carrier["tracestate"] = event.tracestate
        parent = _otel_propagate.extract(carrier, context=parent)
    tracer = _otel_trace.get_tracer(_TRACER_NAME)
    token = _otel_context.attach(parent)
    try:
        with tracer.start_as_current_span(
            f"{event.type} process",
            kind=_otel_trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.destination.name": event.stream,
                "messaging.consumer.group.name": group,
                "messaging.message.id": event.msg_id,
                "agentstreams.consumer": consumer,
                "agentstreams.event_type": event.type,
                "agentstreams.delivery_count": event.delivery_count,
            },
        ) as span:
            yield span
    finally:
        _otel_context.detach(token)

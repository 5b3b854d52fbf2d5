"""W3C trace context across processes (extra ``otel``; OpenTelemetry API only).

Publishers write the current span's ``traceparent``/``tracestate`` into the event; a worker
runs each handler inside a span whose parent is that context, so a chain of handoffs across
processes is one trace. Without the OpenTelemetry API installed everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentstreams._events import Event

__all__ = ["NO_SPAN", "current_trace_headers", "handler_span", "tracing_available"]

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace

    _AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    _AVAILABLE = False

_TRACER_NAME = "agentstreams"
#: Returned by ``handler_span`` when there is nothing to trace (reusable: it holds no state).
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
#: What ``handler_span`` returns when there is nothing to trace (callers may skip the ``with``).
NO_SPAN = _NO_SPAN
#: Set once a real tracer provider is seen (OpenTelemetry lets it be set only once).
_provider_seen = False
_MISSING = object()
#: A provider named in the environment is installed by the API on first use.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def _provider_configured() -> bool:
    """True once a tracer provider (an SDK) is installed; cheap while none is.

    Without a provider every span is a no-op, so the per-event span can be skipped entirely.
    """
    global _provider_seen
    if _provider_seen:
        return True
    # The API keeps the installed provider in a module global; read it without the environment
    # lookup ``get_tracer_provider()`` does on every call (fall back to it if the global moves).
    installed = getattr(_otel_trace, "_TRACER_PROVIDER", _MISSING)
    if installed is None and not _PROVIDER_FROM_ENV:
        return False
    if isinstance(_otel_trace.get_tracer_provider(), _otel_trace.ProxyTracerProvider):
        return False
    _provider_seen = True
    return True


def tracing_available() -> bool:
    """True when the OpenTelemetry API is importable."""
    return _AVAILABLE


def current_trace_headers() -> tuple[str | None, str | None]:
    """(traceparent, tracestate) of the active span, or (None, None) when there is none."""
    if not _AVAILABLE or not _otel_context.get_current():  # empty context: no span to carry
        return None, None
    span = _otel_trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None, None
    carrier: dict[str, str] = {}
    _otel_propagate.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate")


def handler_span(event: Event, *, group: str, consumer: str) -> AbstractContextManager[Any]:
    """A CONSUMER span for one handler call, child of the publisher's context when present.

    Near-free when there is nothing to trace: no OpenTelemetry API, or no provider installed,
    an event without trace headers and an empty current context (then the span would be a
    no-op that changes nothing the handler can observe).
    """
    if not _AVAILABLE:
        return _NO_SPAN
    if (not event.traceparent and not _provider_configured()
            and not _otel_context.get_current()):
        return _NO_SPAN
    return _handler_span(event, group=group, consumer=consumer)


@contextlib.contextmanager
def _handler_span(event: Event, *, group: str, consumer: str) -> Iterator[Any]:
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

"""``PrometheusObserver``: what *this process* does, counted through the observer hooks."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from agentstreams._observe import Observer

__all__ = ["DEFAULT_NAMESPACE", "HANDLER_DURATION_BUCKETS_S", "PrometheusObserver"]

#: Prefix of every metric name.
DEFAULT_NAMESPACE = "agentstreams"
#: Handlers run from milliseconds (tool results) to minutes (LLM calls); buckets cover both.
HANDLER_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)

M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """Label children of one metric, cached: ``labels()`` costs a lock and a dict build."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def get(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class PrometheusObserver(Observer):
    """Counts runtime events and times handlers into a Prometheus registry.

    Counters are labelled by ``stream`` and ``group`` (plus ``event_type`` or ``reason`` where
    the hook gives one); event types become label values, so keep their number bounded.
    One instance per registry: metric names can be registered only once.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.namespace = namespace

        def counter(name: str, doc: str, *labels: str) -> _Children[Counter]:
            return _Children(Counter(name, doc, labels, namespace=namespace,
                                     registry=self.registry))

        sg = ("stream", "group")
        self._published = counter("events_published", "Events appended to a stream.", "stream")
        self._delivered = counter("events_delivered",
                                  "Entries read by a consumer of the group.", *sg)
        self._acked = counter("events_acknowledged", "Entries acknowledged (XACK).", *sg)
        self._retried = counter("events_retried",
                                "Handler failures that will be delivered again.",
                                *sg, "event_type")
        self._dead_lettered = counter("events_dead_lettered",
                                      "Entries moved to the dead-letter stream.", *sg, "reason")
        self._malformed = counter("events_malformed", "Entries that could not be decoded.", *sg)
        self._unhandled = counter("events_unhandled",
                                  "Events of a type no handler of the group takes (acknowledged "
                                  "and skipped).", *sg, "event_type")
        self._lost = counter("events_lost",
                             "Pending entries deleted or trimmed before anyone acknowledged "
                             "them.", *sg)
        self._claimed = counter("events_claimed",
                                "Entries claimed from consumers that held them past the "
                                "visibility timeout.", *sg)
        self._reconnects = counter("reconnects", "Times a consumer lost its connection and "
                                                 "reconnected.", *sg)
        self._task_restarts = counter("worker_task_restarts",
                                      "Worker background tasks restarted after an unexpected "
                                      "exception (logged with its traceback).", *sg, "task")
        self._handler_duration = _Children(Histogram(
            "handler_duration_seconds", "Time a handler ran, by outcome (ok or error).",
            (*sg, "event_type", "outcome"), namespace=namespace, registry=self.registry,
            buckets=HANDLER_DURATION_BUCKETS_S))

    def on_published(self, stream: str, count: int) -> None:
        self._published.get(stream).inc(count)

    def on_delivered(self, stream: str, group: str, count: int) -> None:
        self._delivered.get(stream, group).inc(count)

    def on_acked(self, stream: str, group: str, count: int) -> None:
        self._acked.get(stream, group).inc(count)

    def on_retried(self, stream: str, group: str, event_type: str) -> None:
        self._retried.get(stream, group, event_type).inc()

    def on_dead_lettered(self, stream: str, group: str, reason: str) -> None:
        self._dead_lettered.get(stream, group, reason).inc()

    def on_malformed(self, stream: str, group: str) -> None:
        self._malformed.get(stream, group).inc()

    def on_unhandled(self, stream: str, group: str, event_type: str) -> None:
        self._unhandled.get(stream, group, event_type).inc()

    def on_lost(self, stream: str, group: str, count: int) -> None:
        self._lost.get(stream, group).inc(count)

    def on_claimed(self, stream: str, group: str, count: int) -> None:
        self._claimed.get(stream, group).inc(count)

    def on_reconnect(self, stream: str, group: str) -> None:
        self._reconnects.get(stream, group).inc()

    def on_task_restarted(self, stream: str, group: str, task: str) -> None:
        self._task_restarts.get(stream, group, task).inc()

    def on_handler_done(self, stream: str, group: str, event_type: str, duration_s: float,
                        ok: bool) -> None:
        self._handler_duration.get(stream, group, event_type,
                                   "ok" if ok else "error").observe(duration_s)

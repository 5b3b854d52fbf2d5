"""Prometheus metrics (extra ``metrics``): runtime counters, handler durations, lag and pending.

Two sources feed one registry:

* ``PrometheusObserver`` counts what *this process* does (published, delivered, acknowledged,
  retried, dead-lettered, ...) through the ``agentstreams.Observer`` hooks.
* ``StreamStatsCollector`` asks *the server* at scrape time: consumer lag, pending entries, the
  age of the oldest unacknowledged entry, stream and dead-letter lengths. A process that
  consumes nothing (``agentstreams metrics``) can export them for every stream of a server.

``serve_metrics`` puts a registry on an HTTP endpoint; ``attach_worker_metrics`` does all three
for a worker::

    with attach_worker_metrics(worker, 9100, redis_url=url):
        await worker.run()
"""

try:
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "agentstreams.metrics needs prometheus-client: pip install 'agentstreams[metrics]'"
    ) from exc

from agentstreams.metrics._collector import StreamStatsCollector
from agentstreams.metrics._endpoint import (
    MetricsServer,
    WorkerMetrics,
    attach_worker_metrics,
    serve_metrics,
)
from agentstreams.metrics._observer import HANDLER_DURATION_BUCKETS_S, PrometheusObserver

__all__ = [
    "HANDLER_DURATION_BUCKETS_S",
    "MetricsServer",
    "PrometheusObserver",
    "StreamStatsCollector",
    "WorkerMetrics",
    "attach_worker_metrics",
    "serve_metrics",
]

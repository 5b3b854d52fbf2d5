"""Prometheus metrics (extra ``metrics``): runtime counters, handler durations, lag and pending.

Two sources feed one registry:

* ``PrometheusObserver`` counts what *this process* does (published, delivered, acknowledged,
  retried, dead-lettered, ...) through the ``agentstreams._observe.Observer`` hooks.
* ``StreamStatsCollector`` asks *the server* at scrape time (XINFO GROUPS, XPENDING, XLEN):
  consumer lag, pending entries, the age of the oldest unacknowledged entry, stream and
  dead-letter lengths. Every scrape is fresh, and a process that consumes nothing (``agentstreams
  metrics``) can export them for every stream of a server.

A worker exposes both with ``attach_worker_metrics(worker, port)``, or by hand::

    worker = Worker(url, "jobs", "workers", observer=PrometheusObserver())
    serve_metrics(9100)
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from wsgiref.simple_server import WSGIServer

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "agentstreams.metrics needs prometheus-client: pip install 'agentstreams[metrics]'"
    ) from exc

import redis
import redis.exceptions as redis_exc
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentstreams._connection import ConnectionSettings, redact_url
from agentstreams._constants import DLQ_SUFFIX
from agentstreams._observe import Observer, get_observer, set_observer
from agentstreams._streams import dlq_key, first_field, stream_id_key, to_str
from agentstreams.errors import InvalidArgumentError

if TYPE_CHECKING:
    from agentstreams._worker import Worker

__all__ = [
    "HANDLER_DURATION_BUCKETS_S",
    "MetricsServer",
    "PrometheusObserver",
    "StreamStatsCollector",
    "WorkerMetrics",
    "attach_worker_metrics",
    "serve_metrics",
]

logger = logging.getLogger("agentstreams.metrics")

DEFAULT_NAMESPACE = "agentstreams"
#: Handlers run from milliseconds (tool results) to minutes (LLM calls); buckets cover both.
HANDLER_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)
#: A scrape must answer well inside Prometheus' default 10 s scrape timeout, also when the
#: server is down or paused: every command gets this long, and is never retried.
SCRAPE_SOCKET_TIMEOUT_S = 2.0
#: Streams examined per scrape at most, so a server with millions of streams cannot turn one
#: scrape into a flood of commands (and of time series).
DEFAULT_MAX_STREAMS = 1000
#: SCAN COUNT hint when discovering streams.
SCAN_COUNT = 1000
#: How long ``MetricsServer.close()`` waits for the server thread.
SERVER_JOIN_TIMEOUT_S = 5.0

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

    def on_handler_done(self, stream: str, group: str, event_type: str, duration_s: float,
                        ok: bool) -> None:
        self._handler_duration.get(stream, group, event_type,
                                   "ok" if ok else "error").observe(duration_s)


# --------------------------------------------------------------------------- server-side stats


def dlq_owner(key: str) -> str | None:
    """The stream whose dead-letter stream ``key`` is (``{jobs}:dlq`` -> ``jobs``), else None."""
    suffix = ":" + DLQ_SUFFIX
    if not key.endswith(suffix):
        return None
    base = key[:-len(suffix)]
    candidates = [base]
    if base.startswith("{") and base.endswith("}"):
        candidates.insert(0, base[1:-1])
    for candidate in candidates:
        if candidate and dlq_key(candidate) == key:
            return candidate
    return None


@dataclass(slots=True)
class _GroupStats:
    name: str
    consumers: int
    pending: int
    lag: int | None
    oldest_pending_age_s: float = 0.0


@dataclass(slots=True)
class _StreamStats:
    name: str
    #: None for a dead-letter stream whose original stream no longer exists
    length: int | None
    dead_letters: int = 0
    groups: list[_GroupStats] = field(default_factory=list)


class StreamStatsCollector(Collector):
    """Reads lag, pending and lengths from the server at scrape time.

    ``streams`` names the streams to report; None reports every stream found by
    ``SCAN ... TYPE stream`` (dead-letter streams are reported as the ``dead_letters`` gauge of
    the stream they belong to, not as streams). Uses a synchronous client because Prometheus
    scrapes run in the HTTP server's threads, with a short timeout and no retries so a dead
    server makes ``agentstreams_up`` 0 instead of hanging the scrape.
    """

    def __init__(self, redis_url: str, streams: Iterable[str] | None = None, *,
                 namespace: str = DEFAULT_NAMESPACE,
                 socket_timeout_s: float = SCRAPE_SOCKET_TIMEOUT_S,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        if socket_timeout_s <= 0:
            raise InvalidArgumentError("socket_timeout_s must be positive")
        if max_streams < 1:
            raise InvalidArgumentError("max_streams must be >= 1")
        ConnectionSettings(url=redis_url)  # the same URL checks and messages as everywhere else
        self.redis_url = redis_url
        self.namespace = namespace
        self.max_streams = max_streams
        self._streams: list[str] | None = list(dict.fromkeys(streams)) if streams is not None \
            else None
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                redis_url, socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
                client_name="agentstreams-metrics")
        except ValueError as exc:
            raise InvalidArgumentError(f"invalid redis URL {redact_url(redis_url)!r}: {exc}") \
                from exc
        self._lock = threading.Lock()
        self._was_up: bool | None = None
        self._warned_truncated = False

    @property
    def streams(self) -> list[str] | None:
        """The streams reported (None: every stream on the server)."""
        return None if self._streams is None else list(self._streams)

    def add_streams(self, *streams: str) -> None:
        """Report these streams too (no effect when reporting every stream)."""
        with self._lock:
            if self._streams is not None:
                for stream in streams:
                    if stream not in self._streams:
                        self._streams.append(stream)

    def close(self) -> None:
        """Close the client's connections (a later scrape reconnects)."""
        self._client.close()

    # -- prometheus_client.registry.Collector

    def describe(self) -> list[Metric]:
        """The metric names, without asking the server (called once at registration)."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """Read the stats from the server and yield them as gauges."""
        with self._lock:
            started = time.perf_counter()
            stats: list[_StreamStats] | None = None
            try:
                stats = self._read_stats()
            except (redis_exc.RedisError, OSError) as exc:
                if self._was_up is not False:
                    logger.warning("metrics: cannot read stream stats from %s (%s); "
                                   "exporting %s_up 0", redact_url(self.redis_url), exc,
                                   self.namespace, extra={"redis_url": redact_url(self.redis_url)})
                self._was_up = False
            else:
                if self._was_up is False:
                    logger.info("metrics: the server at %s answers again",
                                redact_url(self.redis_url),
                                extra={"redis_url": redact_url(self.redis_url)})
                self._was_up = True
            families = self._families()
            families["up"].add_metric([], 1.0 if stats is not None else 0.0)
            for stream in stats or ():
                if stream.length is not None:
                    families["stream_length"].add_metric([stream.name], stream.length)
                families["dead_letters"].add_metric([stream.name], stream.dead_letters)
                for group in stream.groups:
                    labels = [stream.name, group.name]
                    families["pending"].add_metric(labels, group.pending)
                    families["consumers"].add_metric(labels, group.consumers)
                    families["oldest_pending_age"].add_metric(labels, group.oldest_pending_age_s)
                    if group.lag is not None:  # unknown after deletions inside the range
                        families["lag"].add_metric(labels, group.lag)
            families["scrape_duration"].add_metric([], time.perf_counter() - started)
        yield from families.values()

    def _families(self) -> dict[str, GaugeMetricFamily]:
        """Empty gauge families, keyed by a short name."""
        ns = self.namespace
        sg = ["stream", "group"]
        specs: list[tuple[str, str, str, list[str]]] = [
            ("up", "up", "1 when the last scrape could read the server's stream stats, else 0.",
             []),
            ("stream_length", "stream_length", "Entries in the stream (XLEN).", ["stream"]),
            ("dead_letters", "dead_letters",
             "Entries in the stream's dead-letter stream ({stream}:dlq).", ["stream"]),
            ("lag", "consumer_group_lag",
             "Entries not yet delivered to the group (XINFO GROUPS lag).", sg),
            ("pending", "consumer_group_pending",
             "Entries delivered to the group and not yet acknowledged.", sg),
            ("consumers", "consumer_group_consumers", "Consumers registered in the group.", sg),
            ("oldest_pending_age", "consumer_group_oldest_pending_age_seconds",
             "Age of the oldest unacknowledged entry of the group (0 when none is pending).", sg),
            ("scrape_duration", "stream_stats_scrape_duration_seconds",
             "Time spent reading stream stats from the server.", []),
        ]
        return {key: GaugeMetricFamily(f"{ns}_{name}", doc, labels=labels)
                for key, name, doc, labels in specs}

    # -- reading the server

    def _discover(self) -> tuple[list[str], dict[str, str]]:
        """(streams to report, {dead-letter key: owning stream}) found by SCAN."""
        streams: list[str] = []
        dlqs: dict[str, str] = {}
        for raw_key in self._client.scan_iter(count=SCAN_COUNT, _type="stream"):
            key = to_str(raw_key)
            owner = dlq_owner(key)
            if owner is not None:
                dlqs[key] = owner
            else:
                streams.append(key)
        streams.sort()
        if len(streams) > self.max_streams:
            if not self._warned_truncated:
                logger.warning("metrics: %d streams found, reporting the first %d (raise "
                               "max_streams, or name the streams to report)", len(streams),
                               self.max_streams, extra={"redis_url": redact_url(self.redis_url)})
                self._warned_truncated = True
            streams = streams[:self.max_streams]
        return streams, dlqs

    def _read_stats(self) -> list[_StreamStats]:
        if self._streams is None:
            names, found_dlqs = self._discover()
            dlq_of = {owner: key for key, owner in found_dlqs.items()}
        else:
            names = list(self._streams)
            dlq_of = {}
        # Dead-letter streams whose original stream is gone still report their length.
        known = set(names)
        orphans = sorted(owner for owner in dlq_of if owner not in known)
        if len(names) + len(orphans) > self.max_streams:
            orphans = orphans[:max(0, self.max_streams - len(names))]

        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        for name in names:
            pipe.xlen(name)
            pipe.xinfo_groups(name)
            pipe.xlen(dlq_of.get(name, dlq_key(name)))
        for owner in orphans:
            pipe.xlen(dlq_of[owner])
        replies = pipe.execute(raise_on_error=False)
        _raise_connection_error(replies)
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000

        stats: list[_StreamStats] = []
        for index, name in enumerate(names):
            length, groups, dead = replies[1 + 3 * index: 4 + 3 * index]
            if isinstance(length, Exception):  # not a stream (WRONGTYPE): nothing to report
                logger.debug("metrics: skipping %r: %s", name, length, extra={"stream": name})
                continue
            stream = _StreamStats(name, int(length),
                                  0 if isinstance(dead, Exception) else int(dead))
            if not isinstance(groups, Exception):  # missing stream: "no such key"
                stream.groups = [_group_stats(info) for info in groups]
            stats.append(stream)
        offset = 1 + 3 * len(names)
        for index, owner in enumerate(orphans):
            dead = replies[offset + index]
            if not isinstance(dead, Exception):
                stats.append(_StreamStats(owner, None, int(dead)))

        busy = [(s.name, g) for s in stats for g in s.groups if g.pending > 0]
        if busy:
            pipe = self._client.pipeline(transaction=False)
            for stream_name, group in busy:
                pipe.xpending(stream_name, group.name)
            summaries = pipe.execute(raise_on_error=False)
            _raise_connection_error(summaries)
            for (_, group), summary in zip(busy, summaries, strict=True):
                if isinstance(summary, Exception) or not summary:
                    continue
                oldest = summary.get("min") if isinstance(summary, dict) else None
                if oldest:
                    added_ms = stream_id_key(to_str(oldest))[0]
                    group.oldest_pending_age_s = max(0, now_ms - added_ms) / 1000
        return stats


def _raise_connection_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, redis_exc.ConnectionError | redis_exc.TimeoutError):
            raise reply


def _group_stats(info: Any) -> _GroupStats:
    lag = first_field(info, "lag")
    return _GroupStats(
        name=to_str(first_field(info, "name")),
        consumers=int(first_field(info, "consumers") or 0),
        pending=int(first_field(info, "pending") or 0),
        lag=None if lag is None else int(lag),
    )


# --------------------------------------------------------------------------- the HTTP endpoint


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; ``close()`` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._closed = False

    @property
    def addr(self) -> str:
        """The address it listens on."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The port it listens on (the real one when 0 was asked for)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""
        return self._closed

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(SERVER_JOIN_TIMEOUT_S)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def serve_metrics(port: int, addr: str = "127.0.0.1",
                  registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``registry`` (default: the global one) on ``http://addr:port/metrics``.

    Runs in a daemon thread; port 0 picks a free port (see ``MetricsServer.port``). Binds
    loopback by default: pass ``addr="0.0.0.0"`` to let a Prometheus on another host scrape.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be an integer in 0..65535, got {port!r}")
    server, thread = _start_http_server(port, addr=addr,
                                        registry=registry if registry is not None else REGISTRY)
    logger.info("serving metrics on http://%s:%d/metrics", addr, server.server_port,
                extra={"metrics_addr": addr, "metrics_port": server.server_port})
    return MetricsServer(server, thread)


# --------------------------------------------------------------------------- workers


@dataclass(slots=True)
class _Shared:
    """What the workers of one process share: one observer and one collector per registry,
    one HTTP server per port (several workers may ask for the same ``metrics_port``)."""

    observers: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusObserver] = field(
        default_factory=weakref.WeakKeyDictionary)
    collectors: weakref.WeakKeyDictionary[CollectorRegistry, StreamStatsCollector] = field(
        default_factory=weakref.WeakKeyDictionary)
    #: (addr, port) -> (server, registry, handles using it)
    servers: dict[tuple[str, int], tuple[MetricsServer, CollectorRegistry, int]] = field(
        default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_shared = _Shared()


def observer_for(registry: CollectorRegistry | None = None) -> PrometheusObserver:
    """The process's PrometheusObserver on ``registry`` (created on first use)."""
    registry = registry if registry is not None else REGISTRY
    with _shared.lock:
        observer = _shared.observers.get(registry)
        if observer is None:
            observer = _shared.observers[registry] = PrometheusObserver(registry)
        return observer


class WorkerMetrics:
    """What ``attach_worker_metrics`` set up; ``close()`` releases the endpoint (the last
    worker using a port stops its server)."""

    def __init__(self, observer: PrometheusObserver, server: MetricsServer,
                 collector: StreamStatsCollector | None, key: tuple[str, int]) -> None:
        self.observer = observer
        self.server = server
        self.collector = collector
        self._key = key
        self._closed = False

    @property
    def port(self) -> int:
        """The port of the endpoint."""
        return self.server.port

    def close(self) -> None:
        """Release this worker's use of the endpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        key = self._key
        with _shared.lock:
            entry = _shared.servers.get(key)
            if entry is None or entry[0] is not self.server:
                return
            server, registry, users = entry
            if users > 1:
                _shared.servers[key] = (server, registry, users - 1)
                return
            del _shared.servers[key]
        server.close()


def attach_worker_metrics(worker: Worker, port: int, *, addr: str = "127.0.0.1",
                          registry: CollectorRegistry | None = None,
                          redis_url: str | None = None) -> WorkerMetrics:
    """Count ``worker``'s events into ``registry`` and serve it on ``addr:port``.

    Sets ``worker.observer`` (unless it has one) and, when the process has no observer yet,
    installs the same one process-wide so publishers are counted too. With ``redis_url`` the
    endpoint also reports the lag and pending entries of the worker's stream. Workers of one
    process that ask for the same port share one endpoint.
    """
    registry = registry if registry is not None else REGISTRY
    observer = observer_for(registry)
    if worker.observer is None:
        worker.observer = observer
    if type(get_observer()) is Observer:
        set_observer(observer)
    collector: StreamStatsCollector | None = None
    if redis_url is not None:
        with _shared.lock:
            collector = _shared.collectors.get(registry)
            if collector is None:
                collector = _shared.collectors[registry] = StreamStatsCollector(
                    redis_url, [worker.stream])
                registry.register(collector)
            elif collector.redis_url != redis_url:
                logger.warning("metrics: this registry already reports lag for %s; not for %s "
                               "(use another registry and port per server)",
                               redact_url(collector.redis_url), redact_url(redis_url),
                               extra={"stream": worker.stream, "group": worker.group})
                collector = None
            else:
                collector.add_streams(worker.stream)
    with _shared.lock:
        entry = _shared.servers.get((addr, port)) if port != 0 else None
        if entry is not None and not entry[0].closed:
            server, known_registry, users = entry
            if known_registry is not registry:
                raise InvalidArgumentError(f"port {port} already serves another registry")
        else:
            server, users = serve_metrics(port, addr, registry), 0
        key = (addr, server.port)
        _shared.servers[key] = (server, registry, users + 1)
    return WorkerMetrics(observer, server, collector, key)

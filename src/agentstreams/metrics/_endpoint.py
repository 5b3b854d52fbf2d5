"""The ``/metrics`` HTTP endpoint, and ``attach_worker_metrics`` which wires a worker to one."""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import start_http_server as _start_http_server

from agentstreams._connection import redact_url
from agentstreams._observe import Observer, get_observer, set_observer
from agentstreams.errors import InvalidArgumentError
from agentstreams.metrics._collector import StreamStatsCollector
from agentstreams.metrics._observer import PrometheusObserver

__all__ = ["MetricsServer", "WorkerMetrics", "attach_worker_metrics", "serve_metrics"]

logger = logging.getLogger("agentstreams.metrics")

#: How long ``MetricsServer.close()`` waits for the server thread.
SERVER_JOIN_TIMEOUT_S = 5.0


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


class _Observed(Protocol):
    """What ``attach_worker_metrics`` needs of a worker (``agentstreams.Worker`` has it)."""

    stream: str
    group: str
    observer: Observer | None


@dataclass(slots=True)
class _Shared:
    """What the workers of one process share: one observer and one collector per registry,
    one HTTP server per port (several workers may ask for the same port)."""

    observers: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusObserver] = field(
        default_factory=weakref.WeakKeyDictionary)
    collectors: weakref.WeakKeyDictionary[CollectorRegistry, StreamStatsCollector] = field(
        default_factory=weakref.WeakKeyDictionary)
    #: (addr, port) -> (server, registry, handles using it)
    servers: dict[tuple[str, int], tuple[MetricsServer, CollectorRegistry, int]] = field(
        default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_shared = _Shared()


def _observer_for(registry: CollectorRegistry) -> PrometheusObserver:
    """The process's PrometheusObserver on ``registry`` (created on first use)."""
    with _shared.lock:
        observer = _shared.observers.get(registry)
        if observer is None:
            observer = _shared.observers[registry] = PrometheusObserver(registry)
        return observer


class WorkerMetrics:
    """What ``attach_worker_metrics`` set up. ``close()`` (or leaving a ``with`` block)
    releases the endpoint; the last worker using a port stops its server."""

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

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        return self.server.url

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""
        return self._closed

    def close(self) -> None:
        """Release this worker's use of the endpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _shared.lock:
            entry = _shared.servers.get(self._key)
            if entry is None or entry[0] is not self.server:
                return
            server, registry, users = entry
            if users > 1:
                _shared.servers[self._key] = (server, registry, users - 1)
                return
            del _shared.servers[self._key]
        server.close()

    def __enter__(self) -> WorkerMetrics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _collector_for(registry: CollectorRegistry, redis_url: str,
                   worker: _Observed) -> StreamStatsCollector | None:
    """The registry's collector, now also reporting ``worker``'s stream (None when the
    registry already reports another server)."""
    with _shared.lock:
        collector = _shared.collectors.get(registry)
        if collector is None:
            collector = _shared.collectors[registry] = StreamStatsCollector(
                redis_url, [worker.stream])
            registry.register(collector)
            return collector
    if collector.redis_url != redis_url:
        logger.warning("metrics: this registry already reports lag for %s; not for %s (use "
                       "another registry and port per server)", redact_url(collector.redis_url),
                       redact_url(redis_url), extra={"stream": worker.stream,
                                                     "group": worker.group})
        return None
    collector.add_streams(worker.stream)
    return collector


def attach_worker_metrics(worker: _Observed, port: int, *, addr: str = "127.0.0.1",
                          registry: CollectorRegistry | None = None,
                          redis_url: str | None = None) -> WorkerMetrics:
    """Count ``worker``'s events into ``registry`` and serve it on ``addr:port``.

    Sets ``worker.observer`` (unless it has one) and, when the process has no observer yet,
    installs the same one process-wide so publishers are counted too. With ``redis_url`` the
    endpoint also reports the lag and pending entries of the worker's stream. Workers of one
    process that ask for the same port share one endpoint. Close the handle (or use it as a
    context manager: ``with attach_worker_metrics(worker, 9100): await worker.run()``).
    """
    registry = registry if registry is not None else REGISTRY
    observer = _observer_for(registry)
    if worker.observer is None:
        worker.observer = observer
    if type(get_observer()) is Observer:
        set_observer(observer)
    collector = _collector_for(registry, redis_url, worker) if redis_url is not None else None
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

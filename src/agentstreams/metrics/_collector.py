"""``StreamStatsCollector``: what *the server* says at scrape time (lag, pending, oldest pending
age, stream and dead-letter lengths), read with ``agentstreams._inspect``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis.exceptions as redis_exc
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentstreams._connection import ConnectionSettings, create_client, redact_url
from agentstreams._constants import (
    DEFAULT_INSPECT_MAX_STREAMS,
    METRICS_SCRAPE_TIMEOUT_S,
    METRICS_SOCKET_TIMEOUT_S,
)
from agentstreams._inspect import ServerStats, inspect_server
from agentstreams.errors import AgentStreamsError, InvalidArgumentError
from agentstreams.metrics._observer import DEFAULT_NAMESPACE

__all__ = ["StreamStatsCollector"]

logger = logging.getLogger("agentstreams.metrics")

T = TypeVar("T")

#: What a scrape that cannot read the server raises; it then exports ``up 0``.
_UNREACHABLE = (AgentStreamsError, redis_exc.RedisError, OSError, TimeoutError)


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``factory()`` makes to completion from synchronous code.

    Prometheus scrapes run in the HTTP server's threads, which have no event loop; a caller
    that has one running (``generate_latest`` inside async code) gets a private thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1, thread_name_prefix="agentstreams-metrics") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class StreamStatsCollector(Collector):
    """Reads lag, pending and lengths from the server at scrape time.

    ``streams`` names the streams to report; None reports every stream found by
    ``SCAN ... TYPE stream`` (at most ``max_streams``; dead-letter streams are reported as the
    ``dead_letters`` gauge of the stream they belong to, not as streams). Each scrape opens a
    connection, runs a few pipelined commands without retries, and ends within
    ``scrape_timeout_s`` (each command within ``socket_timeout_s``): a dead or frozen server
    makes ``agentstreams_up`` 0 instead of hanging the scrape.
    """

    def __init__(self, redis_url: str, streams: Iterable[str] | None = None, *,
                 namespace: str = DEFAULT_NAMESPACE,
                 socket_timeout_s: float = METRICS_SOCKET_TIMEOUT_S,
                 scrape_timeout_s: float = METRICS_SCRAPE_TIMEOUT_S,
                 max_streams: int = DEFAULT_INSPECT_MAX_STREAMS) -> None:
        if socket_timeout_s <= 0:
            raise InvalidArgumentError("socket_timeout_s must be positive")
        if scrape_timeout_s <= 0:
            raise InvalidArgumentError("scrape_timeout_s must be positive")
        if max_streams < 1:
            raise InvalidArgumentError("max_streams must be >= 1")
        self._settings = ConnectionSettings(
            url=redis_url, socket_timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s,
            health_check_interval_s=0, command_retries=0, client_name="agentstreams-metrics")
        create_client(self._settings)  # a bad URL fails here, not at every scrape
        self.redis_url = redis_url
        self.namespace = namespace
        self.max_streams = max_streams
        self.scrape_timeout_s = scrape_timeout_s
        self._streams: list[str] | None = list(dict.fromkeys(streams)) if streams is not None \
            else None
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
        """Nothing stays open between scrapes (each opens and closes its connection); kept so
        a collector can be closed like every other resource."""

    # -- prometheus_client.registry.Collector

    def describe(self) -> list[Metric]:
        """The metric names, without asking the server (called once at registration)."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """Read the stats from the server and yield them as gauges."""
        with self._lock:
            started = time.perf_counter()
            stats = self._read()
            families = self._families()
            families["up"].add_metric([], 1.0 if stats is not None else 0.0)
            if stats is not None:
                self._add_samples(families, stats)
            families["scrape_duration"].add_metric([], time.perf_counter() - started)
        yield from families.values()

    def _read(self) -> ServerStats | None:
        """The server's stats, or None (logged once per outage) when it cannot be read."""
        url = redact_url(self.redis_url)
        try:
            stats = _run_blocking(self._scrape)
        except _UNREACHABLE as exc:
            if self._was_up is not False:
                logger.warning("metrics: cannot read stream stats from %s (%s); exporting "
                               "%s_up 0", url, exc or type(exc).__name__, self.namespace,
                               extra={"redis_url": url})
            self._was_up = False
            return None
        if self._was_up is False:
            logger.info("metrics: the server at %s answers again", url, extra={"redis_url": url})
        self._was_up = True
        if stats.truncated and not self._warned_truncated:
            logger.warning("metrics: %d streams found, reporting the first %d (raise "
                           "max_streams, or name the streams to report)", stats.found,
                           self.max_streams, extra={"redis_url": url})
            self._warned_truncated = True
        return stats

    async def _scrape(self) -> ServerStats:
        """One bounded read: its own connection, closed afterwards whatever happened."""
        client = create_client(self._settings)
        try:
            async with asyncio.timeout(self.scrape_timeout_s):
                return await inspect_server(client, streams=self._streams,
                                            max_streams=self.max_streams)
        finally:
            await client.aclose()

    def _add_samples(self, families: dict[str, GaugeMetricFamily], stats: ServerStats) -> None:
        for stream in stats.streams:
            families["stream_length"].add_metric([stream.name], stream.length)
        for stream in stats.rows:
            families["dead_letters"].add_metric([stream.name], stream.dead_letters)
            for group in stream.groups:
                labels = [stream.name, group.name]
                oldest = group.oldest_pending
                families["pending"].add_metric(labels, group.pending)
                families["consumers"].add_metric(labels, group.consumers)
                families["oldest_pending_age"].add_metric(
                    labels, (oldest.age_ms or 0) / 1000 if oldest else 0.0)
                if group.lag is not None:  # unknown after deletions inside the range
                    families["lag"].add_metric(labels, group.lag)

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

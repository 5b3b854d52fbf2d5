"""Prometheus metrics, checked by scraping the real HTTP endpoint of real workers and servers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import agentstreams.metrics
from agentstreams import Event, Observer, Publisher, Reject, Worker, get_observer, set_observer
from agentstreams.metrics import (
    PrometheusObserver,
    StreamStatsCollector,
    attach_worker_metrics,
    serve_metrics,
)
from agentstreams.server import LocalServer, find_free_port
from conftest import wait_for

WORKER_OPTIONS: dict[str, Any] = {"block_ms": 200, "probe_server": False,
                                  "retry_delay_s": 0.01, "retry_delay_max_s": 0.05}
#: The CLI imports typer, rich and prometheus-client before it serves.
CLI_START_TIMEOUT_S = 30.0
#: A scrape of a dead or frozen server must come back within its socket timeout plus slack.
DEAD_SERVER_TIMEOUT_S = 0.5

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def dlq_key(stream: str) -> str:
    """The documented dead-letter stream of ``stream`` (without a hash tag of its own)."""
    return f"{{{stream}}}:dlq"


def parse(text: str) -> Samples:
    """Prometheus text format as {(sample name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(url: str) -> Samples:
    """GET the endpoint and parse it: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when it is not exported."""
    return samples.get((name, tuple(sorted(labels.items()))))


async def ascrape(url: str) -> Samples:
    """``scrape`` without blocking the event loop the workers run on."""
    return await asyncio.to_thread(scrape, url)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def process_observer() -> Iterator[None]:
    """Restores the process-wide observer a test installs (publishers report to it)."""
    before = get_observer()
    yield
    set_observer(before)


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Workers a test starts; stopped at teardown even when the test fails."""
    started: list[Worker] = []
    yield started
    for worker in started:
        await worker.stop(timeout_s=2)


# --------------------------------------------------------------------------- runtime counters


async def test_worker_counters_and_handler_histogram(
        redis_url: str, stream_name: str, raw: aioredis.Redis, registry: CollectorRegistry,
        process_observer: None, workers: list[Worker]) -> None:
    observer = PrometheusObserver(registry)
    set_observer(observer)
    worker = Worker(redis_url, stream_name, "g", max_deliveries=3, observer=observer,
                    **WORKER_OPTIONS)
    workers.append(worker)
    flaky_attempts: list[int] = []

    @worker.handler("ok")
    async def ok(event: Event) -> None:
        return None

    @worker.handler("flaky")
    async def flaky(event: Event) -> None:
        flaky_attempts.append(event.delivery_count)
        if event.delivery_count == 1:
            raise RuntimeError("first attempt fails")

    @worker.handler("bad")
    async def bad(event: Event) -> None:
        raise Reject("cannot ever work")

    await worker.start()
    publisher = Publisher(raw, stream_name)
    await publisher.publish("ok", {"n": 1})
    await publisher.publish_many([{"type": "ok", "n": 2}, {"type": "flaky"}, {"type": "bad"},
                                  {"type": "nobody_handles_this"}])
    await raw.xadd(stream_name, {"no_type_field": "x"})  # written by another client: malformed

    with serve_metrics(0, registry=registry) as server:
        samples: Samples = {}

        async def settled() -> bool:
            nonlocal samples
            samples = await ascrape(server.url)
            return (value(samples, "agentstreams_events_acknowledged_total",
                          stream=stream_name, group="g") == 4
                    and value(samples, "agentstreams_events_malformed_total",
                              stream=stream_name, group="g") == 1
                    and value(samples, "agentstreams_events_dead_lettered_total",
                              stream=stream_name, group="g", reason="rejected") == 1)

        await wait_for(settled, message="4 acknowledged and 2 dead-lettered in the scrape")

    sg = {"stream": stream_name, "group": "g"}
    assert value(samples, "agentstreams_events_published_total", stream=stream_name) == 5
    assert value(samples, "agentstreams_events_delivered_total", **sg) == 6
    assert value(samples, "agentstreams_events_retried_total", **sg, event_type="flaky") == 1
    assert value(samples, "agentstreams_events_dead_lettered_total", **sg,
                 reason="rejected") == 1
    assert value(samples, "agentstreams_events_dead_lettered_total", **sg,
                 reason="malformed") == 1
    assert value(samples, "agentstreams_events_malformed_total", **sg) == 1
    assert value(samples, "agentstreams_events_unhandled_total", **sg,
                 event_type="nobody_handles_this") == 1
    assert value(samples, "agentstreams_reconnects_total", **sg) is None  # never happened
    hist = "agentstreams_handler_duration_seconds"
    assert value(samples, f"{hist}_count", **sg, event_type="ok", outcome="ok") == 2
    assert value(samples, f"{hist}_count", **sg, event_type="flaky", outcome="error") == 1
    assert value(samples, f"{hist}_count", **sg, event_type="flaky", outcome="ok") == 1
    assert value(samples, f"{hist}_count", **sg, event_type="bad", outcome="error") == 1
    assert value(samples, f"{hist}_bucket", **sg, event_type="ok", outcome="ok", le="+Inf") == 2
    duration_sum = value(samples, f"{hist}_sum", **sg, event_type="ok", outcome="ok")
    assert duration_sum is not None
    assert 0 <= duration_sum < 5
    assert flaky_attempts == [1, 2]
    # The scrape agrees with the worker's own counters.
    assert worker.stats.acked == 4
    assert worker.stats.dead_lettered == 2


async def test_reconnects_are_counted(registry: CollectorRegistry, stream_name: str,
                                      workers: list[Worker]) -> None:
    server = LocalServer("valkey").start()
    observer = PrometheusObserver(registry)
    worker = Worker(server.url, stream_name, "g", observer=observer, **WORKER_OPTIONS)
    workers.append(worker)
    handled: list[Event] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        handled.append(event)

    try:
        await worker.start()
        with serve_metrics(0, registry=registry) as endpoint:
            async def reconnects() -> float:
                samples = await ascrape(endpoint.url)
                return value(samples, "agentstreams_reconnects_total", stream=stream_name,
                             group="g") or 0

            assert await reconnects() == 0
            # Down for longer than the client's own quick retries hide: the worker notices.
            server.kill()

            async def counted() -> bool:
                return await reconnects() >= 1

            await wait_for(counted, timeout_s=20, message="a counted reconnect")
            server.start()
            client = aioredis.Redis.from_url(server.url)
            try:
                await Publisher(client, stream_name).publish("after_restart", {})
            finally:
                await client.aclose()

            async def recovered() -> bool:
                return len(handled) == 1

            await wait_for(recovered, timeout_s=20, message="the worker consuming again")
    finally:
        await worker.stop(timeout_s=2)
        server.stop()


def test_one_observer_per_registry(registry: CollectorRegistry) -> None:
    PrometheusObserver(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusObserver(registry)
    PrometheusObserver(CollectorRegistry(), namespace="other")


# --------------------------------------------------------------------------- server-side gauges


async def test_lag_pending_oldest_age_and_dead_letters(
        redis_url: str, stream_name: str, raw: aioredis.Redis,
        registry: CollectorRegistry) -> None:
    await raw.xgroup_create(stream_name, "busy", id="0", mkstream=True)
    await raw.xgroup_create(stream_name, "idle", id="0")
    # Entries added 5 s ago (explicit ids), so the oldest pending age is known to be >= 5 s.
    added_ms = int(time.time() * 1000) - 5000
    for seq in range(5):
        await raw.xadd(stream_name, {"type": "t"}, id=f"{added_ms}-{seq}")
    await raw.xreadgroup("busy", "c1", {stream_name: ">"}, count=2)
    await raw.xadd(dlq_key(stream_name), {"reason": "x"})
    await raw.xadd(dlq_key(stream_name), {"reason": "y"})
    missing = f"{stream_name}-missing"

    registry.register(StreamStatsCollector(redis_url, [stream_name, missing]))
    with serve_metrics(0, registry=registry) as server:
        samples = await ascrape(server.url)

    busy = {"stream": stream_name, "group": "busy"}
    idle = {"stream": stream_name, "group": "idle"}
    assert value(samples, "agentstreams_up") == 1
    assert value(samples, "agentstreams_stream_length", stream=stream_name) == 5
    assert value(samples, "agentstreams_dead_letters", stream=stream_name) == 2
    assert value(samples, "agentstreams_consumer_group_lag", **busy) == 3
    assert value(samples, "agentstreams_consumer_group_pending", **busy) == 2
    assert value(samples, "agentstreams_consumer_group_consumers", **busy) == 1
    age = value(samples, "agentstreams_consumer_group_oldest_pending_age_seconds", **busy)
    assert age is not None
    assert 5 <= age < 120
    assert value(samples, "agentstreams_consumer_group_lag", **idle) == 5
    assert value(samples, "agentstreams_consumer_group_pending", **idle) == 0
    assert value(samples, "agentstreams_consumer_group_oldest_pending_age_seconds", **idle) == 0
    # A named stream that does not exist is empty, with no groups.
    assert value(samples, "agentstreams_stream_length", stream=missing) == 0
    assert not any(dict(labels).get("stream") == missing and "group" in dict(labels)
                   for _, labels in samples)
    assert (value(samples, "agentstreams_stream_stats_scrape_duration_seconds") or 0) > 0


async def test_every_stream_is_found_by_scan_and_dead_letter_streams_are_not_streams(
        valkey_server: LocalServer, stream_name: str, registry: CollectorRegistry) -> None:
    client = aioredis.Redis.from_url(valkey_server.url)
    gone = f"{stream_name}-gone"
    keys = [stream_name, dlq_key(stream_name), dlq_key(gone), f"{stream_name}-str"]
    try:
        await client.xgroup_create(stream_name, "g", id="0", mkstream=True)
        await client.xadd(stream_name, {"type": "t"})
        await client.xadd(dlq_key(stream_name), {"reason": "r"})
        await client.xadd(dlq_key(gone), {"reason": "r"})
        await client.xadd(dlq_key(gone), {"reason": "r"})
        await client.set(f"{stream_name}-str", "not a stream")
        registry.register(StreamStatsCollector(valkey_server.url, max_streams=100_000))
        with serve_metrics(0, registry=registry) as server:
            samples = await ascrape(server.url)
    finally:
        await client.delete(*keys)
        await client.aclose()

    streams = {dict(labels)["stream"] for name, labels in samples
               if name == "agentstreams_stream_length"}
    assert stream_name in streams
    assert not any(s.endswith(":dlq") for s in streams)
    assert f"{stream_name}-str" not in streams
    assert value(samples, "agentstreams_consumer_group_lag", stream=stream_name, group="g") == 1
    assert value(samples, "agentstreams_dead_letters", stream=stream_name) == 1
    # Dead letters of a stream that is gone are still reported, under the stream's name.
    assert value(samples, "agentstreams_dead_letters", stream=gone) == 2
    assert gone not in streams


async def test_a_scrape_from_inside_an_event_loop_works(
        redis_url: str, stream_name: str, raw: aioredis.Redis,
        registry: CollectorRegistry) -> None:
    """``generate_latest`` called from a coroutine (a running loop in this thread) still reads
    the server instead of failing on ``asyncio.run``."""
    await raw.xgroup_create(stream_name, "g", id="0", mkstream=True)
    await raw.xadd(stream_name, {"type": "t"})
    registry.register(StreamStatsCollector(redis_url, [stream_name]))
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "agentstreams_up") == 1
    assert value(samples, "agentstreams_consumer_group_lag", stream=stream_name, group="g") == 1


async def test_a_dead_server_exports_up_0_quickly_and_recovers(
        registry: CollectorRegistry, stream_name: str) -> None:
    server = LocalServer("valkey").start()
    try:
        collector = StreamStatsCollector(server.url, [stream_name],
                                         socket_timeout_s=DEAD_SERVER_TIMEOUT_S)
        registry.register(collector)
        with serve_metrics(0, registry=registry) as endpoint:
            assert value(await ascrape(endpoint.url), "agentstreams_up") == 1
            server.pause()  # frozen: connections hang instead of being refused
            try:
                started = time.monotonic()
                samples = await ascrape(endpoint.url)
                elapsed = time.monotonic() - started
            finally:
                server.resume()
            assert value(samples, "agentstreams_up") == 0
            assert value(samples, "agentstreams_stream_length", stream=stream_name) is None
            assert elapsed < DEAD_SERVER_TIMEOUT_S * 3 + 1
            server.kill()  # gone: connections are refused
            assert value(await ascrape(endpoint.url), "agentstreams_up") == 0
            server.start()

            async def up_again() -> bool:
                return value(await ascrape(endpoint.url), "agentstreams_up") == 1

            await wait_for(up_again, message="agentstreams_up 1 after the server came back")
        collector.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- worker endpoint


async def test_attach_worker_metrics_shares_one_endpoint_per_port(
        redis_url: str, stream_name: str, raw: aioredis.Redis, registry: CollectorRegistry,
        process_observer: None, workers: list[Worker]) -> None:
    set_observer(None)
    other_stream = f"{stream_name}-other"
    first = Worker(redis_url, stream_name, "g", **WORKER_OPTIONS)
    second = Worker(redis_url, other_stream, "g2", **WORKER_OPTIONS)
    workers.extend([first, second])
    for worker in (first, second):
        worker.add_handler(_noop)

    first_metrics = attach_worker_metrics(first, 0, registry=registry, redis_url=redis_url)
    second_metrics = attach_worker_metrics(second, first_metrics.port, registry=registry,
                                           redis_url=redis_url)
    try:
        assert second_metrics.server is first_metrics.server
        assert first.observer is second.observer is first_metrics.observer
        assert get_observer() is first_metrics.observer  # publishers are counted too
        await first.start()
        await second.start()
        await Publisher(raw, stream_name).publish("ok", {})
        await Publisher(raw, other_stream).publish("ok", {})
        url = first_metrics.server.url

        async def both_acked() -> bool:
            samples = await ascrape(url)
            return (value(samples, "agentstreams_events_acknowledged_total",
                          stream=stream_name, group="g") == 1
                    and value(samples, "agentstreams_events_acknowledged_total",
                              stream=other_stream, group="g2") == 1)

        await wait_for(both_acked, message="both workers' acks on the shared endpoint")
        samples = await ascrape(url)
        assert value(samples, "agentstreams_events_published_total", stream=stream_name) == 1
        assert value(samples, "agentstreams_consumer_group_pending",
                     stream=other_stream, group="g2") == 0
        assert value(samples, "agentstreams_consumer_group_lag",
                     stream=stream_name, group="g") == 0

        first_metrics.close()
        assert value(await ascrape(url), "agentstreams_up") == 1  # still served for `second`
        second_metrics.close()
        assert first_metrics.server.closed
        with pytest.raises(urllib.error.URLError):
            await ascrape(url)
    finally:
        first_metrics.close()
        second_metrics.close()
        await raw.delete(other_stream)


async def _noop(event: Event) -> None:
    return None


def test_attach_keeps_an_observer_the_worker_already_has(
        registry: CollectorRegistry, process_observer: None) -> None:
    class Mine(Observer):
        pass

    mine = Mine()
    set_observer(mine)
    worker = Worker("redis://127.0.0.1:1", "s", "g", observer=mine)
    handle = attach_worker_metrics(worker, 0, registry=registry)
    try:
        assert worker.observer is mine
        assert get_observer() is mine  # an installed process-wide observer is left alone
    finally:
        handle.close()
    assert handle.server.closed


def test_serve_metrics_rejects_a_bad_port() -> None:
    from agentstreams.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        serve_metrics(70000)


def test_import_error_names_the_extra() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "try:\n    import agentstreams.metrics\n"
            "except ImportError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "pip install 'agentstreams[metrics]'" in result.stdout


# --------------------------------------------------------------------------- the CLI exporter


def _agentstreams_cli() -> list[str]:
    return [sys.executable, "-m", "agentstreams.cli.main"]


def _start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``agentstreams metrics``; return it and the URL it prints once it serves."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([*_agentstreams_cli(), "metrics", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + CLI_START_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line or proc.poll() is not None:
            break
    match = re.search(r"serving (http://\S+/metrics)", line)
    if match is None:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
        pytest.fail(f"agentstreams metrics did not start: {line!r} {stderr!r}")
    return proc, match.group(1)


async def test_cli_exports_a_servers_streams_while_it_runs(
        valkey_server: LocalServer, stream_name: str) -> None:
    redis_url = valkey_server.url
    raw = aioredis.Redis.from_url(redis_url)
    await raw.xgroup_create(stream_name, "g", id="0", mkstream=True)
    for n in range(3):
        await raw.xadd(stream_name, {"type": "t", "n": str(n)})
    await raw.xreadgroup("g", "c", {stream_name: ">"}, count=1)
    port = find_free_port()
    proc, url = await asyncio.to_thread(
        _start_cli, "--port", str(port), "--redis-url", redis_url, "--stream", stream_name,
        "--duration-s", "3")
    try:
        assert url == f"http://127.0.0.1:{port}/metrics"
        samples = await ascrape(url)
        assert value(samples, "agentstreams_up") == 1
        assert value(samples, "agentstreams_stream_length", stream=stream_name) == 3
        assert value(samples, "agentstreams_consumer_group_lag",
                     stream=stream_name, group="g") == 2
        assert value(samples, "agentstreams_consumer_group_pending",
                     stream=stream_name, group="g") == 1
        # Only the named stream is exported.
        assert {dict(labels).get("stream") for _, labels in samples} <= {stream_name, None}
        # --duration-s makes it exit by itself, successfully.
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        await raw.delete(stream_name)
        await raw.aclose()


def test_cli_serves_up_0_when_the_server_is_unreachable() -> None:
    dead_url = f"redis://127.0.0.1:{find_free_port()}"
    proc, url = _start_cli("--port", "0", "--redis-url", dead_url, "--duration-s", "1")
    try:
        assert value(scrape(url), "agentstreams_up") == 0
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_cli_rejects_a_bad_url() -> None:
    result = subprocess.run([*_agentstreams_cli(), "metrics", "--port", "0", "--redis-url",
                             "http://nope", "--duration-s", "0"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "unsupported URL" in result.stderr


async def test_attach_worker_metrics_is_a_context_manager(
        valkey_server: LocalServer, stream_name: str, registry: CollectorRegistry,
        process_observer: None, workers: list[Worker]) -> None:
    """``with attach_worker_metrics(worker, port):`` serves the worker's counters and its
    stream's gauges inside the block and frees the port when it ends."""
    port = find_free_port()
    worker = Worker(valkey_server.url, stream_name, "g", **WORKER_OPTIONS)
    workers.append(worker)
    worker.add_handler(_noop)
    client = aioredis.Redis.from_url(valkey_server.url)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with attach_worker_metrics(worker, port, registry=registry,
                                   redis_url=valkey_server.url) as handle:
            assert handle.url == url
            await worker.start()
            await Publisher(client, stream_name).publish("ok", {})

            async def acked() -> bool:
                samples = await ascrape(url)
                return value(samples, "agentstreams_events_acknowledged_total",
                             stream=stream_name, group="g") == 1

            await wait_for(acked, message="the worker's ack on its own endpoint")
            samples = await ascrape(url)
            assert value(samples, "agentstreams_consumer_group_pending",
                         stream=stream_name, group="g") == 0
            assert value(samples, "agentstreams_consumer_group_lag",
                         stream=stream_name, group="g") == 0
        assert handle.closed
        assert handle.server.closed
        with pytest.raises(urllib.error.URLError):
            await ascrape(url)  # the block's end closed the endpoint
    finally:
        await client.delete(stream_name)
        await client.aclose()


def test_metrics_exports_exactly_its_documented_names() -> None:
    documented = {"HANDLER_DURATION_BUCKETS_S", "MetricsServer", "PrometheusObserver",
                  "StreamStatsCollector", "WorkerMetrics", "attach_worker_metrics",
                  "serve_metrics"}
    namespace: dict[str, object] = {}
    exec("from agentstreams.metrics import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == documented
    public = {name for name, obj in vars(agentstreams.metrics).items()
              if not name.startswith("_") and not isinstance(obj, types.ModuleType)}
    assert public == documented, f"public but not in __all__: {sorted(public - documented)}"


class _RunnerBugObserver(PrometheusObserver):
    """Counts like the real observer, but raises once inside a runner (a bug in a hook)."""

    raised = False

    def on_handler_done(self, stream: str, group: str, event_type: str, duration_s: float,
                        ok: bool) -> None:
        super().on_handler_done(stream, group, event_type, duration_s, ok)
        if not self.raised:
            self.raised = True
            raise RuntimeError("bug in a hook")


async def test_restarted_worker_tasks_are_counted(
        registry: CollectorRegistry, redis_url: str, raw: aioredis.Redis, stream_name: str,
        workers: list[Worker]) -> None:
    worker = Worker(redis_url, stream_name, "g", observer=_RunnerBugObserver(registry),
                    concurrency=1, visibility_timeout_ms=500, **WORKER_OPTIONS)
    workers.append(worker)

    @worker.handler()
    async def handle(event: Event) -> None:
        pass

    await worker.start()
    await Publisher(raw, stream_name).publish("task", {})
    samples: Samples = {}

    async def counted() -> bool:
        nonlocal samples
        samples = parse(generate_latest(registry).decode())
        return value(samples, "agentstreams_worker_task_restarts_total", stream=stream_name,
                     group="g", task="runner-0") == 1

    await wait_for(counted, message="the restarted runner counted")
    assert worker.stats.task_restarts == 1

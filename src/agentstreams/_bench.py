"""The benchmark scenarios, shared by ``agentstreams bench`` and ``benchmarks/run.py``.

Every figure is a ratio measured in one run against one server: agentstreams next to raw
redis-py doing the same work, and next to a client that uses Redis the way the reference
implementation does (sequential XADD of ``json.dumps``'d fields; XREADGROUP COUNT 10 with one
XACK per event). The baselines here are written for this benchmark with redis-py; they mimic
the reference's command pattern, they are not its code.

Throughput scenarios run a few rounds and keep the best one (the machine may be shared; the
best round is the least disturbed). Latency scenarios pace a publisher in a second process and
measure at the consumer, from the producer timestamp in the event. The memory scenario runs a
slow handler under a growing backlog and samples resident memory.

Nothing here starts a server: callers pass a URL (the CLI and the runner start an embedded
Valkey when they need one). Every key is unique to the run and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from agentstreams._codec import decode_entry, encode_event_resp
from agentstreams._coordinator import AgentCoordinator
from agentstreams._events import Event
from agentstreams._publisher import Publisher
from agentstreams._worker import Worker

__all__ = [
    "BenchConfig",
    "ScenarioResult",
    "ServerReport",
    "machine_description",
    "run_suite",
]

#: The event every throughput scenario publishes: the reference's handoff, small context.
CONTEXT: dict[str, Any] = {"task": "summarise the quarterly report", "priority": 2,
                           "tags": ["finance", "q3"]}
#: Events per XADD pipeline / publish_many call / XREADGROUP in the batched scenarios.
BATCH = 500
#: Keys of the signed scenarios (the first signs; a rotation's second key verifies only).
BENCH_SIGNING_KEYS: dict[str, bytes] = {"bench-2": b"bench-signing-key-2-0123456789abcdef",
                                        "bench-1": b"bench-signing-key-1-0123456789abcdef"}
#: Concurrent publishing tasks in the coalescing scenario.
CONCURRENT_PUBLISHERS = 64
#: Samples before this point of a latency run are warm-up and not counted.
LATENCY_WARMUP_FRACTION = 0.1
#: Resident memory is sampled this often (seconds).
RSS_SAMPLE_INTERVAL_S = 0.05


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """How much work each scenario does. ``quick`` for the CLI, ``full`` for the 5-minute soak."""

    sequential_events: int = 20_000
    batched_events: int = 200_000
    consume_events: int = 100_000
    rounds: int = 3
    latency_s: float = 10.0
    latency_rates: tuple[int, ...] = (2_000, 20_000)
    memory_s: float = 20.0
    #: Publish rate of the memory scenario; its slow handler takes less (the backlog grows).
    memory_publish_rate: int = 3_000
    memory_handler_s: float = 0.01

    @classmethod
    def named(cls, mode: str) -> BenchConfig:
        """``tiny`` (tests), ``quick`` (the CLI), ``standard`` (make bench) or ``full``."""
        if mode == "tiny":
            return cls(sequential_events=200, batched_events=2_000, consume_events=2_000,
                       rounds=1, latency_s=1.0, latency_rates=(500,), memory_s=2.0,
                       memory_publish_rate=500)
        if mode == "quick":
            return cls(sequential_events=3_000, batched_events=40_000, consume_events=40_000,
                       rounds=2, latency_s=4.0, memory_s=10.0)
        if mode == "standard":
            return cls()
        if mode == "full":
            return cls(rounds=5, latency_s=30.0, memory_s=300.0)
        raise ValueError(f"unknown benchmark mode {mode!r}")


@dataclass(slots=True)
class ScenarioResult:
    """One row of a table."""

    name: str
    description: str
    events: int
    seconds: float
    events_per_s: float
    #: Scenario this one is compared with, and the ratio of events/s (or latency) to it.
    baseline: str | None = None
    ratio: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    target: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ServerReport:
    """Every scenario run against one server."""

    server: str
    url: str
    version: str
    results: list[ScenarioResult] = field(default_factory=list)

    def by_name(self) -> dict[str, ScenarioResult]:
        """Results keyed by scenario name."""
        return {r.name: r for r in self.results}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"server": self.server, "url": self.url, "version": self.version,
                "results": [asdict(r) for r in self.results]}


# ----------------------------------------------------------------------------- measuring


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


class RssSampler:
    """Samples resident memory in a thread: the peak during a scenario, and a time series."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started_at = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._started_at, current_rss_mb()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._started_at, current_rss_mb()))

    @property
    def peak_mb(self) -> float:
        """Largest sample."""
        return max(mb for _, mb in self.samples)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def _unique(prefix: str) -> str:
    return f"agentstreams-bench:{prefix}:{uuid.uuid4().hex[:10]}"


def reference_style_fields(data: dict[str, Any]) -> dict[str, str]:
    """Fields the way the reference serialises them (None dropped, JSON for containers)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            out[key] = json.dumps(value)
        elif isinstance(value, int | float):
            out[key] = str(value)
        else:
            out[key] = value
    return out


def handoff_fields(index: int) -> dict[str, Any]:
    """The user fields of one benchmark event (what every publisher scenario writes)."""
    return {"from_agent": "research", "to_agent": "analysis", "session_id": f"sess_{index % 97}",
            "context": CONTEXT, "timestamp": time.time()}


async def _cleanup(url: str, *keys: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        with contextlib.suppress(Exception):
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass(slots=True)
class Throughput:
    """A throughput scenario: ``run(stream)`` does ``events`` events of work on a fresh stream
    (``prepare(stream)``, untimed, sets it up first)."""

    name: str
    description: str
    events: int
    run: Callable[[str], Awaitable[int]]
    prepare: Callable[[str], Awaitable[None]] | None = None


async def run_interleaved(url: str, scenarios: list[Throughput],
                          rounds: int) -> list[ScenarioResult]:
    """Round 1 of every scenario, then round 2 of every scenario, ...; keep each one's best.

    Interleaving puts a baseline and the scenario compared with it under the same conditions
    even when something else on the machine comes and goes.
    """
    best: dict[str, tuple[float, float]] = {}
    peaks: dict[str, float] = {}
    #: the least CPU time this (client) process spent per event in any round, in us: steadier
    #: than throughput on a busy machine, and it leaves out the server
    cpu: dict[str, float] = {}
    for _ in range(rounds):
        for scenario in scenarios:
            stream = _unique(scenario.name)
            try:
                if scenario.prepare is not None:
                    await scenario.prepare(stream)
                with RssSampler() as rss:
                    started = time.perf_counter()
                    cpu_started = time.process_time()
                    done = await scenario.run(stream)
                    elapsed = time.perf_counter() - started
                    cpu_s = time.process_time() - cpu_started
            finally:
                await _cleanup(url, stream)
            if done != scenario.events:
                raise RuntimeError(f"{scenario.name}: did {done} of {scenario.events} events")
            rate = scenario.events / elapsed
            if rate > best.get(scenario.name, (0.0, 0.0))[0]:
                best[scenario.name] = (rate, elapsed)
            peaks[scenario.name] = max(peaks.get(scenario.name, 0.0), rss.peak_mb)
            per_event_us = cpu_s / scenario.events * 1e6
            cpu[scenario.name] = min(cpu.get(scenario.name, per_event_us), per_event_us)
    return [ScenarioResult(s.name, s.description, s.events, best[s.name][1], best[s.name][0],
                           peak_rss_mb=peaks[s.name],
                           extra={"client_cpu_us_per_event": round(cpu[s.name], 3)})
            for s in scenarios]


# ----------------------------------------------------------------------------- publishing


def publish_scenarios(url: str, cfg: BenchConfig) -> list[Throughput]:
    """Sequential publishing: raw XADD, the reference's pattern, agentstreams ``publish``."""
    n = cfg.sequential_events

    async def redis_py_xadd(stream: str) -> int:
        client = aioredis.Redis.from_url(url)
        try:
            for i in range(n):
                await client.xadd(stream, reference_style_fields(handoff_fields(i)))  # type: ignore[arg-type]
        finally:
            await client.aclose()
        return n

    async def reference_publish(stream: str) -> int:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            for i in range(n):
                data = {"type": "handoff_ready", **handoff_fields(i)}
                str(await client.xadd(stream, reference_style_fields(data)))  # type: ignore[arg-type]
        finally:
            await client.aclose()
        return n

    async def publish(stream: str, signing_keys: Mapping[str, bytes] | None = None) -> int:
        async with AgentCoordinator(url, stream_name=stream,
                                    signing_keys=signing_keys) as coordinator:
            for i in range(n):
                fields = handoff_fields(i)
                await coordinator.publish_handoff_ready(fields["from_agent"], fields["to_agent"],
                                                        fields["session_id"], CONTEXT)
        return n

    async def publish_signed(stream: str) -> int:
        return await publish(stream, BENCH_SIGNING_KEYS)

    return [
        Throughput("redis_py_xadd", "raw redis-py: sequential XADD", n, redis_py_xadd),
        Throughput("reference_publish", "reference-style publish (sequential XADD)", n,
                   reference_publish),
        Throughput("publish", "agentstreams publish_handoff_ready, one at a time", n, publish),
        Throughput("publish_signed", "publish, signed (HMAC-SHA256, signing_keys)", n,
                   publish_signed),
    ]


def batch_publish_scenarios(url: str, cfg: BenchConfig) -> list[Throughput]:
    """Batched publishing: raw pipelined XADD, ``publish_many``, concurrent ``publish``."""
    n = cfg.batched_events

    async def redis_py_pipeline(stream: str) -> int:
        client = aioredis.Redis.from_url(url)
        try:
            for start in range(0, n, BATCH):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(n, start + BATCH)):
                    pipe.xadd(stream, reference_style_fields(handoff_fields(i)))  # type: ignore[arg-type]
                await pipe.execute()
        finally:
            await client.aclose()
        return n

    async def publish_many(stream: str, signing_keys: Mapping[str, bytes] | None = None) -> int:
        async with AgentCoordinator(url, stream_name=stream,
                                    signing_keys=signing_keys) as coordinator:
            for start in range(0, n, BATCH):
                await coordinator.publish_many([
                    {"type": "handoff_ready", **handoff_fields(i)}
                    for i in range(start, min(n, start + BATCH))])
        return n

    async def publish_many_signed(stream: str) -> int:
        return await publish_many(stream, BENCH_SIGNING_KEYS)

    async def publish_concurrent_signed(stream: str) -> int:
        return await publish_concurrent(stream, BENCH_SIGNING_KEYS)

    async def publish_concurrent(stream: str,
                                 signing_keys: Mapping[str, bytes] | None = None) -> int:
        async with AgentCoordinator(url, stream_name=stream,
                                    signing_keys=signing_keys) as coordinator:
            async def one_task(offset: int) -> None:
                for i in range(offset, n, CONCURRENT_PUBLISHERS):
                    fields = handoff_fields(i)
                    await coordinator.publish_handoff_ready(
                        fields["from_agent"], fields["to_agent"], fields["session_id"], CONTEXT)

            await asyncio.gather(*(one_task(k) for k in range(CONCURRENT_PUBLISHERS)))
        return n

    return [
        Throughput("redis_py_pipeline", f"raw redis-py: pipelined XADD ({BATCH}/batch)", n,
                   redis_py_pipeline),
        Throughput("publish_many", f"agentstreams publish_many ({BATCH}/call, in sequence)", n,
                   publish_many),
        Throughput("publish_concurrent",
                   f"agentstreams publish from {CONCURRENT_PUBLISHERS} tasks at once (coalesced)",
                   n, publish_concurrent),
        Throughput("publish_many_signed", "publish_many, signed", n, publish_many_signed),
        Throughput("publish_concurrent_signed", "concurrent publish, signed", n,
                   publish_concurrent_signed),
    ]


# ----------------------------------------------------------------------------- consuming


async def prefill(url: str, stream: str, n: int, group: str = "bench",
                  signing_keys: Mapping[str, bytes] | None = None) -> None:
    """``n`` agentstreams-format events in ``stream`` (signed with ``signing_keys``), and
    ``group`` reading from the start."""
    client = aioredis.Redis.from_url(url)
    try:
        publisher = Publisher(client, stream, signing_keys=signing_keys)
        for start in range(0, n, 1000):
            await publisher.publish_many([{"type": "handoff_ready", **handoff_fields(i)}
                                          for i in range(start, min(n, start + 1000))])
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    finally:
        await client.aclose()


def consume_scenarios(url: str, cfg: BenchConfig) -> list[Throughput]:
    """Consuming with acknowledgement: raw batched loop, the reference's pattern, the Worker."""
    n = cfg.consume_events
    group = "bench"

    async def fill(stream: str) -> None:
        await prefill(url, stream, n, group)

    async def fill_signed(stream: str) -> None:
        await prefill(url, stream, n, group, BENCH_SIGNING_KEYS)

    async def redis_py_consume(stream: str) -> int:
        client = aioredis.Redis.from_url(url)
        handled = 0
        try:
            while handled < n:
                reply: Any = await client.xreadgroup(group, "c", {stream: ">"}, count=BATCH,
                                                     block=1000)
                if not reply:
                    break
                ids = []
                for _stream, entries in reply:
                    for msg_id, fields in entries:
                        decode_entry(msg_id.decode(), fields, stream=stream)
                        ids.append(msg_id)
                await client.xack(stream, group, *ids)
                handled += len(ids)
        finally:
            await client.aclose()
        return handled

    async def reference_subscribe(stream: str) -> int:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        handled = 0
        try:
            while handled < n:
                reply: Any = await client.xreadgroup(group, "c", {stream: ">"}, count=10,
                                                     block=1000)
                if not reply:
                    break
                for _stream, entries in reply:
                    for msg_id, data in entries:
                        event: dict[str, Any] = {}
                        for key, value in data.items():
                            try:
                                event[key] = json.loads(value)
                            except json.JSONDecodeError:
                                event[key] = value
                        event["_msg_id"] = msg_id
                        await client.xack(stream, group, msg_id)
                        handled += 1
        finally:
            await client.aclose()
        return handled

    async def worker_consume(stream: str,
                             signing_keys: Mapping[str, bytes] | None = None) -> int:
        done = asyncio.Event()
        worker = Worker(url, stream, group, "c", probe_server=False, block_ms=200,
                        signing_keys=signing_keys)

        @worker.handler()
        async def handle(event: Event) -> None:
            return None

        async def watch() -> None:
            while worker.stats.acked < n:  # noqa: ASYNC110 - polls a counter, not an event
                await asyncio.sleep(0.002)
            done.set()

        await worker.start()
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(done.wait(), timeout=max(60.0, n / 1000))
        finally:
            watcher.cancel()
            await worker.stop(timeout_s=5)
        if worker.stats.unauthenticated or worker.stats.dead_lettered:
            raise RuntimeError(f"worker_consume: {worker.stats.unauthenticated} entries did "
                               "not verify")
        return worker.stats.acked

    async def worker_consume_signed(stream: str) -> int:
        return await worker_consume(stream, BENCH_SIGNING_KEYS)

    return [
        Throughput("redis_py_consume",
                   f"raw redis-py: XREADGROUP COUNT {BATCH} + decode + 1 XACK/batch", n,
                   redis_py_consume, fill),
        Throughput("reference_subscribe", "reference-style subscribe (COUNT 10, 1 XACK/event)",
                   n, reference_subscribe, fill),
        Throughput("worker_consume", "agentstreams Worker, no-op handler, until all acked", n,
                   worker_consume, fill),
        Throughput("worker_consume_signed", "Worker verifying signed events (signing_keys)", n,
                   worker_consume_signed, fill_signed),
    ]


# ----------------------------------------------------------------------------- latency


def rate_label(rate: int) -> str:
    """``2000`` -> ``2k``, ``500`` -> ``0.5k`` (scenario names)."""
    return f"{rate / 1000:g}k"


def pace_publisher(url: str, stream: str, rate: int, seconds: float) -> None:
    """Publish ``rate`` events/s for ``seconds`` (a separate process), each stamped with its
    send time: the events that are due go out in one pipelined round trip of XADDs, packed
    by the publisher's own encoder (so the entries are the ones agentstreams writes)."""
    client = redis.Redis.from_url(url)
    conn = client.connection_pool.get_connection()
    head = f"$4\r\nXADD\r\n${len(stream.encode())}\r\n{stream}\r\n$1\r\n*\r\n"
    total = int(rate * seconds)
    sent = 0
    started = time.perf_counter()
    try:
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1) - sent
            if due <= 0:
                time.sleep(max(0.0, (sent + 1) / rate - (time.perf_counter() - started)))
                continue
            now = time.time()
            parts = []
            for k in range(due):
                nargs, body = encode_event_resp("bench", {"seq": sent + k, "timestamp": now})
                parts.append(f"*{3 + nargs}\r\n{head}{body}")
            conn.send_packed_command(["".join(parts).encode()])  # type: ignore[no-untyped-call]
            for _ in range(due):
                conn.read_response()
            sent += due
    finally:
        client.connection_pool.release(conn)
        client.close()


def _start_pacer(url: str, stream: str, rate: int, seconds: float
                 ) -> multiprocessing.process.BaseProcess:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=pace_publisher, args=(url, stream, rate, seconds),
                              daemon=True)
    process.start()
    return process


def _latency_stats(latencies_s: list[float], warmup: int) -> tuple[float, float, int]:
    kept = sorted(latencies_s[warmup:])
    return percentile(kept, 0.50) * 1000, percentile(kept, 0.99) * 1000, len(kept)


async def _wait_pacer(process: multiprocessing.process.BaseProcess) -> None:
    while process.is_alive():  # noqa: ASYNC110 - a process, not an asyncio event
        await asyncio.sleep(0.05)
    process.join()


async def bench_latency_redis_py(url: str, cfg: BenchConfig, rate: int) -> ScenarioResult:
    """Raw redis-py: a bare blocking XREADGROUP loop (COUNT BATCH, XACK per batch)."""
    stream, group = _unique("lat"), "bench"
    total = int(rate * cfg.latency_s)
    client = aioredis.Redis.from_url(url)
    await client.xgroup_create(stream, group, id="$", mkstream=True)
    latencies: list[float] = []
    with RssSampler() as rss:
        pacer = _start_pacer(url, stream, rate, cfg.latency_s)
        deadline = time.monotonic() + cfg.latency_s + 30
        try:
            while len(latencies) < total and time.monotonic() < deadline:
                reply: Any = await client.xreadgroup(group, "c", {stream: ">"}, count=BATCH,
                                                     block=100)
                if not reply:
                    continue
                ids = []
                for _stream, entries in reply:
                    for msg_id, fields in entries:
                        event = decode_entry(msg_id.decode(), fields, stream=stream)
                        latencies.append(time.time() - event.data["timestamp"])
                        ids.append(msg_id)
                await client.xack(stream, group, *ids)
        finally:
            await _wait_pacer(pacer)
            await client.aclose()
            await _cleanup(url, stream)
    p50, p99, kept = _latency_stats(latencies, int(total * LATENCY_WARMUP_FRACTION))
    return ScenarioResult(f"latency_redis_py_{rate_label(rate)}",
                          f"raw redis-py: blocking XREADGROUP loop at {rate}/s", len(latencies),
                          cfg.latency_s, len(latencies) / cfg.latency_s, p50_ms=p50, p99_ms=p99,
                          peak_rss_mb=rss.peak_mb, extra={"rate": rate, "counted": kept})


async def bench_latency_worker(url: str, cfg: BenchConfig, rate: int) -> ScenarioResult:
    """agentstreams: a Worker whose handler records publish-to-handler latency."""
    stream, group = _unique("lat"), "bench"
    total = int(rate * cfg.latency_s)
    latencies: list[float] = []
    done = asyncio.Event()
    worker = Worker(url, stream, group, "c", probe_server=False, block_ms=1000,
                    group_start_id="$")

    @worker.handler()
    async def handle(event: Event) -> None:
        latencies.append(time.time() - event.data["timestamp"])
        if len(latencies) >= total:
            done.set()

    with RssSampler() as rss:
        await worker.start()
        pacer = _start_pacer(url, stream, rate, cfg.latency_s)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=cfg.latency_s + 30)
        finally:
            await _wait_pacer(pacer)
            await worker.stop(timeout_s=5)
            await _cleanup(url, stream)
    p50, p99, kept = _latency_stats(latencies, int(total * LATENCY_WARMUP_FRACTION))
    return ScenarioResult(f"latency_worker_{rate_label(rate)}",
                          f"agentstreams Worker at {rate}/s", len(latencies), cfg.latency_s,
                          len(latencies) / cfg.latency_s, p50_ms=p50, p99_ms=p99,
                          peak_rss_mb=rss.peak_mb, extra={"rate": rate, "counted": kept})


# ----------------------------------------------------------------------------- memory


async def bench_memory(url: str, cfg: BenchConfig) -> ScenarioResult:
    """A slow handler under a growing backlog: resident memory must stay flat."""
    stream, group = _unique("mem"), "bench"
    handled = 0
    worker = Worker(url, stream, group, "c", probe_server=False, block_ms=500,
                    group_start_id="$")

    @worker.handler()
    async def handle(event: Event) -> None:
        nonlocal handled
        await asyncio.sleep(cfg.memory_handler_s)
        handled += 1

    with RssSampler(interval_s=max(0.05, cfg.memory_s / 200)) as rss:
        await worker.start()
        pacer = _start_pacer(url, stream, cfg.memory_publish_rate, cfg.memory_s)
        try:
            await _wait_pacer(pacer)
        finally:
            await worker.stop(timeout_s=2)
    client = aioredis.Redis.from_url(url)
    backlog = int(await client.xlen(stream)) - handled
    await client.aclose()
    await _cleanup(url, stream)
    # Compare the second quarter with the last (the first is start-up and warm-up).
    samples = [mb for t, mb in rss.samples if t <= cfg.memory_s]
    quarter = max(1, len(samples) // 4)
    early = statistics.median(samples[quarter:2 * quarter] or samples)
    late = statistics.median(samples[-quarter:])
    growth = (late - early) / early
    return ScenarioResult(
        "memory_slow_handler",
        f"Worker, {cfg.memory_handler_s * 1000:.0f} ms handler, {cfg.memory_publish_rate}/s in, "
        f"{cfg.memory_s:.0f} s", handled, cfg.memory_s, handled / cfg.memory_s,
        peak_rss_mb=rss.peak_mb,
        extra={"rss_early_mb": round(early, 2), "rss_late_mb": round(late, 2),
               "rss_growth": round(growth, 4), "backlog_at_end": backlog,
               "rss_samples_mb": [round(mb, 2) for _, mb in rss.samples[::max(
                   1, len(rss.samples) // 60)]]})


# ----------------------------------------------------------------------------- the suite


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def judge(report: ServerReport) -> None:
    """Fill in ratios and targets (all as ratios within this one run)."""
    r = report.by_name()

    def compare(name: str, baseline: str, target: str | None = None,
                minimum: float | None = None) -> None:
        if name not in r or baseline not in r:
            return
        row = r[name]
        row.baseline = baseline
        row.ratio = _ratio(row.events_per_s, r[baseline].events_per_s)
        if target is not None and minimum is not None and row.ratio is not None:
            row.target = target
            row.met = row.ratio >= minimum

    compare("reference_publish", "redis_py_xadd")
    compare("redis_py_pipeline", "redis_py_xadd")
    compare("publish", "redis_py_xadd", ">= 0.90x redis_py_xadd", 0.90)
    compare("publish_many", "reference_publish", ">= 25x reference_publish", 25.0)
    compare("publish_concurrent", "reference_publish", ">= 25x reference_publish", 25.0)
    compare("reference_subscribe", "redis_py_consume")
    compare("worker_consume", "reference_subscribe", ">= 12x reference_subscribe", 12.0)
    # Signing costs at most 15 % of the time: >= 1/1.15 of the unsigned throughput. The
    # client CPU per event of both is kept too (steadier when the machine is busy).
    for signed in ("publish", "publish_many", "publish_concurrent", "worker_consume"):
        compare(f"{signed}_signed", signed, f">= 0.87x {signed} (<= 15% overhead)", 1 / 1.15)
        if f"{signed}_signed" in r and signed in r:
            row, base = r[f"{signed}_signed"], r[signed]
            row.extra["client_cpu_ratio"] = _ratio(row.extra.get("client_cpu_us_per_event"),
                                                   base.extra.get("client_cpu_us_per_event"))
    for row in report.results:
        if row.name.startswith("latency_worker_"):
            suffix = row.name.removeprefix("latency_worker_")
            raw = r.get(f"latency_redis_py_{suffix}")
            rate = row.extra.get("rate", 0)
            if raw is not None and row.p99_ms is not None and raw.p99_ms:
                row.baseline = raw.name
                row.ratio = row.p99_ms / raw.p99_ms
                row.extra["p50_ratio"] = _ratio(row.p50_ms, raw.p50_ms)
            if rate <= 5_000 and raw is not None and row.p50_ms is not None:
                row.target = "p50 and p99 <= 1.10x raw"
                p50_ratio = row.extra.get("p50_ratio")
                row.met = (p50_ratio is not None and p50_ratio <= 1.10
                           and row.ratio is not None and row.ratio <= 1.10)
            elif rate >= 20_000 and row.p99_ms is not None:
                row.target = "p99 <= 2 ms"
                row.met = row.p99_ms <= 2.0
        if row.name == "memory_slow_handler":
            row.target = "RSS growth <= 10%"
            row.met = abs(float(row.extra["rss_growth"])) <= 0.10


async def run_suite(url: str, server: str, cfg: BenchConfig, *,
                    only: set[str] | None = None,
                    progress: Callable[[str], None] | None = None) -> ServerReport:
    """Every scenario against ``url`` (or the groups named in ``only``: ``publish``,
    ``batch``, ``consume``, ``latency``, ``memory``), judged."""
    client = aioredis.Redis.from_url(url)
    info = await client.info("server")
    await client.aclose()
    version = str(info.get("valkey_version") or info.get("redis_version") or "?")
    report = ServerReport(server=server, url=url, version=version)

    def wanted(group: str) -> bool:
        if only is None or group in only:
            if progress is not None:
                progress(group)
            return True
        return False

    if wanted("publish"):
        report.results += await run_interleaved(url, publish_scenarios(url, cfg), cfg.rounds)
    if wanted("batch"):
        report.results += await run_interleaved(url, batch_publish_scenarios(url, cfg),
                                                cfg.rounds)
    if wanted("consume"):
        report.results += await run_interleaved(url, consume_scenarios(url, cfg), cfg.rounds)
    if wanted("latency"):
        for rate in cfg.latency_rates:
            report.results.append(await bench_latency_redis_py(url, cfg, rate))
            report.results.append(await bench_latency_worker(url, cfg, rate))
    if wanted("memory"):
        report.results.append(await bench_memory(url, cfg))
    judge(report)
    return report


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on (for comparing runs)."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    versions: dict[str, str] = {}
    for module in ("redis", "hiredis", "orjson"):
        with contextlib.suppress(Exception):
            versions[module] = str(__import__(module).__version__)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": versions,
        "note": "client and server share the same CPUs; the server is one process on loopback",
    }


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Benchmarks stop and start workers many times: keep their info logs out of the table."""
    import logging

    logger = logging.getLogger("agentstreams")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

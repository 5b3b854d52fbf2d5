"""Fault injection with real processes and real servers: kills, restarts, pauses, garbage.

Each test prints its figures (run pytest with -s to see them, CI logs them with -rA).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import ConnectionLostError, Event, Worker
from agentstreams._dlq import DeadLetterQueue
from agentstreams._publisher import Publisher
from agentstreams._streams import autoclaim_all
from agentstreams.server import LocalServer
from conftest import wait_for

pytestmark = pytest.mark.slow

WORKER_SCRIPT = Path(__file__).parent / "fault_support" / "worker_proc.py"
REPO_ROOT = Path(__file__).parent.parent


class WorkerProcesses:
    """Spawns worker_proc.py processes and makes sure none outlives the test."""

    def __init__(self, url: str, stream: str, record_key: str, tmp: Path, **options: Any):
        self.url = url
        self.stream = stream
        self.record_key = record_key
        self.tmp = tmp
        self.options = options
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        ready = self.tmp / f"{name}.{time.monotonic_ns()}.ready"
        cmd = [sys.executable, str(WORKER_SCRIPT), "--url", self.url, "--stream", self.stream,
               "--name", name, "--record-key", self.record_key, "--ready-file", str(ready)]
        for key, value in self.options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
        # stderr (the worker's log) also goes to <name>.log, for tests that read what it says
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(cmd, env=env, stderr=log)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"worker {name} did not become ready")
            time.sleep(0.02)
        self.procs[name] = proc
        return proc

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture
def fault_server() -> Iterator[LocalServer]:
    """A Valkey of this test's own, so pausing or killing it disturbs nobody else."""
    server = LocalServer("valkey")
    server.start()
    yield server
    server.resume()
    server.stop()


@pytest.fixture
async def fault_raw(fault_server: LocalServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(fault_server.url)
    yield client
    await client.aclose()


async def handled_counts(raw: aioredis.Redis, key: str) -> Counter[int]:
    rows: Any = await raw.lrange(key, 0, -1)
    return Counter(int(row.split(b":")[0]) for row in rows)


async def test_kill9_workers_repeatedly_loses_nothing(
        fault_server: LocalServer, fault_raw: aioredis.Redis, tmp_path: Path) -> None:
    stream, record = "kill9", "kill9:handled"
    visibility_ms = 1000
    pool = WorkerProcesses(fault_server.url, stream, record, tmp_path, handler_ms=20,
                           visibility_ms=visibility_ms, reclaim_ms=200, concurrency=8,
                           prefetch=8)
    publisher = Publisher(fault_raw, stream)
    await fault_raw.xgroup_create(stream, "g", id="0", mkstream=True)
    rng = random.Random(7)
    names = ["w0", "w1", "w2"]
    try:
        for name in names:
            pool.spawn(name)
        total_duplicates = 0
        for round_no in range(3):
            base = round_no * 1000
            await fault_raw.delete(record)
            await publisher.publish_many([{"type": "task", "n": base + i} for i in range(1000)])
            await wait_for(lambda: _handled_at_least(fault_raw, record, 150), timeout_s=20)
            victim = rng.choice(names)
            pool.kill9(victim)
            killed_at = time.monotonic()
            # What the dead worker held at the moment of the kill: only these may repeat.
            held: Any = await fault_raw.xpending_range(stream, "g", "-", "+", 1000,
                                                  consumername=victim)
            held_n = set(await _ids_to_n(fault_raw, stream, [h["message_id"] for h in held]))
            # The replacement comes back under a new name, as a new pod would.
            replacement = f"{victim}-r{round_no}"
            names[names.index(victim)] = replacement
            pool.spawn(replacement)
            await wait_for(functools.partial(_round_complete, fault_raw, stream, record, base),
                           timeout_s=30, message=f"round {round_no} complete")
            recovery_s = time.monotonic() - killed_at
            counts = await handled_counts(fault_raw, record)
            duplicates = {n for n, c in counts.items() if c > 1}
            total_duplicates += sum(counts[n] - 1 for n in duplicates)
            print(f"round {round_no}: killed {victim} holding {len(held)} entries; "
                  f"duplicates {len(duplicates)}; recovered in {recovery_s:.2f}s")
            assert set(counts) == set(range(base, base + 1000)), "an event was lost"
            assert duplicates <= held_n, "duplicates outside the killed worker's in-flight set"
            assert recovery_s <= visibility_ms / 1000 + 2 + 1.0  # + time to drain the backlog
        print(f"3 kills, 3000 events: 0 lost, {total_duplicates} duplicates")
    finally:
        pool.stop_all()


async def _ids_to_n(raw: aioredis.Redis, stream: str, ids: list[bytes]) -> list[int]:
    out = []
    for msg_id in ids:
        rows: Any = await raw.xrange(stream, min=msg_id, max=msg_id)
        if rows:
            value = rows[0][1][b"n"]
            out.append(int(value))
    return out


async def _handled_at_least(raw: aioredis.Redis, key: str, n: int) -> bool:
    return int(await raw.llen(key)) >= n


async def _round_complete(raw: aioredis.Redis, stream: str, key: str, base: int) -> bool:
    counts = await handled_counts(raw, key)
    if set(counts) != set(range(base, base + 1000)):
        return False
    return int((await raw.xpending(stream, "g"))["pending"]) == 0


async def test_sigterm_finishes_in_flight_work_and_exits(
        fault_server: LocalServer, fault_raw: aioredis.Redis, tmp_path: Path) -> None:
    stream, record = "sigterm", "sigterm:handled"
    pool = WorkerProcesses(fault_server.url, stream, record, tmp_path, handler_ms=400,
                           concurrency=4, prefetch=4, visibility_ms=30_000)
    await fault_raw.xgroup_create(stream, "g", id="0", mkstream=True)
    try:
        proc = pool.spawn("term")
        await Publisher(fault_raw, stream).publish_many(
            [{"type": "task", "n": i} for i in range(30)])
        await wait_for(lambda: _handled_at_least(fault_raw, f"{record}:started", 4))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        started_rows: Any = await fault_raw.lrange(f"{record}:started", 0, -1)
        started = [int(x.split(b":")[0]) for x in started_rows]
        finished = await handled_counts(fault_raw, record)
        assert set(started) == set(finished), "a handler was cut off half-way"
        pending: Any = await fault_raw.xpending_range(stream, "g", "-", "+", 100)
        pending_n = set(await _ids_to_n(fault_raw, stream, [p["message_id"] for p in pending]))
        assert not pending_n & set(finished), "finished work was left unacknowledged"
        print(f"SIGTERM: {len(finished)} in-flight finished and acked, {len(pending_n)} "
              "prefetched left pending for the others")
    finally:
        pool.stop_all()


async def test_second_sigint_stops_without_waiting_for_running_handlers(
        fault_server: LocalServer, fault_raw: aioredis.Redis, tmp_path: Path) -> None:
    """Ctrl-C: the worker says how many handlers it waits for and that a second Ctrl-C stops
    now; the second one is honoured, and the cut-off entries stay pending for the others."""
    stream, record = "sigint", "sigint:handled"
    pool = WorkerProcesses(fault_server.url, stream, record, tmp_path, handler_ms=60_000,
                           concurrency=2, prefetch=0, visibility_ms=30_000, shutdown_s=60)
    await fault_raw.xgroup_create(stream, "g", id="0", mkstream=True)
    try:
        proc = pool.spawn("int")
        await Publisher(fault_raw, stream).publish_many(
            [{"type": "task", "n": i} for i in range(2)])
        await wait_for(lambda: _handled_at_least(fault_raw, f"{record}:started", 2))
        proc.send_signal(signal.SIGINT)
        log = tmp_path / "int.log"
        await wait_for(lambda: _contains(log, "Ctrl-C again to stop now"),
                       message="the worker saying what it waits for")
        assert "waiting for 2 running handlers" in log.read_text()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5, "the second Ctrl-C was not honoured"
        pending: Any = await fault_raw.xpending(stream, "g")
        assert pending["pending"] == 2  # cut off: redelivered to another worker later
        assert await fault_raw.llen(record) == 0
    finally:
        pool.stop_all()


async def _contains(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()  # noqa: ASYNC240 - a small local file


async def test_server_restart_with_aof_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    server = LocalServer("valkey", appendonly=True, appendfsync="always")
    server.start()
    raw = aioredis.Redis.from_url(server.url)
    stream = "restart"
    handled: Counter[int] = Counter()
    first_after_restart: list[float] = []
    restarted_at: list[float] = []
    worker = Worker(server.url, stream, "g", "w", visibility_timeout_ms=1000, block_ms=200,
                    probe_server=False, reclaim_interval_ms=200)

    @worker.handler()
    async def handle(event: Event) -> None:
        handled[event["n"]] += 1
        if restarted_at and not first_after_restart and event["n"] >= 300:
            first_after_restart.append(time.monotonic())

    publisher = Publisher(raw, stream)
    acknowledged: set[int] = set()
    retries = 0
    try:
        await worker.start()
        for n in range(600):
            if n == 300:
                server.kill()
                await asyncio.sleep(0.3)
                server.start()
                restarted_at.append(time.monotonic())
            while True:
                try:
                    await publisher.publish("task", {"n": n}, idempotency_key=f"n{n}")
                    acknowledged.add(n)
                    break
                except ConnectionLostError:
                    retries += 1
                    await asyncio.sleep(0.05)
        await wait_for(lambda: _covers(handled, acknowledged), timeout_s=20,
                       message="every acknowledged publish handled")
        entries: Any = await raw.xrange(stream)
        stored = Counter(int(fields[b"n"]) for _id, fields in entries)
        latency = first_after_restart[0] - restarted_at[0]
        print(f"server restart: {len(acknowledged)} acknowledged publishes, 0 lost, "
              f"{retries} publish retries, {worker.stats.reconnects} worker reconnects, "
              f"first new event consumed {latency:.2f}s after restart")
        assert acknowledged == set(range(600))
        assert max(stored.values()) == 1, "an idempotent retry wrote twice"
        assert worker.stats.reconnects >= 1
        assert latency <= 2.0
    finally:
        await worker.stop(timeout_s=2)
        await raw.aclose()
        server.stop()


async def _covers(handled: Counter[int], wanted: set[int]) -> bool:
    return wanted <= set(handled)


async def test_client_pause_and_frozen_server_are_survived(
        fault_server: LocalServer, fault_raw: aioredis.Redis) -> None:
    seen: list[int] = []
    worker = Worker(fault_server.url, "pause", "g", "w", block_ms=300, probe_server=False,
                    visibility_timeout_ms=2000)

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    publisher = Publisher(fault_raw, "pause")
    await worker.start()
    try:
        await fault_raw.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "PAUSE", 2500, "ALL")
        paused_at = time.monotonic()
        await asyncio.sleep(0.1)
        await publisher.publish("task", {"n": 1})  # waits for the pause to end
        await wait_for(lambda: _has(seen, 1), timeout_s=10, message="delivery after PAUSE")
        print(f"CLIENT PAUSE 2.5s: delivered {time.monotonic() - paused_at:.2f}s after pause")
        # A frozen server (SIGSTOP) looks like a half-open connection: reads must time out.
        fault_server.pause()
        await asyncio.sleep(6.5)  # longer than the worker's socket timeout (block + 5 s)
        fault_server.resume()
        resumed_at = time.monotonic()
        await publisher.publish("task", {"n": 2})
        await wait_for(lambda: _has(seen, 2), timeout_s=15, message="delivery after SIGCONT")
        print(f"frozen server 6.5s: delivered {time.monotonic() - resumed_at:.2f}s after "
              f"resume; reconnects={worker.stats.reconnects}")
        assert seen == [1, 2]
        assert worker.stats.reconnects >= 1
    finally:
        fault_server.resume()
        await worker.stop(timeout_s=2)


async def _has(seen: list[int], n: int) -> bool:
    return n in seen


async def test_fuzzed_garbage_never_stops_the_loop(
        fault_server: LocalServer, fault_raw: aioredis.Redis) -> None:
    rng = random.Random(1234)
    publisher = Publisher(fault_raw, "fuzz")
    good: list[int] = []
    worker = Worker(fault_server.url, "fuzz", "g", "w", block_ms=200, probe_server=False)

    @worker.handler()
    async def handle(event: Event) -> None:
        good.append(event["n"])

    garbage = 0
    for i in range(200):
        await publisher.publish("task", {"n": i})
        fields: dict[bytes, bytes] = {}
        for _ in range(rng.randint(1, 6)):
            key = rng.randbytes(rng.randint(1, 12))
            fields[key] = rng.randbytes(rng.randint(0, 64))
        if rng.random() < 0.3:  # half-valid: a type but broken metadata
            fields[b"type"] = b"task"
            fields[b"_v"] = b"1"
            fields[b"_json"] = b"n"
            fields[b"n"] = rng.randbytes(8)
        if b"type" not in fields or rng.random() < 0.5:
            await fault_raw.xadd("fuzz", fields)  # type: ignore[arg-type]
            garbage += 1
    await worker.start()
    try:
        await wait_for(lambda: _len_at_least(good, 200), timeout_s=15)
        dlq = DeadLetterQueue(fault_raw, "fuzz")
        await wait_for(lambda: _dlq_at_least(dlq, garbage), timeout_s=15)
        letters = await dlq.list(count=1000)
        assert all(x.reason == "malformed" and x.error for x in letters)
        assert sorted(good) == list(range(200))
        assert int((await fault_raw.xpending("fuzz", "g"))["pending"]) == 0
        print(f"fuzz: {garbage} garbage entries dead-lettered, 200 good ones handled")
    finally:
        await worker.stop(timeout_s=2)


async def _len_at_least(items: list[int], n: int) -> bool:
    return len(items) >= n


async def _dlq_at_least(dlq: DeadLetterQueue, n: int) -> bool:
    return await dlq.length() >= n


async def test_reclaimer_follows_the_cursor_past_fresh_entries(
        fault_server: LocalServer, fault_raw: aioredis.Redis) -> None:
    stream = "starve"
    publisher = Publisher(fault_raw, stream)
    await fault_raw.xgroup_create(stream, "g", id="0", mkstream=True)
    fresh_ids: list[Any] = await publisher.publish_many(
        [{"type": "t", "n": i} for i in range(2000)])
    await publisher.publish_many([{"type": "t", "n": 2000 + i} for i in range(10)])
    await fault_raw.xreadgroup("g", "x", {stream: ">"}, count=2010)
    await asyncio.sleep(0.3)
    # The first 2,000 are refreshed (idle 0); only the last 10 are idle.
    for start in range(0, 2000, 500):
        await fault_raw.xclaim(stream, "g", "x", 0, fresh_ids[start:start + 500], justid=True)
    claimed, deleted = await autoclaim_all(fault_raw, stream, "g", "y", min_idle_ms=250,
                                           count=10)
    assert len(claimed) == 10
    assert deleted == []
    print("reclaimer: 10 idle entries found behind 2,000 fresh ones (COUNT 10)")


async def test_consumer_name_churn_stays_bounded(
        fault_server: LocalServer, fault_raw: aioredis.Redis) -> None:
    stream = "churn"
    publisher = Publisher(fault_raw, stream)
    handled: Counter[int] = Counter()
    for i in range(50):
        worker = Worker(fault_server.url, stream, "g", f"pod-{i}", block_ms=100,
                        probe_server=False, consumer_cleanup_idle_ms=1,
                        reclaim_interval_ms=20, visibility_timeout_ms=200)

        @worker.handler()
        async def handle(event: Event) -> None:
            handled[event["n"]] += 1

        await worker.start()
        await publisher.publish("t", {"n": i})
        await wait_for(functools.partial(_has_key, handled, i), timeout_s=10)
        # A pod lives long enough for one cleanup pass, which removes its dead predecessors.
        await wait_for(lambda: _consumers_at_most(fault_raw, stream, 2), timeout_s=10)
        await worker.stop(timeout_s=2)
    consumers = await fault_raw.xinfo_consumers(stream, "g")
    print(f"churn: 50 restarts under fresh names -> {len(consumers)} registered consumers")
    assert set(handled) == set(range(50))
    assert len(consumers) <= 2


async def _has_key(counter: Counter[int], key: int) -> bool:
    return key in counter


async def _consumers_at_most(raw: aioredis.Redis, stream: str, n: int) -> bool:
    return len(await raw.xinfo_consumers(stream, "g")) <= n

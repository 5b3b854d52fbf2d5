"""Worker behaviour on real servers: ack, retry, dead letters, recovery, leases, shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    Event,
    InvalidArgumentError,
    Observer,
    Reject,
    Retry,
    Worker,
    WorkerFailedError,
)
from agentstreams._dlq import DeadLetterQueue
from agentstreams._publisher import Publisher
from agentstreams.server import LocalServer
from conftest import kill_clients_named, wait_for

# Small knobs keep the suite quick: recovery bound = visibility + reclaim + block + handler.
FAST: dict[str, Any] = {
    "visibility_timeout_ms": 600,
    "block_ms": 200,
    "retry_delay_s": 0.02,
    "retry_delay_max_s": 0.1,
    "probe_server": False,
    "shutdown_timeout_s": 5.0,
}


@pytest.fixture
async def publisher(raw: aioredis.Redis, stream_name: str) -> Publisher:
    return Publisher(raw, stream_name)


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[list[Worker]]:
    """Workers created by a test; all stopped at teardown."""
    created: list[Worker] = []
    yield created
    for worker in created:
        await worker.stop(timeout_s=2)


def make_worker(workers: list[Worker], redis_url: str, stream: str, **kwargs: Any) -> Worker:
    options = {**FAST, **kwargs}
    worker = Worker(redis_url, stream, options.pop("consumer_group", "g"),
                    options.pop("consumer_name", None), **options)
    workers.append(worker)
    return worker


async def pending_count(raw: aioredis.Redis, stream: str, group: str = "g") -> int:
    summary = await raw.xpending(stream, group)
    return int(summary["pending"])


def counter_reaches(counter: Callable[[], int], target: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return counter() >= target

    return check


async def test_handled_events_are_acknowledged(redis_url: str, raw: aioredis.Redis,
                                              stream_name: str, publisher: Publisher,
                                              workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    seen: list[Any] = []

    @worker.handler("task")
    async def on_task(event: Event) -> None:
        seen.append(event["n"])

    await worker.start()
    await publisher.publish_many([{"type": "task", "n": i} for i in range(50)])
    await wait_for(counter_reaches(lambda: worker.stats.acked, 50), message="50 acks")
    assert sorted(seen) == list(range(50))
    assert await pending_count(raw, stream_name) == 0
    assert worker.stats.succeeded == 50


async def test_event_fields_keep_their_types(redis_url: str, stream_name: str,
                                             publisher: Publisher,
                                             workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    got: list[Event] = []

    @worker.handler()
    async def on_any(event: Event) -> None:
        got.append(event)

    await worker.start()
    payload = {"session_id": "123", "flag": "true", "none": None, "n": 7, "x": 1.5,
               "nested": {"a": ["null", 2, False]}}
    event_id = "e" * 32
    await publisher.publish("state_changed", payload, event_id=event_id)
    await wait_for(counter_reaches(lambda: len(got), 1))
    event = got[0]
    assert {k: event[k] for k in payload} == payload
    assert event.event_id == event_id
    assert event.version == 1
    assert event.delivery_count == 1
    assert isinstance(event.timestamp, float)


async def test_unhandled_types_are_acknowledged_and_counted(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    handled: list[str] = []

    @worker.handler("wanted")
    async def on_wanted(event: Event) -> None:
        handled.append(event.type)

    await worker.start()
    await publisher.publish_many([{"type": "other"}, {"type": "wanted"}, {"type": "other"}])
    await wait_for(counter_reaches(lambda: worker.stats.acked, 3))
    assert handled == ["wanted"]
    assert worker.stats.unhandled == 2
    assert await pending_count(raw, stream_name) == 0


async def test_failed_handler_is_retried_with_counted_deliveries(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, max_deliveries=5)
    attempts: list[int] = []

    @worker.handler()
    async def flaky(event: Event) -> None:
        attempts.append(event.delivery_count)
        if len(attempts) < 3:
            raise RuntimeError("transient")

    await worker.start()
    await publisher.publish("task", {"n": 1})
    await wait_for(counter_reaches(lambda: worker.stats.acked, 1))
    assert attempts == [1, 2, 3]
    assert worker.stats.retried == 2
    assert await pending_count(raw, stream_name) == 0
    assert await DeadLetterQueue(raw, stream_name).length() == 0


async def test_poison_event_is_dead_lettered_after_exactly_max_deliveries(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, max_deliveries=4, concurrency=8)
    attempts: Counter[int] = Counter()
    done: set[int] = set()

    @worker.handler("task")
    async def handle(event: Event) -> None:
        attempts[event["n"]] += 1
        if event["n"] == 13:
            raise ValueError("cannot process 13")
        done.add(event["n"])

    await worker.start()
    ids = await publisher.publish_many([{"type": "task", "n": i} for i in range(200)])
    await wait_for(counter_reaches(lambda: worker.stats.dead_lettered, 1),
                   message="the poison event in the DLQ")
    await wait_for(counter_reaches(lambda: len(done), 199), message="the 199 others")
    assert attempts[13] == 4
    assert all(attempts[n] == 1 for n in range(200) if n != 13)
    letters = await DeadLetterQueue(raw, stream_name).list()
    assert len(letters) == 1
    letter = letters[0]
    assert letter.original_id == ids[13]
    assert letter.reason == "max_deliveries"
    assert letter.error == "ValueError: cannot process 13"
    # The handler's traceback is kept (innermost frames: the handler's own line is there).
    assert letter.traceback.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("cannot process 13")' in letter.traceback
    assert letter.traceback.rstrip().endswith("ValueError: cannot process 13")
    assert letter.deliveries == 4
    assert letter.event()["n"] == 13
    # The raw entry has the documented fields beside the original ones.
    rows: Any = await raw.xrange(f"{{{stream_name}}}:dlq")
    raw_entry = rows[0][1]
    assert raw_entry[b"original_id"] == ids[13].encode()
    assert raw_entry[b"deliveries"] == b"4"
    assert raw_entry[b"type"] == b"task"
    assert raw_entry[b"traceback"].decode() == letter.traceback
    await wait_for(lambda: _pending_is(raw, stream_name, 0), message="nothing pending")


async def _pending_is(raw: aioredis.Redis, stream: str, expected: int) -> bool:
    return await pending_count(raw, stream) == expected


async def test_reject_dead_letters_at_once_and_retry_defers(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, max_deliveries=10)
    deliveries: Counter[str] = Counter()

    @worker.handler("reject")
    async def on_reject(event: Event) -> None:
        deliveries["reject"] += 1
        raise Reject("bad request")

    @worker.handler("later")
    async def on_later(event: Event) -> None:
        deliveries["later"] += 1
        if event.delivery_count == 1:
            raise Retry(delay_s=0.05)

    await worker.start()
    await publisher.publish("reject", {})
    await publisher.publish("later", {})
    await wait_for(counter_reaches(lambda: worker.stats.acked, 1))
    await wait_for(counter_reaches(lambda: worker.stats.dead_lettered, 1))
    assert deliveries == {"reject": 1, "later": 2}
    letters = await DeadLetterQueue(raw, stream_name).list()
    assert [(x.reason, x.error) for x in letters] == [("rejected", "bad request")]


@pytest.mark.parametrize(
    ("fields", "reason_part"),
    [
        ({b"session_id": b"s1"}, "no 'type'"),
        ({b"type": b"t", b"_v": b"1", b"_json": b"ctx", b"ctx": b"{not json"}, "does not parse"),
        ({b"type": b"t", b"name": b"\xff\xfe broken"}, "not valid UTF-8"),
        ({b"type": b"t", b"_v": b"99"}, "format version"),
        ({b"type": b"t", b"blob": b"x" * (5 * 1024 * 1024)}, "over the"),
    ],
    ids=["missing-type", "invalid-json", "non-utf8", "future-version", "5MB-field"],
)
async def test_garbage_entries_are_dead_lettered_and_the_batch_goes_on(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker], fields: dict[bytes, bytes], reason_part: str) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    seen: list[int] = []

    @worker.handler()
    async def on_any(event: Event) -> None:
        seen.append(event["n"])

    await publisher.publish("task", {"n": 1})
    added: Any = await raw.xadd(stream_name, fields)  # type: ignore[arg-type]
    bad_id = added.decode()
    await publisher.publish("task", {"n": 2})
    await worker.start()
    await wait_for(counter_reaches(lambda: len(seen), 2))
    await wait_for(counter_reaches(lambda: worker.stats.dead_lettered, 1))
    assert seen == [1, 2]
    assert worker.stats.malformed == 1
    letters = await DeadLetterQueue(raw, stream_name).list()
    assert len(letters) == 1
    assert letters[0].original_id == bad_id
    assert letters[0].reason == "malformed"
    assert reason_part in letters[0].error
    assert letters[0].fields == fields
    await wait_for(lambda: _pending_is(raw, stream_name, 0))


async def test_restarted_worker_finishes_its_own_pending_entries_first(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    await raw.xgroup_create(stream_name, "g", id="0", mkstream=True)
    await publisher.publish_many([{"type": "task", "n": i} for i in range(3)])
    # "w1" received three events and crashed before acknowledging them.
    await raw.xreadgroup("g", "w1", {stream_name: ">"}, count=3)
    await publisher.publish("task", {"n": 3})
    order: list[tuple[int, int]] = []
    worker = make_worker(workers, redis_url, stream_name, consumer_name="w1", concurrency=1,
                         visibility_timeout_ms=60_000)

    @worker.handler()
    async def handle(event: Event) -> None:
        order.append((event["n"], event.delivery_count))

    await worker.start()
    await wait_for(counter_reaches(lambda: len(order), 4))
    assert order == [(0, 2), (1, 2), (2, 2), (3, 1)]
    await wait_for(lambda: _pending_is(raw, stream_name, 0))


async def test_abandoned_entries_are_claimed_after_the_visibility_timeout(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    await raw.xgroup_create(stream_name, "g", id="0", mkstream=True)
    await publisher.publish_many([{"type": "task", "n": i} for i in range(250)])
    await raw.xreadgroup("g", "dead-worker", {stream_name: ">"}, count=250)
    # Two of the abandoned entries are deleted while pending: reported as lost, no crash.
    first_two: Any = await raw.xrange(stream_name, count=2)
    lost_ids = [x[0] for x in first_two]
    await raw.xdel(stream_name, *lost_ids)
    seen: Counter[int] = Counter()
    counts: list[int] = []
    worker = make_worker(workers, redis_url, stream_name, consumer_name="alive",
                         reclaim_interval_ms=100)

    @worker.handler()
    async def handle(event: Event) -> None:
        seen[event["n"]] += 1
        counts.append(event.delivery_count)

    await worker.start()
    await wait_for(counter_reaches(lambda: len(seen), 248), message="248 reclaimed")
    assert set(seen) == set(range(2, 250))
    assert max(seen.values()) == 1
    assert set(counts) == {2}
    assert worker.stats.claimed == 248
    await wait_for(counter_reaches(lambda: worker.stats.lost, 2))
    await wait_for(lambda: _pending_is(raw, stream_name, 0))


async def test_slow_handlers_cause_no_duplicates_with_lease_renewal(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    visibility_ms = 400
    handled: Counter[int] = Counter()
    slow = {5, 17}  # 2 of 100 take 1.5 x the visibility timeout

    async def handle(event: Event) -> None:
        handled[event["n"]] += 1
        await asyncio.sleep(1.5 * visibility_ms / 1000 if event["n"] in slow else 0.001)

    pool = []
    for name in ("a", "b"):
        worker = make_worker(workers, redis_url, stream_name, consumer_name=name,
                             visibility_timeout_ms=visibility_ms, reclaim_interval_ms=50,
                             concurrency=4, prefetch=0)
        worker.add_handler(handle)
        pool.append(worker)
        await worker.start()
    await publisher.publish_many([{"type": "task", "n": i} for i in range(100)])
    await wait_for(lambda: _all_acked(raw, stream_name, handled, 100), timeout_s=15)
    duplicates = sum(c - 1 for c in handled.values())
    print(f"lease renewal on: {duplicates} duplicate deliveries of 100 events")
    assert duplicates == 0
    assert sum(w.stats.leases_renewed for w in pool) >= len(slow)


@pytest.mark.parametrize("renewal", [True, False], ids=["renewal", "no-renewal"])
async def test_a_slow_handler_is_stolen_only_without_lease_renewal(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker], renewal: bool) -> None:
    """The regression proof: switch renewal off and the reclaimer of another worker steals."""
    visibility_ms = 300
    runs: list[str] = []
    holder = make_worker(workers, redis_url, stream_name, consumer_name="holder",
                         visibility_timeout_ms=visibility_ms, reclaim_interval_ms=60_000,
                         lease_renewal=renewal, concurrency=1, prefetch=0)

    @holder.handler()
    async def slow(event: Event) -> None:
        runs.append("holder")
        await asyncio.sleep(visibility_ms * 3 / 1000)

    await holder.start()
    await publisher.publish("task", {})
    await wait_for(counter_reaches(lambda: len(runs), 1))
    thief = make_worker(workers, redis_url, stream_name, consumer_name="thief",
                        visibility_timeout_ms=visibility_ms, reclaim_interval_ms=30)

    @thief.handler()
    async def fast(event: Event) -> None:
        runs.append("thief")

    await thief.start()
    await wait_for(counter_reaches(lambda: holder.stats.succeeded, 1), timeout_s=10)
    if renewal:
        assert runs == ["holder"]
        assert thief.stats.claimed == 0
    else:
        assert runs == ["holder", "thief"]
        assert thief.stats.claimed == 1


async def _all_acked(raw: aioredis.Redis, stream: str, handled: Counter[int], n: int) -> bool:
    return len(handled) == n and await pending_count(raw, stream) == 0


async def test_concurrency_and_local_backlog_are_bounded(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, concurrency=4, prefetch=6,
                         visibility_timeout_ms=30_000)
    release = asyncio.Event()
    running = 0
    peak = 0

    @worker.handler()
    async def handle(event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    await worker.start()
    await publisher.publish_many([{"type": "task", "n": i} for i in range(300)])
    await wait_for(counter_reaches(lambda: running, 4))
    # The worker holds at most concurrency + prefetch entries; the rest stays in the stream.
    await wait_for(lambda: _pending_is(raw, stream_name, 10))
    info = (await raw.xinfo_groups(stream_name))[0]
    assert info["lag"] == 290
    assert peak == 4
    release.set()
    await wait_for(counter_reaches(lambda: worker.stats.acked, 300))
    assert peak == 4


async def test_graceful_stop_finishes_in_flight_and_leaves_the_rest_pending(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, concurrency=2, prefetch=3,
                         visibility_timeout_ms=30_000)
    started: list[int] = []
    finished: list[int] = []
    gate = asyncio.Event()

    @worker.handler()
    async def handle(event: Event) -> None:
        started.append(event["n"])
        await gate.wait()
        await asyncio.sleep(0.05)
        finished.append(event["n"])

    await worker.start()
    await publisher.publish_many([{"type": "task", "n": i} for i in range(10)])
    await wait_for(counter_reaches(lambda: len(started), 2))
    stopping = asyncio.create_task(worker.stop(timeout_s=5))
    await asyncio.sleep(0)  # stop() is now waiting for the two running handlers
    gate.set()
    await stopping
    assert sorted(finished) == sorted(started)
    assert len(started) == 2
    # The two finished are acknowledged; the three prefetched stay pending for the others.
    assert await pending_count(raw, stream_name) == 3
    assert worker.stats.acked == 2


async def test_stop_deadline_leaves_unfinished_handlers_pending(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, concurrency=1, prefetch=0)
    started = asyncio.Event()

    @worker.handler()
    async def handle(event: Event) -> None:
        started.set()
        await asyncio.sleep(60)

    await worker.start()
    await publisher.publish("task", {})
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop(timeout_s=0.1)
    assert await pending_count(raw, stream_name) == 1
    assert worker.stats.acked == 0


async def test_worker_reconnects_after_client_kill(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    consumer = f"killme-{uuid.uuid4().hex[:8]}"
    worker = make_worker(workers, redis_url, stream_name, consumer_name=consumer)
    seen: list[int] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    await worker.start()
    await publisher.publish("task", {"n": 0})
    await wait_for(counter_reaches(lambda: len(seen), 1))
    killed = await kill_clients_named(raw, f"agentstreams:{consumer}")
    assert killed >= 1
    await publisher.publish("task", {"n": 1})
    await wait_for(counter_reaches(lambda: len(seen), 2), message="delivery after CLIENT KILL")
    assert seen == [0, 1]
    await wait_for(lambda: _pending_is(raw, stream_name, 0))


async def test_reconnect_does_not_rerun_handled_events_whose_ack_is_unsent(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    """After a reconnect the worker re-reads its pending entries; one whose handler already
    finished but whose XACK has not gone through yet must not run a second time."""
    consumer = f"slow-acker-{uuid.uuid4().hex[:8]}"
    worker = make_worker(workers, redis_url, stream_name, consumer_name=consumer)
    seen: list[int] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    await worker.start()
    gate = asyncio.Event()
    xack = worker.client.xack

    async def held_xack(*args: Any) -> Any:
        await gate.wait()
        return await xack(*args)

    worker.client.xack = held_xack  # type: ignore[method-assign,assignment]
    try:
        await publisher.publish("task", {"n": 0})
        await wait_for(counter_reaches(lambda: len(seen), 1))
        assert await pending_count(raw, stream_name) == 1  # handled, not yet acknowledged
        assert await kill_clients_named(raw, f"agentstreams:{consumer}") >= 1
        await wait_for(counter_reaches(lambda: worker.stats.reconnects, 1),
                           message="reader reconnect")
        await publisher.publish("task", {"n": 1})
        await wait_for(counter_reaches(lambda: len(seen), 2), message="delivery after reconnect")
    finally:
        gate.set()
    await wait_for(lambda: _pending_is(raw, stream_name, 0))
    assert seen == [0, 1]
    assert worker.stats.acked == 2


async def test_group_destroyed_under_the_worker_is_recreated(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    seen: list[int] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    await worker.start()
    await raw.xgroup_destroy(stream_name, "g")
    await publisher.publish("task", {"n": 1})
    await wait_for(counter_reaches(lambda: len(seen), 1), message="delivery after NOGROUP")
    assert seen == [1]


async def test_idle_consumers_that_own_nothing_are_removed(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    await raw.xgroup_create(stream_name, "g", id="0", mkstream=True)
    await raw.xgroup_createconsumer(stream_name, "g", "gone-empty")
    await publisher.publish("task", {"n": 0})
    await raw.xreadgroup("g", "gone-holding", {stream_name: ">"}, count=1)
    await asyncio.sleep(0.15)  # let both consumers' idle time pass the 100 ms threshold
    worker = make_worker(workers, redis_url, stream_name, consumer_name="alive",
                         consumer_cleanup_idle_ms=100, reclaim_interval_ms=50,
                         visibility_timeout_ms=60_000)

    @worker.handler()
    async def handle(event: Event) -> None:
        return None

    await worker.start()

    async def removed() -> bool:
        names = {c["name"] for c in await raw.xinfo_consumers(stream_name, "g")}
        return b"gone-empty" not in names

    await wait_for(removed, message="the empty idle consumer removed")
    names = {c["name"] for c in await raw.xinfo_consumers(stream_name, "g")}
    assert b"gone-holding" in names  # it still owns a pending entry
    assert worker.stats.consumers_removed >= 1


async def test_startup_probe_warns_about_non_durable_servers(
        redis_url: str, stream_name: str, workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, probe_server=True)

    @worker.handler()
    async def handle(event: Event) -> None:
        return None

    await worker.start()
    # Both test servers run without AOF. (The log line itself is written once per process and
    # server, so an AgentWorker with many agents does not repeat it.)
    assert any("appendonly=no" in text for text in worker.server_warnings)


async def test_coordinator_and_worker_share_the_wire_format(
        redis_url: str, stream_name: str, workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    got: list[Event] = []

    @worker.handler("handoff_ready")
    async def handle(event: Event) -> None:
        got.append(event)

    await worker.start()
    async with AgentCoordinator(redis_url, stream_name) as coordinator:
        msg_id = await coordinator.publish_handoff_ready("a", "b", "42", {"k": [1, "2"]})
    await wait_for(counter_reaches(lambda: len(got), 1))
    assert got[0].msg_id == msg_id
    assert got[0]["session_id"] == "42"
    assert got[0]["context"] == {"k": [1, "2"]}


@pytest.mark.parametrize(
    "kwargs",
    [{"concurrency": 0}, {"visibility_timeout_ms": 0}, {"max_deliveries": 0},
     {"block_ms": -1}, {"stream_name": ""}, {"consumer_group": ""},
     {"retry_delay_s": 5.0, "retry_delay_max_s": 1.0}, {"handler_timeout_s": 0},
     {"visibility_timeout_ms": 100, "lease_interval_ms": 200}],
)
def test_invalid_arguments_raise_a_typed_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        Worker("redis://localhost:6379", **kwargs)


def test_handlers_must_be_async() -> None:
    worker = Worker("redis://localhost:6379")

    def sync_handler(event: Event) -> None:
        return None

    with pytest.raises(InvalidArgumentError, match="async"):
        worker.add_handler(sync_handler)  # type: ignore[arg-type]


async def test_worker_without_handlers_refuses_to_start() -> None:
    worker = Worker("redis://localhost:6379")
    with pytest.raises(InvalidArgumentError, match="handler"):
        await worker.start()


@pytest.mark.parametrize("development", [False, True])
async def test_probe_warnings_are_logged_once_per_process_and_server(
        caplog: pytest.LogCaptureFixture, tmp_path: Path, development: bool) -> None:
    """Once per process and server, not once per worker; and a development server this
    library started itself (its own data directory) is not worth a warning at all."""
    data_dir = None if development else tmp_path
    with LocalServer("valkey", data_dir=data_dir) as server:
        pool = [Worker(server.url, "s", "g", f"w{i}", probe_server=True, block_ms=100)
                for i in range(3)]
        for worker in pool:
            worker.add_handler(_noop)
        with caplog.at_level("DEBUG", logger="agentstreams.worker"):
            for worker in pool:
                await worker.start()
            for worker in pool:
                await worker.stop(timeout_s=2)
    lines = [r for r in caplog.records if "appendonly=no" in r.getMessage()]
    assert [r.levelname for r in lines] == ["DEBUG" if development else "WARNING"]
    assert all(any("appendonly=no" in t for t in w.server_warnings) for w in pool)


async def _noop(event: Event) -> None:
    return None


class _FlakyObserver(Observer):
    """An observer whose ``on_handler_done`` raises: an unexpected error inside a runner."""

    def __init__(self, failures: int) -> None:
        self.failures_left = failures

    def on_handler_done(self, stream: str, group: str, event_type: str, duration_s: float,
                        ok: bool) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("observer bug")


async def test_a_runner_that_fails_unexpectedly_is_restarted(
        redis_url: str, raw: aioredis.Redis, stream_name: str, publisher: Publisher,
        workers: list[Worker]) -> None:
    """A bug that escapes a runner is logged and the runner restarted: the worker keeps
    handling events, and the event that runner held is redelivered, not lost."""
    worker = make_worker(workers, redis_url, stream_name, concurrency=1,
                         observer=_FlakyObserver(failures=1))
    seen: list[int] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    await worker.start()
    for n in range(5):
        await publisher.publish("task", {"n": n})
    await wait_for(lambda: _pending_is(raw, stream_name, 0), message="every event acked")
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]
    assert seen.count(0) == 2  # the runner died after event 0's handler: redelivered once
    assert worker.stats.task_restarts == 1
    assert worker.running
    assert worker.failure is None


async def test_a_task_that_keeps_failing_stops_the_worker_loudly(
        redis_url: str, stream_name: str, publisher: Publisher, workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, concurrency=1,
                         observer=_FlakyObserver(failures=10**6))

    @worker.handler()
    async def handle(event: Event) -> None:
        pass

    run = asyncio.create_task(worker.run(install_signal_handlers=False))
    for n in range(20):
        await publisher.publish("task", {"n": n})
    with pytest.raises(WorkerFailedError, match="runner-0") as caught:
        await asyncio.wait_for(run, 20)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert worker.stats.task_restarts >= 5
    assert not worker.running

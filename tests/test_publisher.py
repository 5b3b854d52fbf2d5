"""Publisher: single events, batches, idempotency keys, caps, and typed errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    AgentStreamsError,
    BackpressureError,
    ConnectionLostError,
    IdempotencyConflictError,
    InvalidArgumentError,
    Publisher,
    PublishTimeoutError,
    StreamCap,
    WrongTypeError,
)
from agentstreams._codec import decode_entry
from agentstreams._connection import ConnectionSettings, create_client
from agentstreams.server import LocalServer
from conftest import stream_entries, stream_ids, wait_for, xadd_raw


@pytest.fixture
async def client(redis_url: str, raw: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = create_client(ConnectionSettings(url=redis_url))
    yield client
    await client.aclose()


async def test_publish_writes_one_encoded_entry(client: aioredis.Redis, raw: aioredis.Redis,
                                                stream_name: str) -> None:
    publisher = Publisher(client, stream_name)
    msg_id = await publisher.publish("handoff_ready", {"session_id": "7", "n": 7},
                                     event_id="e-1")
    [(read_id, fields)] = await stream_entries(raw, stream_name)
    assert read_id == msg_id
    event = decode_entry(read_id, fields, stream=stream_name)
    assert event.event_id == "e-1"
    assert event["session_id"] == "7"
    assert event["n"] == 7


async def test_idempotent_publish_writes_once(client: aioredis.Redis, raw: aioredis.Redis,
                                              stream_name: str) -> None:
    publisher = Publisher(client, stream_name)
    first = await publisher.publish("t", {"n": 1}, idempotency_key="order-42")
    second = await publisher.publish("t", {"n": 1}, idempotency_key="order-42")  # a retry
    assert first == second
    assert await stream_ids(raw, stream_name) == [first]
    # The same key for another event is a caller's bug, not a retry: it is refused.
    with pytest.raises(IdempotencyConflictError) as conflict:
        await publisher.publish("t", {"n": 2}, idempotency_key="order-42")
    assert conflict.value.first_id == first
    with pytest.raises(IdempotencyConflictError):
        await publisher.publish("other", {"n": 1}, idempotency_key="order-42")
    assert await stream_ids(raw, stream_name) == [first]
    # The key lives next to the stream (same hash tag) and expires with the window.
    ttl_ms = await raw.pttl(f"{{{stream_name}}}:idem:order-42")
    assert 0 < ttl_ms <= 24 * 3600 * 1000
    third = await publisher.publish("t", {"n": 3}, idempotency_key="order-43")
    assert await stream_ids(raw, stream_name) == [first, third]


async def test_idempotency_window_expires(client: aioredis.Redis, raw: aioredis.Redis,
                                          stream_name: str) -> None:
    publisher = Publisher(client, stream_name, idempotency_window_s=0.05)
    first = await publisher.publish("t", {}, idempotency_key="k")
    key = f"{{{stream_name}}}:idem:k"

    async def expired() -> bool:
        return not await raw.exists(key)

    await wait_for(expired, timeout_s=5, message="the idempotency key to expire")
    assert await publisher.publish("t", {}, idempotency_key="k") != first
    assert len(await stream_ids(raw, stream_name)) == 2


@pytest.mark.parametrize("key", ["", "k" * 257])
async def test_invalid_idempotency_keys(client: aioredis.Redis, key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="idempotency_key must be a non-empty"):
        await Publisher(client, "s").publish("t", {}, idempotency_key=key)


async def test_publish_many_big_batches_keep_order(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    publisher = Publisher(client, stream_name)
    n = 2507
    ids = await publisher.publish_many([{"type": "t", "i": i} for i in range(n)])
    assert len(ids) == n
    assert ids == await stream_ids(raw, stream_name)
    entries = await stream_entries(raw, stream_name)
    assert [decode_entry(i, f, stream=stream_name)["i"] for i, f in entries] == list(range(n))


@pytest.mark.parametrize("position", [1000, 2400])
async def test_publish_many_is_one_transaction_whatever_its_size(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, position: int) -> None:
    """Above 1,000 events too: a bad event late in the batch publishes nothing (this used to
    be one transaction per 1,000, so the first thousands landed)."""
    publisher = Publisher(client, stream_name)
    events: list[dict[str, Any]] = [{"type": "t", "i": i} for i in range(2500)]
    events[position] = {"type": "t", "_reserved": 1}
    with pytest.raises(InvalidArgumentError, match="_reserved"):
        await publisher.publish_many(events)
    assert await raw.exists(stream_name) == 0


@pytest.mark.parametrize(("events", "message"), [
    ([{"type": "t"}, "not a mapping"], "#1 is a str, not a mapping"),
    ([{"i": 1}], "#0 has no 'type'"),
    ([{"type": ""}], "non-empty string"),
    ("t", "list of event mappings"),
])
async def test_publish_many_rejects_bad_batches_before_sending(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, events: Any,
        message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await Publisher(client, stream_name).publish_many(events)
    assert await raw.xlen(stream_name) == 0


@pytest.mark.parametrize("bad", [
    {"type": "t", "f": {1, 2}},                      # not JSON-representable
    {"type": "t", "_reserved": 1},                    # reserved field name
    {"type": "t", "big": "x" * 2_000_000},            # over the size limit
])
@pytest.mark.parametrize("position", [0, 63, 64, 65, 400, 999])
async def test_publish_many_late_bad_event_publishes_nothing(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, bad: dict[str, Any],
        position: int) -> None:
    """Batches are written while they are encoded: a bad event found after the first XADDs
    went out must still leave the stream untouched, and the publisher usable."""
    publisher = Publisher(client, stream_name)
    events: list[dict[str, Any]] = [{"type": "t", "i": i} for i in range(1000)]
    events[position] = bad
    with pytest.raises(AgentStreamsError, match=r"set|_reserved|over the") as raised:
        await publisher.publish_many(events)
    assert f"in event #{position} of the batch" in "".join(raised.value.__notes__)
    assert await raw.xlen(stream_name) == 0
    assert await raw.exists(stream_name) == 0
    ids = await publisher.publish_many([{"type": "t", "i": i} for i in range(100)])
    assert ids == await stream_ids(raw, stream_name)


class _BrokenMapping(dict[str, Any]):
    """A mapping that fails while being read (any exception, not only ours)."""

    def items(self) -> Any:
        raise RuntimeError("cannot read this event")


async def test_publish_many_unexpected_error_mid_batch_discards_the_transaction(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    publisher = Publisher(client, stream_name)
    events: list[dict[str, Any]] = [{"type": "t", "i": i} for i in range(300)]
    events[200] = _BrokenMapping(type="t")
    with pytest.raises(RuntimeError, match="cannot read"):
        await publisher.publish_many(events)
    assert await raw.exists(stream_name) == 0
    for _ in range(3):  # every pooled connection is clean (no MULTI left open)
        ids = await publisher.publish_many([{"type": "t"}, {"type": "u"}])
        assert len(ids) == 2
    assert await raw.xlen(stream_name) == 6


# --------------------------------------------------------------------------- caps


def test_stream_cap_arguments() -> None:
    assert StreamCap().args() == ["MAXLEN", "~", 100_000]
    assert StreamCap("maxlen", 10, approximate=False).args() == ["MAXLEN", "=", 10]
    kind, op, min_id = StreamCap("minid", 60_000).args()
    assert (kind, op) == ("MINID", "~")
    ms = int(str(min_id).split("-")[0])
    assert abs(ms - (time.time() * 1000 - 60_000)) < 5_000


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "count"}, "'maxlen' or 'minid'"),
    ({"value": -1}, "integer >= 0"),
    ({"value": 1.5}, "integer >= 0"),
])
def test_invalid_stream_caps(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        StreamCap(**kwargs)


@pytest.mark.parametrize("mode", ["single", "many", "idempotent"])
async def test_maxlen_cap_applies_to_every_publish_path(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, mode: str) -> None:
    publisher = Publisher(client, stream_name, cap=StreamCap("maxlen", 5, approximate=False))
    for i in range(12):
        if mode == "single":
            await publisher.publish("t", {"i": i})
        elif mode == "many":
            await publisher.publish_many([{"type": "t", "i": i}])
        else:
            await publisher.publish("t", {"i": i}, idempotency_key=f"k{i}")
    entries = await stream_entries(raw, stream_name)
    assert [decode_entry(i, f, stream=stream_name)["i"] for i, f in entries] == list(range(7, 12))


async def test_minid_cap_drops_entries_older_than_the_age(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    await raw.xadd(stream_name, {"type": "ancient"}, id="1-0")
    publisher = Publisher(client, stream_name,
                          cap=StreamCap("minid", 60_000, approximate=False))
    fresh = await publisher.publish("t", {})
    assert await stream_ids(raw, stream_name) == [fresh]


def test_publisher_rejects_impossible_settings() -> None:
    client = aioredis.Redis()
    with pytest.raises(InvalidArgumentError, match="max_event_bytes"):
        Publisher(client, "s", max_event_bytes=0)
    with pytest.raises(InvalidArgumentError, match="idempotency_window_s"):
        Publisher(client, "s", idempotency_window_s=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", ["single", "many", "idempotent"])
async def test_wrong_type_key_raises_wrong_type_error(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, mode: str) -> None:
    await raw.set(stream_name, "not a stream")
    publisher = Publisher(client, stream_name)

    async def publish() -> None:
        if mode == "single":
            await publisher.publish("t", {})
        elif mode == "many":
            await publisher.publish_many([{"type": "t"}])
        else:
            await publisher.publish("t", {}, idempotency_key="k")

    with pytest.raises(WrongTypeError, match="not a stream") as info:
        await publish()
    assert info.value.stream == stream_name


async def test_unreachable_server_raises_connection_lost() -> None:
    server = LocalServer("valkey")
    server.start()
    client = create_client(ConnectionSettings(url=server.url, command_retries=1))
    try:
        publisher = Publisher(client, "s")
        await publisher.publish("t", {})
        server.stop()
        with pytest.raises(ConnectionLostError, match="can be retried"):
            await publisher.publish("t", {})
        with pytest.raises(ConnectionLostError):
            await publisher.publish_many([{"type": "t"}])
    finally:
        await client.aclose()
        server.stop()


async def test_out_of_memory_raises_backpressure() -> None:
    with LocalServer("valkey", extra_config={"maxmemory-policy": "noeviction"}) as server:
        admin = aioredis.Redis.from_url(server.url)
        client = create_client(ConnectionSettings(url=server.url))
        try:
            await admin.config_set("maxmemory", 1)
            publisher = Publisher(client, "s")
            with pytest.raises(BackpressureError, match="slow down"):
                await publisher.publish("t", {})
            with pytest.raises(BackpressureError, match="slow down"):
                await publisher.publish_many([{"type": "t"}])
            with pytest.raises(BackpressureError, match="slow down"):
                await publisher.publish("t", {}, idempotency_key="k")
            await admin.config_set("maxmemory", 0)
            assert await publisher.publish("t", {})
        finally:
            await client.aclose()
            await admin.aclose()


async def test_publish_timeout_then_retry_with_the_same_key_writes_once() -> None:
    """A server that stops answering: the publish times out (it may have landed); retrying
    with the same idempotency key after the server recovers writes exactly one entry."""
    with LocalServer("valkey") as server:
        client = create_client(ConnectionSettings(url=server.url, socket_timeout_s=0.3,
                                                  command_retries=1))
        check = aioredis.Redis.from_url(server.url)
        try:
            publisher = Publisher(client, "s")
            await publisher.publish("t", {"n": 0})  # connected, scripts loaded
            server.pause()
            try:
                with pytest.raises(PublishTimeoutError, match="same idempotency_key"):
                    await publisher.publish("t", {"n": 1}, idempotency_key="once")
            finally:
                server.resume()
            msg_id = await publisher.publish("t", {"n": 1}, idempotency_key="once")
            ids = [i for i, _ in await stream_entries(check, "s")]
            assert ids[1:] == [msg_id]
        finally:
            await client.aclose()
            await check.aclose()


async def test_xadd_by_another_client_is_not_idempotent(
        raw: aioredis.Redis, stream_name: str) -> None:
    """Why idempotency keys exist: a plain retry writes a second entry (reliability fact 9)."""
    await xadd_raw(raw, stream_name, {b"type": b"t"})
    await xadd_raw(raw, stream_name, {b"type": b"t"})
    assert await raw.xlen(stream_name) == 2


async def test_a_retried_helper_publish_is_the_same_event(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    """publish_* helpers stamp a new timestamp on every call: a retry with the same key is
    still recognised as the same event (the timestamp is not part of what must match)."""
    async with AgentCoordinator(redis_url, stream_name) as coordinator:
        first = await coordinator.publish_state_changed("s1", {"status": "approved"},
                                                        idempotency_key="approve:s1")
        again = await coordinator.publish_state_changed("s1", {"status": "approved"},
                                                        idempotency_key="approve:s1")
        assert again == first
        with pytest.raises(IdempotencyConflictError, match="approve:s1"):
            await coordinator.publish_state_changed("s1", {"status": "rejected"},
                                                    idempotency_key="approve:s1")
    assert await stream_ids(raw, stream_name) == [first]

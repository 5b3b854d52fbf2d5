"""Every publish path writes the same entry, refuses the same events, and coalesces as told.

``publish`` (one XADD), ``publish_many`` (MULTI/XADD.../EXEC), coalesced concurrent
``publish`` calls (pipelined XADDs) and idempotent publishes (a script) must produce
byte-identical entries with the same validation. Coalescing is checked by what the server
sees: how many connections a burst of publishes opens. Real servers only; nothing here
measures time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentStreamsError,
    InvalidArgumentError,
    PayloadTooLargeError,
    Publisher,
    SerializationError,
    StreamCap,
)
from conftest import clients_named, stream_entries, with_query

#: Strings that JSON escapes or that other layers like to reinterpret.
TRICKY = ["", "\x00", "a\x00b", "\n\r\t", '"quoted"', "back\\slash", "/slash/", "é", "日本",
          "😀", "\u2028\u2029", "\x7f", "\x1f", "null", "123", "true", "1e5", " lead"]


@pytest.fixture
async def named(redis_url: str, raw: aioredis.Redis) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A plain redis-py client whose connections carry a name unique to the test."""
    name = f"fastpaths-{uuid.uuid4().hex[:10]}"
    client = aioredis.Redis.from_url(with_query(redis_url, f"client_name={name}"))
    yield client, name
    await client.aclose()


def _tricky_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for index, text in enumerate(TRICKY):
        events.append({"type": "tool_result", "session_id": text, "result": {"v": text},
                       "items": [text, index, None, 1.5], "timestamp": 1700000000.25 + index})
    return events


def _without_event_id(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {key: value for key, value in fields.items() if key != b"_eid"}


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key != "type"}


async def test_every_publish_path_writes_the_same_bytes(raw: aioredis.Redis,
                                                        stream_name: str) -> None:
    events = _tricky_events()
    publisher = Publisher(raw, stream_name)
    for event in events:
        await publisher.publish(event["type"], _fields(event))
    await publisher.publish_many(events)
    await asyncio.gather(*(publisher.publish(event["type"], _fields(event))
                           for event in events))
    for index, event in enumerate(events):
        await publisher.publish(event["type"], _fields(event), idempotency_key=f"k{index}")
    entries = await stream_entries(raw, stream_name)
    n = len(events)
    assert len(entries) == 4 * n
    plain = [_without_event_id(fields) for _, fields in entries[:n]]
    batched = [_without_event_id(fields) for _, fields in entries[n:2 * n]]
    coalesced = sorted((_without_event_id(fields) for _, fields in entries[2 * n:3 * n]),
                       key=lambda f: f[b"timestamp"])
    idempotent = [_without_event_id(fields) for _, fields in entries[3 * n:]]
    assert batched == plain
    assert coalesced == plain
    assert idempotent == plain
    assert len({fields[b"_eid"] for _, fields in entries}) == 4 * n
    assert plain[0][b"session_id"] == b""
    assert plain[13][b"session_id"] == b"null"  # a string, not JSON: not listed in _json
    assert b"session_id" not in plain[13][b"_json"].split(b",")


@pytest.mark.parametrize(("fields", "error"), [
    ({"type": "x"}, InvalidArgumentError),
    ({"_v": 1}, InvalidArgumentError),
    ({"a,b": 1}, InvalidArgumentError),
    ({"timestamp": "now"}, InvalidArgumentError),
    ({"x": float("nan")}, SerializationError),
    ({"x": [float("inf")]}, SerializationError),
    ({"x": "\ud800"}, SerializationError),
    ({"x": object()}, SerializationError),
    ({"blob": "日" * 400}, PayloadTooLargeError),  # 1,200 bytes: the limit counts bytes
])
async def test_every_publish_path_refuses_the_same_events(
        raw: aioredis.Redis, stream_name: str, fields: dict[str, Any],
        error: type[Exception]) -> None:
    publisher = Publisher(raw, stream_name, max_event_bytes=1000)
    with pytest.raises(error):
        await publisher.publish("t", fields)
    with pytest.raises(error):
        await publisher.publish("t", fields, idempotency_key="k")
    batch = [{"type": "t", "ok": 1}, {"type": "t", "ok": 2}]
    if "type" not in fields:
        batch.append({"type": "t", **fields})
        with pytest.raises(error):
            await publisher.publish_many(batch)
    results = await asyncio.gather(
        *(publisher.publish("t", fields if n == 5 else {"n": n}) for n in range(10)),
        return_exceptions=True)
    assert isinstance(results[5], error)
    assert all(isinstance(r, str) for i, r in enumerate(results) if i != 5)
    assert await raw.xlen(stream_name) == 9  # only the good coalesced ones


async def test_concurrent_publishes_share_one_connection(
        named: tuple[aioredis.Redis, str], raw: aioredis.Redis, stream_name: str) -> None:
    """200 concurrent publishes: one goes out alone, the others wait and are pipelined on one
    held connection. Without coalescing each would take a connection of its own."""
    client, name = named
    publisher = Publisher(client, stream_name)
    ids = await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(200)))
    assert len(set(ids)) == 200
    assert len(await clients_named(raw, name)) <= 2
    entries = dict(await stream_entries(raw, stream_name))
    assert [entries[msg_id][b"n"] for msg_id in ids] == [str(n).encode() for n in range(200)]


async def test_without_coalescing_each_concurrent_publish_has_its_own_round_trip(
        named: tuple[aioredis.Redis, str], raw: aioredis.Redis, stream_name: str) -> None:
    """The regression proof for the test above: it can tell coalescing from its absence."""
    client, name = named
    publisher = Publisher(client, stream_name, coalesce=False)
    await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(50)))
    assert len(await clients_named(raw, name)) > 2


async def test_callers_publishing_in_loops_each_get_their_own_ids_in_order(
        named: tuple[aioredis.Redis, str], raw: aioredis.Redis, stream_name: str) -> None:
    client, name = named
    publisher = Publisher(client, stream_name)
    sent: dict[str, tuple[int, int]] = {}

    async def caller(task: int) -> None:
        for n in range(25):
            sent[await publisher.publish("t", {"task": task, "n": n})] = (task, n)

    await asyncio.gather(*(caller(task) for task in range(64)))
    assert len(sent) == 64 * 25
    assert len(await clients_named(raw, name)) <= 2
    entries = await stream_entries(raw, stream_name)
    assert len(entries) == 64 * 25
    order: dict[int, list[int]] = {}
    for msg_id, fields in entries:
        task, n = sent[msg_id]
        assert (fields[b"task"], fields[b"n"]) == (str(task).encode(), str(n).encode())
        order.setdefault(task, []).append(n)
    # each caller's events are in the stream in the order it published them
    assert all(ns == list(range(25)) for ns in order.values())


async def test_a_sequential_caller_uses_one_connection(
        named: tuple[aioredis.Redis, str], raw: aioredis.Redis, stream_name: str) -> None:
    client, name = named
    publisher = Publisher(client, stream_name)
    for n in range(20):
        await publisher.publish("t", {"n": n})
    assert len(await clients_named(raw, name)) == 1
    assert await raw.xlen(stream_name) == 20


async def test_coalesced_publishes_keep_the_stream_cap(raw: aioredis.Redis,
                                                       stream_name: str) -> None:
    publisher = Publisher(raw, stream_name, cap=StreamCap("maxlen", 10, approximate=False))
    await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(100)))
    await publisher.publish_many([{"type": "t", "n": n} for n in range(50)])
    assert await raw.xlen(stream_name) == 10


async def test_a_failed_batch_fails_every_caller_with_a_typed_error(raw: aioredis.Redis,
                                                                    stream_name: str) -> None:
    await raw.set(stream_name, "not a stream")
    publisher = Publisher(raw, stream_name)
    results = await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(20)),
                                   return_exceptions=True)
    assert all(isinstance(result, AgentStreamsError) for result in results), results
    with pytest.raises(AgentStreamsError):
        await publisher.publish_many([{"type": "t"}])
    # The publisher is idle again afterwards (nothing stuck waiting).
    await raw.delete(stream_name)
    assert await publisher.publish("t", {}) is not None
    assert len(await asyncio.gather(*(publisher.publish("t", {}) for _ in range(20)))) == 20

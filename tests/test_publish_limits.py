"""One size rule on both sides: an event ``publish`` accepts is never too big for a consumer.

The limit counts every field name and value of the stream entry, the metadata fields
(``timestamp``, ``_v``, ``_eid``, ``_json``, ``_tp``, ``_tstate``) included. It used to count
only the user's fields on publish and everything on consume, so an event published just
under the limit was dead-lettered by the worker as malformed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from agentstreams import Event, PayloadTooLargeError, Publisher, Worker
from conftest import stream_entries, wait_for

LIMIT = 4096
TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def _path(publisher: Publisher, path: str) -> Callable[[int], Awaitable[object]]:
    """Publish one ``sized`` event with a blob of the given length on ``path``; the
    timestamp is fixed, so the entry's size depends on the blob only."""
    async def publish(length: int) -> object:
        fields = {"blob": "x" * length, "timestamp": 1.5}
        if path == "publish":
            return await publisher.publish("sized", fields, traceparent=TRACEPARENT,
                                           tracestate="vendor=value")
        if path == "idempotent":
            return await publisher.publish("sized", fields, idempotency_key=f"k{length}")
        return await publisher.publish_many([{"type": "sized", **fields}])
    return publish


async def _entry_sizes(raw: aioredis.Redis, stream: str) -> list[int]:
    return [sum(len(name) + len(value) for name, value in fields.items())
            for _, fields in await stream_entries(raw, stream)]


@pytest.mark.parametrize("path", ["publish", "publish_many", "idempotent"])
async def test_an_event_of_exactly_the_limit_is_consumed_one_byte_more_is_refused(
        redis_url: str, raw: aioredis.Redis, stream_name: str, path: str) -> None:
    # Measure what an entry weighs on this path, on a stored entry.
    probe_stream = f"{stream_name}-probe"
    await _path(Publisher(raw, probe_stream), path)(100)
    [probe_size] = await _entry_sizes(raw, probe_stream)
    await raw.delete(probe_stream, f"{{{probe_stream}}}:idem:k100")
    assert probe_size > 100 + len("blob") + len("type") + len("sized") + len("timestamp") \
        + len("1.5"), "the metadata fields must count"
    blob = 100 + LIMIT - probe_size

    publish = _path(Publisher(raw, stream_name, max_event_bytes=LIMIT), path)
    with pytest.raises(PayloadTooLargeError) as info:
        await publish(blob + 1)
    assert info.value.size == LIMIT + 1
    await publish(blob)
    assert await _entry_sizes(raw, stream_name) == [LIMIT]

    handled: list[Event] = []
    worker = Worker(redis_url, stream_name, "g", max_event_bytes=LIMIT, block_ms=200,
                    probe_server=False)

    @worker.handler("sized")
    async def on_sized(event: Event) -> None:
        handled.append(event)

    async with worker:
        async def taken() -> bool:
            return bool(handled) or worker.stats.malformed > 0

        await wait_for(taken, timeout_s=10, message="the worker to take the event")
    assert worker.stats.malformed == 0
    assert len(handled[0]["blob"]) == blob

"""The fast publish paths write exactly what the plain path writes.

``publish`` (one XADD packed as RESP), ``publish_many`` (MULTI/XADD.../EXEC in one round
trip) and coalesced concurrent ``publish`` calls must produce byte-identical entries, with the
same validation. Real servers only; nothing here measures time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from agentstreams._codec import decode_entry, encode_event, encode_event_resp
from agentstreams._publisher import Publisher, StreamCap
from agentstreams.errors import AgentStreamsError, InvalidArgumentError, SerializationError
from conftest import stream_entries

#: Strings that JSON escapes or that other layers like to reinterpret.
TRICKY = ["", "\x00", "a\x00b", "\n\r\t", '"quoted"', "back\\slash", "/slash/", "é", "日本",
          "😀", "\u2028\u2029", "\x7f", "\x1f", "null", "123", "true", "1e5", " lead"]

field_names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters=","),
                      min_size=1, max_size=12).filter(
    lambda name: not name.startswith("_") and name != "type")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
values = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30) | json_values


def as_text(entry: dict[bytes, bytes]) -> list[str]:
    """``encode_event``'s entry as a flat ``[name, value, ...]`` text list."""
    return [part.decode() for pair in entry.items() for part in pair]


def encode_event_text(event_type: str, fields: dict[str, Any], **kwargs: Any) -> list[str]:
    """``encode_event_resp``'s bulk strings, parsed back into a flat text list."""
    nargs, body = encode_event_resp(event_type, fields, **kwargs)
    data = body.encode()
    out: list[str] = []
    pos = 0
    while pos < len(data):
        assert data[pos:pos + 1] == b"$"
        end = data.index(b"\r\n", pos)
        length = int(data[pos + 1:end])
        out.append(data[end + 2:end + 2 + length].decode())
        assert data[end + 2 + length:end + 4 + length] == b"\r\n"
        pos = end + 4 + length
    assert len(out) == nargs
    return out


@given(st.dictionaries(field_names, values, max_size=6))
@settings(max_examples=300, deadline=None)
def test_text_encoding_is_the_same_entry(fields: dict[str, Any]) -> None:
    try:
        expected = encode_event("t", fields, event_id="e1", timestamp=1700000000.5,
                                traceparent="00-a-b-01", tracestate="k=v")
    except AgentStreamsError as exc:
        with pytest.raises(type(exc)):
            encode_event_text("t", fields)
        return
    text = encode_event_text("t", fields, event_id="e1", timestamp=1700000000.5,
                             traceparent="00-a-b-01", tracestate="k=v")
    assert text == as_text(expected)


@pytest.mark.parametrize(("fields", "error"), [
    ({"type": "x"}, InvalidArgumentError),
    ({"_v": 1}, InvalidArgumentError),
    ({"a,b": 1}, InvalidArgumentError),
    ({"timestamp": "now"}, InvalidArgumentError),
    ({"x": float("nan")}, SerializationError),
    ({"x": [float("inf")]}, SerializationError),
    ({"x": "\ud800"}, SerializationError),
    ({"x": object()}, SerializationError),
])
def test_text_encoding_validates_like_encode_event(fields: dict[str, Any],
                                                   error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_event("t", fields)
    with pytest.raises(error):
        encode_event_text("t", fields)


def test_text_encoding_enforces_the_size_limit_in_bytes() -> None:
    # 3 bytes per character in UTF-8: the limit counts bytes, not characters.
    fields = {"blob": "日" * 400}
    with pytest.raises(AgentStreamsError):
        encode_event("t", fields, max_event_bytes=1000)
    with pytest.raises(AgentStreamsError):
        encode_event_text("t", fields, max_event_bytes=1000)
    encode_event_text("t", fields, max_event_bytes=2000)


def _tricky_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for index, text in enumerate(TRICKY):
        events.append({"type": "tool_result", "session_id": text, "result": {"v": text},
                       "items": [text, index, None, 1.5], "timestamp": 1700000000.25 + index})
    return events


def _without_event_id(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {key: value for key, value in fields.items() if key != b"_eid"}


async def test_every_publish_path_writes_the_same_bytes(raw: aioredis.Redis,
                                                        stream_name: str) -> None:
    events = _tricky_events()
    publisher = Publisher(raw, stream_name)
    for event in events:
        await publisher.publish(event["type"], {k: v for k, v in event.items() if k != "type"})
    await publisher.publish_many(events)
    await asyncio.gather(*(publisher.publish(event["type"],
                                             {k: v for k, v in event.items() if k != "type"})
                           for event in events))
    entries = await stream_entries(raw, stream_name)
    assert len(entries) == 3 * len(events)
    plain = [_without_event_id(fields) for _, fields in entries[:len(events)]]
    batched = [_without_event_id(fields) for _, fields in entries[len(events):2 * len(events)]]
    coalesced = sorted((_without_event_id(fields) for _, fields in entries[2 * len(events):]),
                       key=lambda f: f[b"timestamp"])
    assert batched == plain
    assert coalesced == plain
    for msg_id, raw_fields in entries:
        decoded = decode_entry(msg_id, raw_fields, stream=stream_name)
        assert decoded.type == "tool_result"
        assert decoded.event_id is not None


async def test_concurrent_publishes_are_coalesced_into_batches(raw: aioredis.Redis,
                                                               stream_name: str) -> None:
    publisher = Publisher(raw, stream_name)
    batches: list[int] = []
    write = publisher._write_waiting

    def counting_write() -> None:
        write()
        batches.append(len(publisher._in_flight[-1]))

    publisher._write_waiting = counting_write  # type: ignore[method-assign]
    ids = await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(200)))
    assert len(set(ids)) == 200
    assert sum(batches) == 199  # the first one went out alone, as a plain XADD
    assert len(batches) < 199
    entries = await stream_entries(raw, stream_name)
    by_id = {msg_id: decode_entry(msg_id, fields, stream=stream_name)["n"]
             for msg_id, fields in entries}
    assert [by_id[msg_id] for msg_id in ids] == list(range(200))
    # Idle again: the next publish takes the plain path.
    await publisher.publish("t", {"n": 200})
    assert sum(batches) == 199


async def test_callers_publishing_in_loops_are_pipelined(raw: aioredis.Redis,
                                                         stream_name: str) -> None:
    """Batches are written while earlier ones are still in flight, and every caller gets the
    id of its own event."""
    publisher = Publisher(raw, stream_name)
    depths: list[int] = []
    write = publisher._write_waiting

    def recording_write() -> None:
        write()
        depths.append(len(publisher._in_flight))

    publisher._write_waiting = recording_write  # type: ignore[method-assign]
    sent: dict[str, tuple[int, int]] = {}

    async def caller(task: int) -> None:
        for n in range(25):
            sent[await publisher.publish("t", {"task": task, "n": n})] = (task, n)

    await asyncio.gather(*(caller(task) for task in range(64)))
    assert len(sent) == 64 * 25
    assert max(depths) > 1  # a batch went out while another one was in flight
    entries = await stream_entries(raw, stream_name)
    assert len(entries) == 64 * 25
    for msg_id, fields in entries:
        event = decode_entry(msg_id, fields, stream=stream_name)
        assert sent[msg_id] == (event["task"], event["n"])
    # each caller's events are in the stream in the order it published them
    order: dict[int, list[int]] = {}
    for msg_id, _fields in entries:
        task, n = sent[msg_id]
        order.setdefault(task, []).append(n)
    assert all(ns == list(range(25)) for ns in order.values())
    assert publisher._pipe is None or publisher._busy  # handed back once idle
    await publisher.publish("t", {})
    assert not publisher._in_flight


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


async def test_a_sequential_caller_never_waits_for_a_batch(raw: aioredis.Redis,
                                                           stream_name: str) -> None:
    publisher = Publisher(raw, stream_name)
    for n in range(20):
        await publisher.publish("t", {"n": n})
        assert not publisher._waiting
        assert publisher._flusher is None

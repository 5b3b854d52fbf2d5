"""The wire format: lossless, versioned, readable for reference entries, safe on garbage."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstreams._codec import decode_entry, encode_event, new_event_id
from agentstreams._constants import FORMAT_VERSION
from agentstreams._events import Event, EventType
from agentstreams.errors import (
    InvalidArgumentError,
    MalformedEventError,
    PayloadTooLargeError,
    SerializationError,
)
from agentstreams.server import LocalServer
from conftest import assert_same, reference_fields

# --------------------------------------------------------------------------- helpers

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
#: Strings the reference turned into other types.
tricky_strings = st.sampled_from(
    ["123", "-7", "1.5", "1e3", "true", "false", "null", "True", "None", "NaN", "[]", "{}",
     '"quoted"', "", " ", "0", "[1,2]", '{"a":1}', "\x00", "é", "🙂"]
)
field_names = st.text(min_size=1, max_size=20).filter(
    lambda s: not s.startswith("_") and "," not in s and s not in ("type", "timestamp")
)
payloads = st.dictionaries(field_names, json_values | tricky_strings, max_size=8)
event_types = st.text(min_size=1, max_size=30) | st.sampled_from([t.value for t in EventType])


def roundtrip(event_type: str, fields: dict[str, Any]) -> Event:
    entry = encode_event(event_type, fields)
    return decode_entry("1-1", entry, stream="s")


# --------------------------------------------------------------------------- lossless round trip


@given(event_type=event_types, fields=payloads)
@settings(max_examples=300, deadline=None)
def test_roundtrip_keeps_values_and_types(event_type: str, fields: dict[str, Any]) -> None:
    event = roundtrip(event_type, fields)
    expected = {"type": event_type, **fields}
    received = {k: v for k, v in event.data.items() if k != "timestamp"}
    assert_same(received, expected)
    assert isinstance(event.data["timestamp"], float)


@pytest.fixture(scope="module")
def sync_valkey(valkey_server: LocalServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey_server.url)
    yield client
    client.delete("codec-property-stream")
    client.close()


@given(event_type=event_types, fields=payloads)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_roundtrip_through_a_real_server(sync_valkey: redis.Redis, event_type: str,
                                         fields: dict[str, Any]) -> None:
    entry = encode_event(event_type, fields, timestamp=1234.5)
    msg_id: bytes = sync_valkey.execute_command(  # type: ignore[no-untyped-call]
        "XADD", "codec-property-stream", "MAXLEN", "100", "*",
        *(part for pair in entry.items() for part in pair))
    stored: list[tuple[bytes, dict[bytes, bytes]]] = sync_valkey.xrange(  # type: ignore[assignment]
        "codec-property-stream", min=msg_id, max=msg_id)
    [(read_id, read_fields)] = stored
    event = decode_entry(read_id.decode(), read_fields, stream="codec-property-stream")
    assert_same(dict(event), {"type": event_type, **fields, "timestamp": 1234.5})
    assert event.msg_id == msg_id.decode()


@pytest.mark.parametrize("value", [
    "123", "true", "null", "1.5", "[1]", "{}", "True", "", '"x"',
    123, 0, -1, 1.5, 0.1, -0.0, 1e300, 5e-324, True, False, None,
    [], {}, [1, "1", True, None, 1.0], {"a": {"b": ["null", None]}},
    INT64_MIN, UINT64_MAX,
])
def test_roundtrip_examples(value: Any) -> None:
    event = roundtrip("tool_result", {"result": value, "session_id": "123"})
    assert_same(event["result"], value)
    assert_same(event["session_id"], "123")


def test_string_subclass_is_delivered_as_its_string_value() -> None:
    event = roundtrip("t", {"kind": EventType.ERROR})
    assert_same(event["kind"], "error")


# --------------------------------------------------------------------------- metadata


def test_entry_carries_version_event_id_and_producer_timestamp() -> None:
    entry = encode_event(EventType.HANDOFF_READY, {"session_id": "s"}, timestamp=1700000000.25)
    assert entry[b"type"] == b"handoff_ready"
    assert entry[b"session_id"] == b"s"  # plain strings stay readable with redis-cli
    assert entry[b"_v"] == str(FORMAT_VERSION).encode()
    assert len(entry[b"_eid"]) == 32
    event = decode_entry("5-0", entry, stream="s", delivery_count=3)
    assert event.version == FORMAT_VERSION
    assert event.event_id == entry[b"_eid"].decode()
    assert event.timestamp == 1700000000.25
    assert event.type == "handoff_ready"
    assert event.session_id == "s"
    assert event.delivery_count == 3
    assert event.to_dict() == {"type": "handoff_ready", "session_id": "s",
                               "timestamp": 1700000000.25, "_msg_id": "5-0",
                               "_event_id": event.event_id}
    assert event.to_dict(with_delivery_count=True)["_delivery_count"] == 3


def test_event_ids_are_unique() -> None:
    ids = {encode_event("t", {})[b"_eid"] for _ in range(1000)}
    assert len(ids) == 1000
    assert new_event_id() != new_event_id()


def test_given_event_id_and_timestamp_field_are_kept() -> None:
    entry = encode_event("t", {"timestamp": 12}, event_id="abc")
    event = decode_entry("1-0", entry, stream="s")
    assert event.event_id == "abc"
    assert_same(event["timestamp"], 12)
    assert event.timestamp == 12.0


def test_trace_headers_are_carried_but_not_in_the_payload() -> None:
    entry = encode_event("t", {"a": "b"}, traceparent="00-abc-def-01", tracestate="k=v")
    event = decode_entry("1-0", entry, stream="s")
    assert event.traceparent == "00-abc-def-01"
    assert event.tracestate == "k=v"
    assert set(event) == {"type", "a", "timestamp"}


def test_event_is_a_read_only_mapping() -> None:
    event = roundtrip("t", {"a": 1})
    assert len(event) == 3
    assert dict(event)["a"] == 1
    assert "Event(type='t'" in repr(event)
    assert event.timestamp is not None
    event_without_ts = Event(data={"type": "t", "timestamp": "soon"}, msg_id="1-0", stream="s")
    assert event_without_ts.timestamp is None


# --------------------------------------------------------------------------- reference entries


def test_reference_entries_are_read_the_way_the_reference_reads_them() -> None:
    written = reference_fields({
        "type": "agent_completed", "agent_name": "a", "session_id": "123",
        "output_summary": "null", "duration_ms": 1.5, "tokens_used": 7,
        "context": {"k": [1, "2"]}, "flag": True, "missing": None, "timestamp": 1700000000.5,
    })
    assert written[b"flag"] == b"True"  # what the reference writes for a bool
    event = decode_entry("9-0", written, stream="s")
    assert event.version == 0
    assert event.event_id is None
    # The reference json.loads every value: these are its (lossy) answers, kept on purpose.
    assert_same(dict(event), {
        "type": "agent_completed", "agent_name": "a", "session_id": 123,
        "output_summary": None, "duration_ms": 1.5, "tokens_used": 7,
        "context": {"k": [1, "2"]}, "flag": "True", "timestamp": 1700000000.5,
    })
    assert event.to_dict() == {**dict(event), "_msg_id": "9-0"}


# --------------------------------------------------------------------------- undecodable entries


@pytest.mark.parametrize(("fields", "reason_part"), [
    ({}, "no fields"),
    ({b"session_id": b"x"}, "no 'type'"),
    ({b"type": b"123"}, "'type' must be a non-empty string"),
    ({b"type": b""}, "'type' must be a non-empty string"),
    ({b"type": b"\xff\xfe"}, "not valid UTF-8"),
    ({b"type": b"t", b"\xc3": b"x"}, "not valid UTF-8"),
    ({b"type": b"t", b"_v": b"1", b"data": b"\x80abc"}, "not valid UTF-8"),
    ({b"type": b"t", b"_v": b"1", b"_json": b"data", b"data": b"{garbage"}, "does not parse"),
    ({b"type": b"t", b"_v": b"99"}, "format version"),
    ({b"_v": b"1", b"x": b"y"}, "no 'type'"),
    ({b"type": b"t", b"big": b"x" * 2000}, "over the 1000-byte limit"),
])
def test_undecodable_entries_raise_malformed_with_the_raw_fields(
        fields: dict[bytes, bytes], reason_part: str) -> None:
    with pytest.raises(MalformedEventError) as info:
        decode_entry("7-1", fields, stream="s", max_event_bytes=1000)
    assert reason_part in info.value.reason
    assert info.value.fields == fields
    assert info.value.msg_id == "7-1"
    assert info.value.stream == "s"
    assert "7-1" in str(info.value)


@pytest.mark.parametrize(("fields", "reason_part"), [
    ({b"type": b"t", b"bomb": b"[" * 100_000}, "nested too deeply"),
    ({b"type": b"t", b"bomb": b'{"a":' * 20_000 + b"1" + b"}" * 20_000}, "nested too deeply"),
    ({b"type": b"t", b"_v": b"1", b"_json": b"bomb", b"bomb": b"[" * 100_000},
     "does not parse"),
])
def test_json_bombs_raise_malformed(fields: dict[bytes, bytes], reason_part: str) -> None:
    """A deeply nested value once escaped as RecursionError and killed the read loop."""
    with pytest.raises(MalformedEventError, match=reason_part):
        decode_entry("1-0", fields, stream="s")


@given(st.dictionaries(st.binary(max_size=20), st.binary(max_size=50), max_size=6))
@settings(max_examples=300, deadline=None)
def test_fuzzed_entries_decode_or_raise_malformed(fields: dict[bytes, bytes]) -> None:
    try:
        event = decode_entry("1-0", fields, stream="s")
    except MalformedEventError:
        return
    assert isinstance(event.type, str)
    assert event.type


# --------------------------------------------------------------------------- invalid input


class Unserialisable:
    pass


@pytest.mark.parametrize(("event_type", "fields", "error", "message_part"), [
    ("", {}, InvalidArgumentError, "non-empty string"),
    (None, {}, InvalidArgumentError, "non-empty string"),
    ("x" * 600, {}, InvalidArgumentError, "limit is 512"),
    ("t", {"type": "x"}, InvalidArgumentError, "pass the event type separately"),
    ("t", {"_secret": 1}, InvalidArgumentError, "reserved"),
    ("t", {"": 1}, InvalidArgumentError, "non-empty strings"),
    ("t", {"a,b": 1}, InvalidArgumentError, "comma"),
    ("t", {"timestamp": "now"}, InvalidArgumentError, "must be a number"),
    ("t", {"timestamp": True}, InvalidArgumentError, "must be a number"),
    ("t", {"obj": Unserialisable()}, SerializationError, "cannot be encoded as JSON"),
    ("t", {"raw": b"bytes"}, SerializationError, "cannot be encoded as JSON"),
    ("t", {"s": {1, 2}}, SerializationError, "cannot be encoded as JSON"),
    ("t", {"keys": {1: "int key"}}, SerializationError, "cannot be encoded as JSON"),
    ("t", {"x": math.nan}, SerializationError, "send it as a string"),
    ("t", {"x": math.inf}, SerializationError, "send it as a string"),
    ("t", {"x": [1.0, math.nan]}, SerializationError, "NaN or Infinity"),
    ("t", {"x": {"y": -math.inf}}, SerializationError, "NaN or Infinity"),
    ("t", {"x": "\ud800"}, SerializationError, "surrogate"),
    ("t", {"x": 2**70}, SerializationError, "cannot be encoded as JSON"),
])
def test_invalid_events_raise_typed_errors_that_say_what_to_fix(
        event_type: Any, fields: dict[Any, Any], error: type[Exception],
        message_part: str) -> None:
    with pytest.raises(error, match=message_part):
        encode_event(event_type, fields)


def test_nested_null_is_not_mistaken_for_nan() -> None:
    event = roundtrip("t", {"x": [None, {"null": None}], "y": "null"})
    assert_same(event["x"], [None, {"null": None}])
    assert_same(event["y"], "null")


def test_oversize_payload_raises_with_size_and_limit() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        encode_event("t", {"blob": "x" * 5000}, max_event_bytes=4096, stream="s")
    assert info.value.limit == 4096
    assert info.value.size > 4096
    assert info.value.stream == "s"
    assert "max_event_bytes" in str(info.value)
    # A value of the same size passes under a bigger, configured limit.
    encode_event("t", {"blob": "x" * 5000}, max_event_bytes=10_000)


def test_invalid_argument_errors_are_value_errors() -> None:
    """Code written against the reference catches ValueError."""
    with pytest.raises(ValueError, match="non-empty"):
        encode_event("", {})


@given(event_type=event_types, fields=payloads)
@settings(max_examples=200, deadline=None)
def test_the_size_checked_is_every_name_and_value_of_the_entry(event_type: str,
                                                               fields: dict[str, Any]) -> None:
    """One size rule: what the encoder counts is what ``decode_entry`` counts (metadata
    included), so an event published at the limit is never refused by a consumer."""
    kwargs: dict[str, Any] = {"event_id": "e" * 32, "timestamp": 1700000000.25,
                              "traceparent": "00-ab-cd-01", "tracestate": "k=v"}
    entry = encode_event(event_type, fields, **kwargs)
    size = sum(len(name) + len(value) for name, value in entry.items())
    assert encode_event(event_type, fields, max_event_bytes=size, **kwargs) == entry
    decode_entry("1-0", entry, stream="s", max_event_bytes=size)
    with pytest.raises(PayloadTooLargeError) as info:
        encode_event(event_type, fields, max_event_bytes=size - 1, **kwargs)
    assert info.value.size == size
    with pytest.raises(MalformedEventError, match="over the"):
        decode_entry("1-0", entry, stream="s", max_event_bytes=size - 1)

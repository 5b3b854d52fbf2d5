"""Property-based fuzz of the entry decoder, and round trips through the public publish path.

Three properties:

* **Total**: over arbitrary field maps of bytes (non-UTF-8, empty, metadata-looking names,
  future ``_v`` values, ``_json`` lists naming missing or extra fields, JSON nested up to and
  beyond every limit, values up to and beyond ``max_event_bytes``, numeric-looking strings),
  ``decode_entry`` returns an ``Event`` whose ``type`` is a non-empty str and whose ``data`` is
  JSON-representable, or raises ``MalformedEventError`` carrying the input fields and a reason.
  Nothing else, and never slowly (a hypothesis deadline).
* **Faithful**: the outcome and the decoded data agree with an independent model of the wire
  format written from the README ("The wire format", "Entries other clients wrote").
* **Lossless**: what ``Publisher`` writes (single, coalesced concurrent, and batched
  publishes), read back with XRANGE on each real server, decodes to exactly what was
  published, types included.

Examples are derandomized (no example database) so CI is deterministic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import string
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

from agentstreams import Event, MalformedEventError, PayloadTooLargeError, Publisher
from agentstreams._codec import decode_entry, encode_event
from agentstreams._constants import DEFAULT_MAX_EVENT_BYTES
from conftest import assert_same, stream_entries

Fields = dict[bytes, bytes]

#: The decoder must answer this fast on anything (1 MiB values and 100,000-deep JSON included;
#: the model below shares the budget). A hang or a quadratic blow-up fails the example; the
#: bound is loose because a loaded 2-core CI machine runs the server and the suite together.
DEADLINE = timedelta(seconds=10)
FUZZ = settings(max_examples=600, deadline=DEADLINE, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
#: orjson's documented nesting limit for parsing (version-1 JSON fields).
ORJSON_MAX_DEPTH = 1024
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

# --------------------------------------------------------------------------- strategies

METADATA_LIKE = [
    b"type", b"_v", b"_eid", b"_json", b"_tp", b"_tstate", b"timestamp", b"session_id",
    b"_", b"__v", b"_V", b"v", b"Type", b"TYPE", b"type ", b" type", b"type\x00",
    b"\xef\xbb\xbftype", b"\xfftype", b"_json,", b"_json ", b"json", b"_type", b"_timestamp",
    b"original_id", b"reason", b"_orig_reason", b"", b",", b"a,b", b"\xff", b"\xc3\xa9",
]
TRICKY_VALUES = [
    b"", b" ", b"0", b"1", b"-1", b"01", b"1.0", b"-0", b"-0.0", b"1e3", b"1e400", b"-1e400",
    b"1e-400", b"18446744073709551615", b"18446744073709551616", b"-9223372036854775809",
    b"9" * 5000, b"true", b"false", b"null", b"True", b"None", b"NaN", b"Infinity",
    b"-Infinity", b"nan", b"inf", b'"x"', b'""', b'"123"', b"[]", b"{}", b"[1,]", b'{"a":',
    b'{"a":1,"a":2}', b"[1, 2, 3]", b" 1 ", b"\t[]\n", b"\x00", b"\xff", b"\xc3\x28",
    b"\xed\xa0\x80", b'"\\ud800"', b'"\\udbff\\udfff"', b'"\\u0000"', b'"\x01"',
    b"\xef\xbb\xbf1", b"[]garbage", b"\xf0\x9f\x99\x82", b"handoff_ready", b"1" * 4301,
]
FUTURE_VERSIONS = [b"2", b"0", b"01", b"1.0", b" 1", b"1 ", b"", b"\xff", b"1\x00", b"v1",
                   b"99999999999999999999", b"-1", b"\xef\xbc\x91"]


def deep_json(depth: int, kind: str) -> bytes:
    """Valid JSON nested ``depth`` levels deep (arrays, objects, or both alternating)."""
    if kind == "array":
        return b"[" * depth + b"1" + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    half = depth // 2
    return b'[{"a":' * half + (b"[1]" if depth % 2 else b"1") + b"}]" * half


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
deep_values = st.builds(
    deep_json,
    st.sampled_from([2, 50, 300, 900, 1000, 1023, 1024, 1025, 3000, 100_000]),
    st.sampled_from(["array", "object", "mixed"]),
)
keys = st.one_of(st.sampled_from(METADATA_LIKE), st.binary(max_size=10),
                 st.text(max_size=10).map(str.encode),
                 st.text(string.ascii_lowercase + "_,", max_size=6).map(str.encode))
values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(TRICKY_VALUES),
    st.text(max_size=20).map(str.encode),
    # Python's json writes NaN/Infinity and any int: exactly what a careless client sends.
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers().map(lambda i: str(i).encode()),
    st.floats().map(lambda f: repr(f).encode()),
    deep_values,
)
type_values = st.sampled_from([b"x", b"handoff_ready", b'"x"', b'""', b"", b"1", b"null",
                               b"true", b"[]", b'["x"]', b"\xff", b" ", b"\xc3\xa9"]) | values
#: Mostly the default; small limits put the size boundary within reach of small entries.
limits = st.sampled_from([DEFAULT_MAX_EVENT_BYTES] * 12 + [1, 2, 5, 64, 200, 1000, 4096])


@st.composite
def mutated_entries(draw: st.DrawFn) -> Fields:
    """A valid entry as this library writes it, then damaged a little: the near-valid region
    where decoders go wrong. Marked with a ``_mutated`` field (reserved: ignored by version 1;
    kept as data by the legacy path)."""
    event_type = draw(st.text(min_size=1, max_size=8))
    names = st.text(string.ascii_lowercase, min_size=1, max_size=5).filter(
        lambda n: n not in ("type", "timestamp"))
    scalars = (st.none() | st.booleans() | st.integers(INT64_MIN, UINT64_MAX)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
    payload = draw(st.dictionaries(names, scalars | st.lists(scalars, max_size=3), max_size=4))
    # Explicit id and timestamp: the generated ones are random, and examples must replay.
    fields = dict(encode_event(event_type, payload, event_id=draw(st.uuids()).hex,
                               timestamp=draw(st.floats(0, 2e9))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(fields)))
        how = draw(st.sampled_from(["drop", "replace", "truncate", "append", "flip", "rename"]))
        value = fields.pop(name)
        if how == "replace":
            fields[name] = draw(values)
        elif how == "truncate":
            fields[name] = value[:draw(st.integers(0, max(0, len(value) - 1)))]
        elif how == "append":
            fields[name] = value + draw(st.binary(min_size=1, max_size=3))
        elif how == "flip" and value:
            at = draw(st.integers(0, len(value) - 1))
            fields[name] = value[:at] + bytes([value[at] ^ draw(st.integers(1, 255))]) \
                + value[at + 1:]
        elif how == "rename":
            fields[draw(keys)] = value
        if not fields:
            break
    fields[b"_mutated"] = b"1"
    return fields


def entry_size(fields: Fields) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def _short(raw: bytes) -> str:
    if len(raw) <= 64:
        return repr(raw)
    return f"{raw[:24]!r} ... {raw[-8:]!r} ({len(raw)} bytes)"


class Entry:
    """A field map and the decoder's byte limit, shown with long values cut (a failing
    example with a 1 MiB value would otherwise print 1 MiB)."""

    __slots__ = ("fields", "limit")

    def __init__(self, fields: Fields, limit: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.fields = fields
        self.limit = limit

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' printer
        printer.text(repr(self))

    def __repr__(self) -> str:
        pairs = ", ".join(f"{_short(k)}: {_short(v)}" for k, v in self.fields.items())
        return f"Entry({{{pairs}}}, limit={self.limit}, size={entry_size(self.fields)})"


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    """A field map as another client may have written it, and the decoder's byte limit."""
    limit = draw(limits)
    branch = draw(st.integers(0, 9))
    if branch < 3:
        return Entry(draw(mutated_entries()), limit)
    if branch == 3:  # a JSON bomb in an otherwise valid entry, either format
        bomb = draw(deep_values)
        if draw(st.booleans()):
            return Entry({b"type": b"x", b"bomb": bomb}, limit)
        return Entry({b"type": b"x", b"bomb": bomb, b"_v": b"1", b"_json": b"bomb"}, limit)
    fields: Fields = draw(st.dictionaries(keys, values, max_size=8))
    version = draw(st.sampled_from(["legacy", "v1", "v1", "v1", "future", "as drawn"]))
    if version == "v1":
        fields[b"_v"] = b"1"
    elif version == "future":
        fields[b"_v"] = draw(st.sampled_from(FUTURE_VERSIONS) | st.binary(max_size=4))
    elif version == "legacy":
        fields.pop(b"_v", None)
    if draw(st.integers(0, 3)):
        fields[b"type"] = draw(type_values)
    if draw(st.booleans()):
        # _json naming present fields, absent ones, metadata, empties and duplicates
        candidates = [*sorted(fields), b"missing", b"", b"_v", b"type", b"type", b"_json"]
        names = draw(st.lists(st.sampled_from(candidates) | keys, max_size=6))
        fields[b"_json"] = b",".join(names)
    for name in (b"_eid", b"_tp", b"_tstate"):
        if draw(st.integers(0, 5)) == 0:
            fields[name] = draw(st.binary(max_size=40))
    if draw(st.integers(0, 4)) == 0:
        # Pad to exactly one byte under, at, or over the limit.
        pad_name = draw(st.sampled_from([b"pad", b"_pad", b"type"]))
        fields.pop(pad_name, None)
        target = limit + draw(st.sampled_from([-1, 0, 1]))
        need = target - entry_size(fields) - len(pad_name)
        if need >= 0:
            fields[pad_name] = draw(st.sampled_from([b"x", b"\xff", b"1", b" "])) * need
    return Entry(fields, limit)


# --------------------------------------------------------------------------- checks


def check_json_representable(value: Any, *, strict: bool) -> None:
    """Assert ``value`` is made of dict (str keys), list, str, int, float, bool and None only.

    Iterative: decoded values may be nested 1,024 deep, beyond what recursion (json.dumps,
    repr, ==) survives. ``strict``: floats finite and strings encodable as UTF-8, i.e. what
    the encoder accepts back; the legacy path mirrors the reference's ``json.loads``, which
    yields NaN, infinities and lone surrogates.
    """
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        item, path = stack.pop()
        kind = type(item)
        if item is None or kind is bool or kind is int:
            continue
        if kind is float:
            assert not strict or math.isfinite(item), f"{path}: {item!r} is not finite"
        elif kind is str:
            if strict:
                item.encode()
        elif kind is list:
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif kind is dict:
            for key, child in item.items():
                assert type(key) is str, f"{path}: key {key!r} is not a str"
                stack.append((child, f"{path}.{key}"))
        else:
            raise AssertionError(f"{path}: {kind.__name__} is not a JSON type")


def check_same(received: Any, expected: Any) -> None:
    """Equal values of equal types all the way down, NaN equal to NaN; iterative."""
    stack: list[tuple[Any, Any, str]] = [(received, expected, "$")]
    while stack:
        got, want, path = stack.pop()
        assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
        if isinstance(want, dict):
            assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
            stack.extend((got[k], want[k], f"{path}.{k}") for k in want)
        elif isinstance(want, list):
            assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
            stack.extend((a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(got, want,
                                                                                 strict=True)))
        elif isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} is not NaN"
        else:
            assert got == want, f"{path}: {got!r} != {want!r}"


def depth_of(value: Any) -> int:
    """Nesting depth of a decoded value (iteratively)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
        elif isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
    return deepest


# --------------------------------------------------------------------------- the model


class Bad(Exception):
    """The model says: malformed."""


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def text_depth(raw: bytes) -> int:
    """Deepest bracket nesting of JSON text, strings skipped."""
    if raw.count(b"[") + raw.count(b"{") <= ORJSON_MAX_DEPTH:
        return raw.count(b"[") + raw.count(b"{")  # an upper bound is enough below the limit
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


@contextmanager
def recursion_limit(limit: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("out of range")
    return value


def _int64_or_float(text: str) -> int | float:
    # orjson parses integers within [-2**63, 2**64 - 1] exactly and larger ones as doubles
    # (documented; the encoder refuses such ints, so only foreign entries carry them).
    if len(text.lstrip("-")) <= 20:
        value = int(text)
        if INT64_MIN <= value <= UINT64_MAX:
            return value
    return _finite(text)


def strict_json(raw: bytes) -> Any:
    """RFC 8259 JSON as orjson reads it (the version-1 decoder's rules)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise Bad("not UTF-8") from exc
    if text_depth(raw) > ORJSON_MAX_DEPTH:
        raise Bad("too deep")
    try:
        with recursion_limit(ORJSON_MAX_DEPTH * 3):
            value = json.loads(text, parse_constant=_no_constants, parse_float=_finite,
                               parse_int=_int64_or_float)
    except ValueError as exc:
        raise Bad("not JSON") from exc
    stack = [value]
    while stack:  # a lone surrogate cannot be decoded to valid Unicode
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                raise Bad("lone surrogate") from exc
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return value


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise Bad("not UTF-8") from exc


def model(fields: Fields, limit: int) -> tuple[dict[str, Any], set[str]]:
    """What the README says an entry decodes to: (data, names of fields whose decoding may
    legitimately depend on the caller's stack depth); raises Bad for a malformed entry."""
    if not fields:
        raise Bad("empty")
    if entry_size(fields) > limit:
        raise Bad("too large")
    data: dict[str, Any] = {}
    stack_dependent: set[str] = set()
    version = fields.get(b"_v")
    if version is None:
        # Legacy: "every value that parses as JSON is JSON" (Python's json, as the reference).
        for raw_key, raw_value in fields.items():
            key, text = _text(raw_key), _text(raw_value)
            depth = text_depth(raw_value)
            if depth > ORJSON_MAX_DEPTH:
                raise Bad("nested too deeply for the reference's json.loads")
            if depth > 100:
                stack_dependent.add(key)
            try:
                with recursion_limit(ORJSON_MAX_DEPTH * 3):
                    data[key] = json.loads(text)
            except ValueError:
                data[key] = text
    elif version != b"1":
        raise Bad("future version")
    else:
        json_raw = fields.get(b"_json")
        json_names = set(json_raw.split(b",")) if json_raw else set()
        for raw_key, raw_value in fields.items():
            if raw_key.startswith(b"_"):
                continue  # reserved metadata
            key = _text(raw_key)
            data[key] = strict_json(raw_value) if raw_key in json_names else _text(raw_value)
    event_type = data.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise Bad("no usable type")
    return data, stack_dependent


def model_or_bad(fields: Fields, limit: int) -> tuple[dict[str, Any], set[str]] | Bad:
    try:
        return model(fields, limit)
    except Bad as why:
        return why


# --------------------------------------------------------------------------- properties

#: Fragments of the decoder's reasons, to label examples (``--hypothesis-show-statistics``).
REASONS = ("no fields", "over the", "not valid UTF-8", "format version", "does not parse",
           "nested too deeply", "no 'type'", "must be a non-empty string")


def attempt(fields: Fields, limit: int) -> Event | MalformedEventError:
    """decode_entry's answer: an Event, or the MalformedEventError it raised (anything else
    it raises propagates and fails the test)."""
    try:
        return decode_entry("1-1", fields, stream="fuzz", delivery_count=3,
                            max_event_bytes=limit)
    except MalformedEventError as exc:
        return exc


def decode(fields: Fields, limit: int) -> Event | MalformedEventError:
    """decode_entry, with every invariant of its contract checked."""
    before = dict(fields)
    event = attempt(fields, limit)
    assert fields == before, "the decoder modified its input"
    if isinstance(event, MalformedEventError):
        assert event.fields == before
        assert isinstance(event.fields, dict)
        assert all(type(k) is bytes and type(v) is bytes for k, v in event.fields.items())
        assert isinstance(event.reason, str)
        assert event.reason.strip(), "a malformed entry needs a reason"
        assert event.msg_id == "1-1"
        assert event.stream == "fuzz"
        note_event("malformed: " + next((what for what in REASONS if what in event.reason),
                                        "other"))
        return event
    assert isinstance(event, Event)
    assert isinstance(event.type, str)
    assert event.type
    assert type(event.data) is dict
    assert event.version in (0, 1)
    check_json_representable(event.data, strict=event.version == 1)
    assert event.msg_id == "1-1"
    assert event.stream == "fuzz"
    assert event.delivery_count == 3
    assert entry_size(fields) <= limit
    for name in (event.event_id, event.traceparent, event.tracestate):
        assert name is None or isinstance(name, str)
    note_event(f"decoded (version {event.version})")
    return event


#: Corners every run covers, whatever hypothesis draws.
EXAMPLES = [
    Entry({}),
    Entry({b"": b""}),
    Entry({b"type": b"x"}, 5),  # exactly at a tiny limit
    Entry({b"type": b"x"}, 4),  # one byte over
    Entry({b"type": b"x", b"big": b"x" * (DEFAULT_MAX_EVENT_BYTES - 8)}),  # at 1 MiB
    Entry({b"type": b"x", b"big": b"x" * (DEFAULT_MAX_EVENT_BYTES - 7)}),  # 1 MiB + 1
    Entry({b"type": b"x", b"deep": deep_json(100_000, "array")}),  # legacy JSON bomb
    Entry({b"type": b"x", b"deep": deep_json(1000, "object")}),  # at Python's limit
    Entry({b"type": b"x", b"_v": b"1", b"_json": b"deep",
           b"deep": deep_json(ORJSON_MAX_DEPTH + 1, "object")}),
    Entry({b"type": b"x", b"_v": b"1", b"_json": b"deep",
           b"deep": deep_json(ORJSON_MAX_DEPTH, "mixed")}),
    Entry({b"type": b"x", b"v": b"NaN", b"w": b"1e400", b"s": b'"\\ud800"'}),
    Entry({b"type": b"x", b"_v": b"2"}),
    Entry({b"type": b"x", b"_v": b"1", b"_json": b",", b"": b"1"}),
    Entry({b"type": b"x", b"_v": b"1", b"_json": b"", b"": b"1"}),
    Entry({b"type": b"123", b"n": b"123", b"t": b"true"}),
    Entry({b"type": b"123", b"n": b"123", b"_v": b"1"}),
    Entry({b"type": b"x", b"_v": b"1", b"_json": b"n", b"n": b"18446744073709551616"}),
    Entry({b"type": b"x", b"_v": b"1", b"_json": b"type,n", b"n": b"NaN"}),
    Entry({b"type": b"\xff", b"_v": b"1", b"_eid": b"\xff", b"_tp": b"\xfe"}),
]


def with_examples(test: Any) -> Any:
    for entry in reversed(EXAMPLES):
        test = example(entry)(test)
    return test


@given(entries())
@FUZZ
@with_examples
def test_decoder_returns_an_event_or_raises_malformed(entry: Entry) -> None:
    decode(entry.fields, entry.limit)


@given(entries())
@FUZZ
@with_examples
def test_decoder_agrees_with_the_documented_format(entry: Entry) -> None:
    fields, limit = entry.fields, entry.limit
    result = decode(fields, limit)
    expected = model_or_bad(fields, limit)
    if isinstance(expected, Bad):
        assert isinstance(result, MalformedEventError), (
            f"the format says malformed ({expected}), the decoder returned {result!r}")
        return
    data, stack_dependent = expected
    if isinstance(result, MalformedEventError):
        # Python's json (the legacy path) recurses: how deep it gets depends on the stack the
        # decoder is called from, so a value nested a few hundred deep may be refused.
        assert stack_dependent, f"the format says {data!r:.200}, refused: {result.reason}"
        assert "nested too deeply" in result.reason, result.reason
        return
    check_same(result.data, data)
    assert result.version == (1 if b"_v" in fields else 0)
    if result.version == 1:
        assert result.event_id == (fields[b"_eid"].decode(errors="replace")
                                   if b"_eid" in fields else None)
        assert all(depth_of(v) <= ORJSON_MAX_DEPTH for v in result.data.values())


def test_the_fuzzer_reaches_every_outcome() -> None:
    """The strategy is only as good as what it reaches: every branch of the format occurs."""
    seen: set[str] = set()

    @given(entries())
    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def collect(entry: Entry) -> None:
        fields, limit = entry.fields, entry.limit
        try:
            event = decode_entry("1-1", fields, stream="fuzz", max_event_bytes=limit)
        except MalformedEventError as exc:
            seen.update(what for what in REASONS if what in exc.reason)
            if b"_mutated" in fields:
                seen.add("mutated and refused")
            return
        seen.add(f"version {event.version}")
        if b"_mutated" in fields:
            seen.add("mutated and decoded")
        if entry_size(fields) in (limit, limit - 1):
            seen.add("at the limit")

    collect()
    wanted = {"over the", "not valid UTF-8", "format version", "does not parse", "no 'type'",
              "must be a non-empty string", "nested too deeply", "version 0", "version 1",
              "at the limit", "mutated and decoded", "mutated and refused"}
    assert wanted <= seen, f"never reached: {sorted(wanted - seen)}"


# --------------------------------------------------------------------------- round trips

publishable_scalars = (
    st.none() | st.booleans() | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
publishable_values: st.SearchStrategy[Any] = st.recursive(
    publishable_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
#: Strings the reference turned into other types; they must stay strings.
string_lookalikes = st.sampled_from(
    ["123", "-7", "1.5", "1e3", "true", "false", "null", "NaN", "Infinity", "[]", "{}",
     '"quoted"', "", " ", "0", "01", "[1,2]", '{"a":1}', "\x00", "é", "🙂", "a,b", "\r\n"])
field_names = (
    st.sampled_from(["session_id", "Type", "TIMESTAMP", "v", "json", "ü", "a b", "x" * 64])
    | st.text(min_size=1, max_size=16)
).filter(lambda s: not s.startswith("_") and "," not in s and s not in ("type", "timestamp"))
publish_fields = st.dictionaries(field_names, publishable_values | string_lookalikes,
                                 max_size=6)
event_types = (st.sampled_from(["handoff_ready", "123", "true", "null", "é", "a,b", " "])
               | st.text(min_size=1, max_size=24))


EXAMPLE_NUMBERS = itertools.count()


@given(batch=st.lists(st.tuples(event_types, publish_fields), min_size=1, max_size=12),
       how=st.sampled_from(["one by one", "concurrently", "publish_many"]))
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_published_events_decode_to_exactly_what_was_published(
        raw: aioredis.Redis, stream_name: str,
        batch: list[tuple[str, dict[str, Any]]], how: str) -> None:
    stream = f"{stream_name}-{next(EXAMPLE_NUMBERS)}"  # raw deletes {stream_name}* at the end
    publisher = Publisher(raw, stream)
    if how == "one by one":
        ids = [await publisher.publish(t, fields) for t, fields in batch]
    elif how == "concurrently":  # coalesced into pipelined round trips
        ids = list(await asyncio.gather(*(publisher.publish(t, f) for t, f in batch)))
    else:
        ids = await publisher.publish_many([{"type": t, **fields} for t, fields in batch])
    stored = dict(await stream_entries(raw, stream))
    for msg_id, (event_type, fields) in zip(ids, batch, strict=True):
        event = decode_entry(msg_id, stored.pop(msg_id), stream=stream)
        assert event.version == 1
        assert event.type == event_type
        assert isinstance(event.event_id, str)
        assert len(event.event_id) == 32
        assert isinstance(event.timestamp, float)
        assert_same({k: v for k, v in event.data.items() if k != "timestamp"},
                    {"type": event_type, **fields})
    assert not stored, "entries nobody published"


@pytest.mark.parametrize("depth", [1, 254])
async def test_deep_values_at_the_encoders_limit_round_trip(raw: aioredis.Redis,
                                                            stream_name: str, depth: int) -> None:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    publisher = Publisher(raw, stream_name)
    msg_id = await publisher.publish("deep", {"v": value, "n": "123"})
    [(read_id, fields)] = await stream_entries(raw, stream_name)
    event = decode_entry(read_id, fields, stream=stream_name)
    assert read_id == msg_id
    check_same(event["v"], value)
    assert event["n"] == "123"


@pytest.mark.parametrize("limit", [200, 4096])
async def test_an_event_the_publisher_accepts_at_its_limit_decodes_at_the_same_limit(
        raw: aioredis.Redis, stream_name: str, limit: int) -> None:
    """Publisher and decoder count the same bytes: an entry filled to exactly the limit is
    accepted by both, one byte more by neither."""
    publisher = Publisher(raw, stream_name, max_event_bytes=limit)
    stamp = 1_700_000_000.25  # a fixed producer timestamp: the clock's varies in length
    probe = await publisher.publish("t", {"pad": "", "timestamp": stamp})
    [(_, fields)] = await stream_entries(raw, stream_name)
    overhead = entry_size(fields)
    await raw.xdel(stream_name, probe)
    msg_id = await publisher.publish("t", {"pad": "x" * (limit - overhead), "timestamp": stamp})
    stored = dict(await stream_entries(raw, stream_name))
    assert entry_size(stored[msg_id]) == limit
    assert decode_entry(msg_id, stored[msg_id], stream=stream_name,
                        max_event_bytes=limit)["pad"] == "x" * (limit - overhead)
    with pytest.raises(MalformedEventError, match="over the"):
        decode_entry(msg_id, stored[msg_id], stream=stream_name, max_event_bytes=limit - 1)
    with pytest.raises(PayloadTooLargeError, match="limit"):
        await publisher.publish("t", {"pad": "x" * (limit - overhead + 1), "timestamp": stamp})

"""Mapping between events and stream entry fields (format version 1).

An entry keeps the reference's flat field names so ``redis-cli XRANGE`` stays readable:

    type           handoff_ready              (plain string)
    session_id     123                        (plain string: the value was the string "123")
    context        {"data":"value"}           (JSON: listed in _json)
    timestamp      1764118559.12              (JSON number: listed in _json)
    _v             1                          (format version)
    _eid           9f0c...                    (unique event id, for deduplication)
    _json          context,timestamp          (which fields hold JSON)

String values are written as they are; every other value is JSON and its field is named in
``_json``, so a string that looks like a number, ``"true"`` or ``"null"`` stays a string.
Entries without ``_v`` were written by the reference implementation and are decoded the way it
decodes them (every value that parses as JSON is JSON).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import orjson

from agentstreams._constants import (
    B_FIELD_EVENT_ID,
    B_FIELD_JSON,
    B_FIELD_TRACEPARENT,
    B_FIELD_TRACESTATE,
    B_FIELD_VERSION,
    DEFAULT_MAX_EVENT_BYTES,
    FIELD_EVENT_ID,
    FIELD_JSON,
    FIELD_TIMESTAMP,
    FIELD_TRACEPARENT,
    FIELD_TRACESTATE,
    FIELD_TYPE,
    FIELD_VERSION,
    FORMAT_VERSION,
    FORMAT_VERSION_BYTES,
    MAX_NAME_LENGTH,
)
from agentstreams._events import Event, EventType
from agentstreams._signing import StreamSigner
from agentstreams.errors import (
    InvalidArgumentError,
    MalformedEventError,
    PayloadTooLargeError,
    SerializationError,
)

_RESP_READER: Any  # hiredis.Reader, which parses RESP in C (None without hiredis)
try:
    from hiredis import Reader as _RESP_READER
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    _RESP_READER = None

__all__ = [
    "EncodedEntry",
    "decode_entry",
    "encode_event",
    "encode_event_resp",
    "new_event_id",
    "validate_event_type",
]

#: Field/value pairs ready for XADD, in order.
EncodedEntry = dict[bytes, bytes]

_JSON_SEPARATOR = b","
_FORMAT_VERSION_TEXT = FORMAT_VERSION_BYTES.decode()
_METADATA_PREFIX = b"_"


#: Bounded caches of validated field names (both directions): names repeat on every event, so
#: the hot paths look them up instead of re-validating and re-encoding. Once full they stop
#: growing (entries from other writers may carry arbitrary names).
_NAME_CACHE_MAX = 4096
_DECODED_NAMES: dict[bytes, str] = {}
_JSON_NAME_SETS: dict[bytes, frozenset[bytes]] = {}
#: Event types cached by value: exactly str and EventType (a subclass could hash or compare
#: in its own way).
_CACHEABLE_TYPES = (str, EventType)

# A UUID4 as an integer: clear the version and variant bits, then set version 4, RFC 4122.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)
_getrandbits = random.getrandbits


def new_event_id() -> str:
    """A fresh, unique event id: a random UUID4 as 32 lowercase hex characters.

    Built from ``random.getrandbits`` (seeded from the OS, re-seeded in forked children) at a
    fraction of the cost of ``uuid.uuid4().hex``; the id is for deduplication, not a secret.
    """
    return ((_getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET).to_bytes(16).hex()


def validate_event_type(event_type: object) -> str:
    """Return the event type as a plain string, or raise InvalidArgumentError."""
    if isinstance(event_type, EventType):
        return event_type.value
    if not isinstance(event_type, str) or not event_type:
        raise InvalidArgumentError(
            f"event type must be a non-empty string, got {event_type!r}"
        )
    if len(event_type) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(
            f"event type is {len(event_type)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    return event_type


def _check_field_name(name: object) -> bytes:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"field names must be non-empty strings, got {name!r}")
    if name[0] == "_":
        raise InvalidArgumentError(
            f"field name {name!r} starts with '_', which is reserved for agentstreams metadata; "
            "rename the field"
        )
    if "," in name:
        raise InvalidArgumentError(f"field name {name!r} may not contain a comma")
    try:
        return name.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"field name {name!r} is not valid UTF-8") from exc


def _dump_json(name: str, value: Any) -> bytes:
    """Encode one non-string value as JSON, refusing anything that would not round-trip."""
    try:
        out = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise SerializationError(
            f"field {name!r} cannot be encoded as JSON ({exc}); pass str, int, float, bool, "
            "None, or dicts with string keys and lists of those"
        ) from exc
    # orjson writes NaN and Infinity (top-level or nested) as null: only then look closer.
    if b"null" in out and value is not None:
        _refuse_nan(name, value)
    return out


def _refuse_nan(name: str, value: Any) -> None:
    """Raise when ``value`` is, or contains, a float that JSON cannot carry (rare path)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SerializationError(
            f"field {name!r}: {value!r} has no JSON representation; send it as a string"
        )
    if isinstance(value, dict | list | tuple):
        try:
            json.dumps(value, allow_nan=False)
        except ValueError as exc:
            raise SerializationError(
                f"field {name!r} contains NaN or Infinity, which JSON cannot carry"
            ) from exc


def _text_byte_length(name: object, value: str) -> int:
    """UTF-8 length of a str value, refusing lone surrogates (ASCII needs no encoding)."""
    if value.isascii():
        return len(value)
    try:
        return len(value.encode())
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"field {name!r} holds a string that is not valid Unicode (lone surrogate)"
        ) from exc


#: Validated field names as (RESP bulk-string header ``$<bytes>\r\n<name>\r\n``, UTF-8 length).
_RESP_NAMES: dict[str, tuple[str, int]] = {}


def _resp_bulk(text: str) -> str:
    """``text`` as a RESP bulk string (for the fixed metadata names and rare values)."""
    return f"${len(text.encode())}\r\n{text}\r\n"


#: ``$<n>\r\n`` for small lengths: a list lookup is cheaper than formatting an int per value.
_RESP_LENGTHS = [f"${n}\r\n" for n in range(4096)]


def _resp_length(n: int) -> str:
    return _RESP_LENGTHS[n] if n < 4096 else f"${n}\r\n"


_RESP_TYPE = _resp_bulk(FIELD_TYPE)
_RESP_TIMESTAMP = _resp_bulk(FIELD_TIMESTAMP)
_RESP_VERSION = _resp_bulk(FIELD_VERSION) + _resp_bulk(_FORMAT_VERSION_TEXT)
_RESP_EVENT_ID = _resp_bulk(FIELD_EVENT_ID)
_RESP_JSON = _resp_bulk(FIELD_JSON)
#: ``_v``, ``_eid`` and the length of a generated event id (always 32 ASCII characters).
_RESP_VERSION_EID = f"{_RESP_VERSION}{_RESP_EVENT_ID}$32\r\n"
_RESP_TRACEPARENT = _resp_bulk(FIELD_TRACEPARENT)
_RESP_TRACESTATE = _resp_bulk(FIELD_TRACESTATE)
#: Bytes the metadata field names (and the format version) add to an entry's size.
_TIMESTAMP_NAME_BYTES = len(FIELD_TIMESTAMP)
_VERSION_EID_BYTES = len(FIELD_VERSION) + len(FORMAT_VERSION_BYTES) + len(FIELD_EVENT_ID)
_JSON_NAME_BYTES = len(FIELD_JSON)
_TRACEPARENT_NAME_BYTES = len(FIELD_TRACEPARENT)
_TRACESTATE_NAME_BYTES = len(FIELD_TRACESTATE)


def _resp_name(name: object) -> tuple[str, int]:
    """A user field name as a RESP bulk string and its UTF-8 length (validated; cached)."""
    key = _check_field_name(name)
    if name == FIELD_TYPE:
        raise InvalidArgumentError("pass the event type separately, not as a 'type' field")
    assert isinstance(name, str)  # _check_field_name refuses anything else
    cached = (f"${len(key)}\r\n{name}\r\n", len(key))
    if len(_RESP_NAMES) < _NAME_CACHE_MAX:
        _RESP_NAMES[name] = cached
    return cached


#: The ``type`` pair of each event type as RESP, its size and the type as text.
_RESP_TYPES: dict[str | EventType, tuple[str, int, str]] = {}
_RESP_TIMESTAMP_NAME = (_RESP_TIMESTAMP, len(FIELD_TIMESTAMP))


def _resp_type(event_type: str | EventType) -> tuple[str, int, str]:
    """The ``type`` pair of an event type as RESP (validated; cached per distinct type)."""
    type_str = validate_event_type(event_type)
    length = len(type_str.encode())
    cached = (f"{_RESP_TYPE}{_resp_length(length)}{type_str}\r\n", length + len(FIELD_TYPE),
              type_str)
    if type(event_type) in _CACHEABLE_TYPES and len(_RESP_TYPES) < _NAME_CACHE_MAX:
        _RESP_TYPES[event_type] = cached
    return cached


def _timestamp_text(timestamp: float | None) -> str:
    """The producer timestamp as JSON text (orjson: half the cost of ``repr``)."""
    text = orjson.dumps(time.time() if timestamp is None else timestamp).decode()
    if text == "null":
        raise InvalidArgumentError(f"timestamp must be a finite number, got {timestamp!r}")
    return text


def _check_timestamp(value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidArgumentError(
            f"'timestamp' is the producer timestamp and must be a number, got {value!r}"
        )


def encode_event_resp(
    event_type: str | EventType,
    fields: Mapping[str, Any],
    *,
    event_id: str | None = None,
    timestamp: float | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    traceparent: str | None = None,
    tracestate: str | None = None,
    stream: str | None = None,
    type_in_fields: bool = False,
    signer: StreamSigner | None = None,
) -> tuple[int, str]:
    r"""Encode (and validate) one event: the entry's fields as RESP bulk strings.

    This is THE encoder: every publish path writes what it returns (``encode_event`` is a
    view of it). Returns ``(argument count, text)``; the publisher puts
    ``*<n>\r\n$4\r\nXADD\r\n<key>...*`` in front and encodes a whole batch with ONE
    ``str.encode`` (packing thousands of arguments one by one is what makes batches slow in
    Python). Every value went through a UTF-8 check here, so that encode cannot fail.

    ``fields`` must not contain ``type`` (with ``type_in_fields``, a ``type`` key is the
    event type and is skipped); a ``timestamp`` field, when given, must be a number and is the
    producer timestamp (otherwise ``timestamp`` or the current time is written). The size
    checked against ``max_event_bytes`` is every field name and value of the entry, metadata
    included: exactly what ``decode_entry`` counts.

    With a ``signer`` (that of the stream the entry goes to), ``_kid`` and ``_sig`` are
    appended (see ``_signing``) and counted in the size too.
    """
    head = _RESP_TYPES.get(event_type) if type(event_type) in _CACHEABLE_TYPES else None
    if head is None:
        head = _resp_type(event_type)
    parts = [head[0]]
    size = head[1]
    json_names: list[str] = []
    stamp: str | None = None
    names = _RESP_NAMES
    lengths = _RESP_LENGTHS
    dumps = orjson.dumps
    for name, value in fields.items():
        cached = names.get(name)
        if cached is None:
            if name == FIELD_TYPE and type_in_fields:
                continue
            if name == FIELD_TIMESTAMP:  # never cached: its value needs a check every time
                if type(value) is not float and type(value) is not int:
                    _check_timestamp(value)
                stamp = ""
                cached = _RESP_TIMESTAMP_NAME
            else:
                cached = _resp_name(name)
        if type(value) is str:
            length = len(value) if value.isascii() else _text_byte_length(name, value)
            text = value
        else:
            try:
                dumped = dumps(value)
            except (TypeError, orjson.JSONEncodeError):
                dumped = _dump_json(name, value)  # raises the explanatory error
            if b"null" in dumped and value is not None:
                _refuse_nan(name, value)
            length = len(dumped)
            text = dumped.decode()
            json_names.append(name)
        size += cached[1] + length
        parts.append(f"{cached[0]}{lengths[length] if length < 4096 else _resp_length(length)}"
                     f"{text}\r\n")
    nargs = len(parts) * 2 + 4  # the pairs so far, then _v and _eid
    if stamp is None:
        stamp = _timestamp_text(timestamp)
        json_names.append(FIELD_TIMESTAMP)
        parts.append(f"{_RESP_TIMESTAMP}{lengths[len(stamp)]}{stamp}\r\n")
        size += _TIMESTAMP_NAME_BYTES + len(stamp)
        nargs += 2
    if event_id is None:
        parts.append(f"{_RESP_VERSION_EID}{new_event_id()}\r\n")
        size += _VERSION_EID_BYTES + 32
    else:
        parts.append(f"{_RESP_VERSION}{_RESP_EVENT_ID}{_resp_bulk(event_id)}")
        size += _VERSION_EID_BYTES + _text_byte_length(FIELD_EVENT_ID, event_id)
    if json_names:
        joined = ",".join(json_names)
        joined_length = len(joined) if joined.isascii() else len(joined.encode())
        parts.append(f"{_RESP_JSON}{_resp_length(joined_length)}{joined}\r\n")
        size += _JSON_NAME_BYTES + joined_length
        nargs += 2
    if traceparent:
        parts.append(_RESP_TRACEPARENT + _resp_bulk(traceparent))
        size += _TRACEPARENT_NAME_BYTES + _text_byte_length(FIELD_TRACEPARENT, traceparent)
        nargs += 2
        if tracestate:
            parts.append(_RESP_TRACESTATE + _resp_bulk(tracestate))
            size += _TRACESTATE_NAME_BYTES + _text_byte_length(FIELD_TRACESTATE, tracestate)
            nargs += 2
    if signer is not None:
        size += signer.overhead
    if size > max_event_bytes:
        raise PayloadTooLargeError(
            f"event of type {head[2]!r} is {size} bytes (field names and values, metadata "
            f"included), over the {max_event_bytes}-byte limit; store large payloads elsewhere "
            "and publish a reference, or raise max_event_bytes",
            size=size,
            limit=max_event_bytes,
            stream=stream,
        )
    if signer is not None:
        return signer.sign(nargs, "".join(parts))
    return nargs, "".join(parts)


def encode_event(
    event_type: str | EventType,
    fields: Mapping[str, Any],
    *,
    event_id: str | None = None,
    timestamp: float | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    traceparent: str | None = None,
    tracestate: str | None = None,
    stream: str | None = None,
    signer: StreamSigner | None = None,
) -> EncodedEntry:
    """The entry ``encode_event_resp`` writes, as a field -> value dict (for tools and
    tests; the publish paths send the RESP text itself)."""
    nargs, text = encode_event_resp(
        event_type, fields, event_id=event_id, timestamp=timestamp,
        max_event_bytes=max_event_bytes, traceparent=traceparent, tracestate=tracestate,
        stream=stream, signer=signer)
    data = f"*{nargs}\r\n{text}".encode()
    if _RESP_READER is not None:
        reader = _RESP_READER()
        reader.feed(data)
        values: list[bytes] = reader.gets()
    else:  # pragma: no cover - hiredis is a dependency; $<length>\r\n<bytes>\r\n, nargs times
        values = []
        pos = data.index(b"\r\n") + 2
        while len(values) < nargs:
            end = data.index(b"\r\n", pos)
            start = end + 2
            stop = start + int(data[pos + 1:end])
            values.append(data[start:stop])
            pos = stop + 2
    return dict(zip(values[::2], values[1::2], strict=True))


def _as_str(raw: bytes, what: str, fields: Mapping[bytes, bytes], stream: str,
            msg_id: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedEventError(f"{what} is not valid UTF-8 ({exc.reason} at byte "
                                  f"{exc.start})", fields=fields, stream=stream,
                                  msg_id=msg_id) from exc


def _decode_legacy(fields: Mapping[bytes, bytes], stream: str, msg_id: str) -> dict[str, Any]:
    """Decode an entry the way the reference does: any value that parses as JSON is JSON."""
    data: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key = _as_str(raw_key, "a field name", fields, stream, msg_id)
        text = _as_str(raw_value, f"field {key!r}", fields, stream, msg_id)
        try:
            data[key] = json.loads(text)
        except ValueError:
            data[key] = text
        except RecursionError as exc:  # a JSON bomb: must not escape into a read loop
            raise MalformedEventError(f"field {key!r} is JSON nested too deeply to decode",
                                      fields=fields, stream=stream, msg_id=msg_id) from exc
    return data


def _json_name_set(json_raw: bytes | None) -> frozenset[bytes]:
    """The names listed in ``_json`` (cached: producers write the same few lists)."""
    if not json_raw:
        return frozenset()
    names = _JSON_NAME_SETS.get(json_raw)
    if names is None:
        names = frozenset(json_raw.split(_JSON_SEPARATOR))
        if len(_JSON_NAME_SETS) < _NAME_CACHE_MAX:
            _JSON_NAME_SETS[json_raw] = names
    return names


def _decode_fields_v1(fields: Mapping[bytes, bytes], json_names: frozenset[bytes]
                      ) -> dict[str, Any]:
    """The payload of a version-1 entry, fast; raises UnicodeDecodeError or
    orjson.JSONDecodeError on a bad field (the caller then explains it precisely)."""
    data: dict[str, Any] = {}
    decoded_names = _DECODED_NAMES
    loads = orjson.loads
    for raw_key, raw_value in fields.items():
        key = decoded_names.get(raw_key)
        if key is None:
            if raw_key[:1] == _METADATA_PREFIX:
                continue
            key = raw_key.decode()
            if len(decoded_names) < _NAME_CACHE_MAX:
                decoded_names[raw_key] = key
        if raw_key in json_names:
            data[key] = loads(raw_value)
        else:
            data[key] = raw_value.decode()
    return data


def _decode_fields_v1_checked(fields: Mapping[bytes, bytes], json_names: frozenset[bytes],
                              stream: str, msg_id: str) -> dict[str, Any]:
    """The payload of a version-1 entry, field by field, with a precise error for a bad one."""
    data: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        if raw_key[:1] == _METADATA_PREFIX:
            continue
        key = _as_str(raw_key, "a field name", fields, stream, msg_id)
        if raw_key in json_names:
            try:
                data[key] = orjson.loads(raw_value)
            except orjson.JSONDecodeError as exc:
                raise MalformedEventError(
                    f"field {key!r} is marked as JSON but does not parse ({exc})",
                    fields=fields, stream=stream, msg_id=msg_id,
                ) from exc
        else:
            data[key] = _as_str(raw_value, f"field {key!r}", fields, stream, msg_id)
    return data


def decode_entry(
    msg_id: str,
    fields: Mapping[bytes, bytes],
    *,
    stream: str,
    delivery_count: int = 1,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Event:
    """Decode one stream entry; raise MalformedEventError (with the raw fields) when it cannot."""
    if not fields:
        raise MalformedEventError("entry has no fields", fields=fields, stream=stream,
                                  msg_id=msg_id)
    size = 0
    for raw_key, raw_value in fields.items():
        size += len(raw_key) + len(raw_value)
    if size > max_event_bytes:
        raise MalformedEventError(
            f"entry is {size} bytes, over the {max_event_bytes}-byte limit",
            fields=fields, stream=stream, msg_id=msg_id,
        )
    version_raw = fields.get(B_FIELD_VERSION)
    if version_raw is None:
        data = _decode_legacy(fields, stream, msg_id)
        version = 0
        event_id: str | None = None
        traceparent: str | None = None
        tracestate: str | None = None
    else:
        if version_raw != FORMAT_VERSION_BYTES:
            raise MalformedEventError(
                f"format version {version_raw!r} is not supported by this agentstreams "
                f"(it reads version {FORMAT_VERSION}); upgrade, then replay it from the "
                "dead-letter stream",
                fields=fields, stream=stream, msg_id=msg_id,
            )
        version = FORMAT_VERSION
        json_names = _json_name_set(fields.get(B_FIELD_JSON))
        try:
            data = _decode_fields_v1(fields, json_names)
        except (UnicodeDecodeError, orjson.JSONDecodeError):
            # Rare: find the bad field again, carefully, to say exactly what is wrong.
            data = _decode_fields_v1_checked(fields, json_names, stream, msg_id)
        eid_raw = fields.get(B_FIELD_EVENT_ID)
        event_id = eid_raw.decode(errors="replace") if eid_raw is not None else None
        tp_raw = fields.get(B_FIELD_TRACEPARENT)
        traceparent = tp_raw.decode(errors="replace") if tp_raw is not None else None
        ts_raw = fields.get(B_FIELD_TRACESTATE)
        tracestate = ts_raw.decode(errors="replace") if ts_raw is not None else None
    event_type = data.get(FIELD_TYPE)
    if not isinstance(event_type, str) or not event_type:
        raise MalformedEventError(
            "entry has no 'type' field" if event_type is None
            else f"'type' must be a non-empty string, got {event_type!r}",
            fields=fields, stream=stream, msg_id=msg_id,
        )
    return Event(
        data=data,
        msg_id=msg_id,
        stream=stream,
        event_id=event_id,
        version=version,
        delivery_count=delivery_count,
        traceparent=traceparent,
        tracestate=tracestate,
    )

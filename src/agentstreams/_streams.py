"""Low-level stream operations shared by the coordinator, the worker and the CLI.

Every reply shape difference between RESP2 and RESP3, and every cryptic server error, is
handled here once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.exceptions as redis_exc

from agentstreams._connection import Redis, call
from agentstreams._constants import (
    AUTOCLAIM_BATCH,
    DLQ_SUFFIX,
    IDEMPOTENCY_SUFFIX,
    MAX_NAME_LENGTH,
)
from agentstreams.errors import InvalidArgumentError

__all__ = [
    "RawEntry",
    "ack",
    "autoclaim_all",
    "dlq_key",
    "ensure_group",
    "idempotency_key_name",
    "read_group",
    "side_key",
    "to_str",
    "validate_name",
]

logger = logging.getLogger("agentstreams.streams")

#: (stream id, fields). Fields are None when the entry was deleted or trimmed while pending.
RawEntry = tuple[str, dict[bytes, bytes] | None]


def to_str(value: bytes | str | int | None) -> str:
    """Bytes from a bytes-mode client (or str from a decode_responses one) as str."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def validate_name(kind: str, value: object, *, allow_none: bool = False) -> str:
    """Check a stream, group or consumer name and return it."""
    if value is None and allow_none:
        return ""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{kind} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(f"{kind} is {len(value)} characters; the limit is "
                                   f"{MAX_NAME_LENGTH}")
    return value


def side_key(stream: str, suffix: str) -> str:
    """A key that lives in the same cluster slot as ``stream`` (shares its hash tag)."""
    start = stream.find("{")
    if start != -1:
        end = stream.find("}", start + 1)
        if end > start + 1:  # the stream already has a hash tag: reuse it
            return f"{stream}:{suffix}"
    return f"{{{stream}}}:{suffix}"


def dlq_key(stream: str) -> str:
    """The dead-letter stream of ``stream``: ``{stream}:dlq``."""
    return side_key(stream, DLQ_SUFFIX)


def idempotency_key_name(stream: str, key: str) -> str:
    """The key that remembers one idempotency key: ``{stream}:idem:<key>``."""
    return side_key(stream, f"{IDEMPOTENCY_SUFFIX}:{key}")


async def ensure_group(client: Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create ``group`` on ``stream`` (and the stream); True if created, False if it existed."""
    try:
        await client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis_exc.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


def _normalise_entries(entries: Iterable[Any]) -> list[RawEntry]:
    out: list[RawEntry] = []
    for item in entries:
        msg_id, fields = item[0], item[1]
        out.append((to_str(msg_id), _bytes_fields(fields) if fields else None))
    return out


def _bytes_fields(fields: Mapping[Any, Any] | Sequence[Any]) -> dict[bytes, bytes]:
    if isinstance(fields, Mapping):
        items: Iterable[tuple[Any, Any]] = fields.items()
    else:  # a flat [k, v, k, v] list (raw replies)
        items = zip(fields[::2], fields[1::2], strict=True)
    out: dict[bytes, bytes] = {}
    for key, value in items:
        out[key if isinstance(key, bytes) else str(key).encode()] = (
            value if isinstance(value, bytes) else str(value).encode()
        )
    return out


def entries_from_read_reply(reply: Any) -> list[RawEntry]:
    """Entries of one stream from an XREAD/XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        out: list[RawEntry] = []
        for value in reply.values():
            entries = value[0] if value and isinstance(value[0], list) else value
            out.extend(_normalise_entries(entries))
        return out
    out = []
    for _stream, entries in reply:
        out.extend(_normalise_entries(entries))
    return out


async def read_group(client: Redis, stream: str, group: str, consumer: str, *,
                     start_id: str = ">", count: int = 100,
                     block_ms: int | None = None) -> list[RawEntry]:
    """One XREADGROUP on one stream; ``start_id="0"`` reads this consumer's pending entries."""
    reply = await call(
        lambda: client.xreadgroup(group, consumer, {stream: start_id}, count=count,
                                  block=block_ms),
        stream=stream, group=group,
    )
    return entries_from_read_reply(reply)


async def ack(client: Redis, stream: str, group: str, msg_ids: Sequence[str]) -> int:
    """XACK; returns how many were pending."""
    if not msg_ids:
        return 0
    return int(await call(lambda: client.xack(stream, group, *msg_ids), stream=stream,
                          group=group))


async def autoclaim_all(client: Redis, stream: str, group: str, consumer: str, *,
                        min_idle_ms: int, count: int = AUTOCLAIM_BATCH,
                        limit: int | None = None) -> tuple[list[RawEntry], list[str]]:
    """Claim every entry idle for ``min_idle_ms`` or more, following XAUTOCLAIM's cursor.

    Returns (claimed entries, ids that were deleted or trimmed while pending). The deleted ids
    are no longer in the group's pending list (Redis 7+ removes them), so the caller only reports
    them. ``limit`` stops early once that many entries are claimed.
    """
    cursor = "0-0"
    claimed: list[RawEntry] = []
    deleted: list[str] = []
    while True:
        reply = await call(
            lambda c=cursor: client.execute_command(  # type: ignore[misc,no-untyped-call]
                "XAUTOCLAIM", stream, group, consumer, min_idle_ms, c, "COUNT", count),
            stream=stream, group=group,
        )
        cursor = to_str(reply[0])
        for msg_id, fields in _normalise_entries(reply[1]):
            if fields is None:
                deleted.append(msg_id)
            else:
                claimed.append((msg_id, fields))
        if len(reply) > 2 and reply[2]:
            deleted.extend(to_str(x) for x in reply[2])
        if cursor == "0-0" or (limit is not None and len(claimed) >= limit):
            break
    if deleted:
        logger.warning(
            "%d pending entries of stream %r group %r were deleted or trimmed before they were "
            "acknowledged; they are lost to this group", len(deleted), stream, group,
            extra={"stream": stream, "group": group, "consumer": consumer,
                   "lost_ids": deleted[:20]},
        )
    return claimed, deleted


async def delivery_counts(client: Redis, stream: str, group: str,
                          msg_ids: Sequence[str], consumer: str | None = None) -> dict[str, int]:
    """Delivery count of each pending id (XPENDING over the ids' range)."""
    if not msg_ids:
        return {}
    ordered = sorted(msg_ids, key=stream_id_key)
    wanted = set(msg_ids)
    counts: dict[str, int] = {}
    start = ordered[0]
    end = ordered[-1]
    while True:
        rows = await call(
            lambda s=start: client.xpending_range(stream, group, min=s, max=end,  # type: ignore[misc]
                                                  count=1000, consumername=consumer),
            stream=stream, group=group,
        )
        for row in rows:
            msg_id = to_str(row["message_id"])
            if msg_id in wanted:
                counts[msg_id] = int(row["times_delivered"])
        if len(rows) < 1000:
            break
        start = "(" + to_str(rows[-1]["message_id"])
    return counts


def stream_id_key(msg_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``ms-seq``."""
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


def first_field(fields: Mapping[Any, Any], name: str) -> Any:
    """Value of a reply field whose key may be bytes or str."""
    if name in fields:
        return fields[name]
    return fields.get(name.encode())

"""Safe retention: trim a stream without removing what a consumer group still needs.

An entry may be removed only when every group has delivered *and* acknowledged it, i.e. its id
is below every group's oldest pending id and not above its last-delivered id. ``force=True``
trims to the requested length regardless (a hard cap).

When a group holds the stream back, ``TrimResult`` names it (``held_by``), says whether it is
an entry it has not acknowledged or one it has not read yet (``held_reason``), which entry
(``held_since_id``) and how old that entry is by the server's clock (``held_age_ms``): the
usual cause is a group nobody reads any more (a filtered subscription's parent group, a
retired service), which then keeps every entry forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.exceptions as redis_exc

from agentstreams import _scripts as scripts
from agentstreams._connection import Redis, call
from agentstreams._streams import first_field, stream_id_key, to_str
from agentstreams.errors import InvalidArgumentError

__all__ = ["HELD_PENDING", "HELD_UNREAD", "Floor", "TrimResult", "safe_floor", "stream_floor",
           "trim", "unacknowledged_cut"]

#: ``held_reason`` values: the group has an entry delivered and not acknowledged (``pending``),
#: or has not read past an entry (``unread``; ``held_since_id`` is then its last-delivered id,
#: ``0-0`` when it never read anything).
HELD_PENDING = "pending"
HELD_UNREAD = "unread"
#: Ids read per XRANGE when counting the entries a hard trim would take from the groups.
_COUNT_BATCH = 1000


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What a trim did: entries removed, the id below which it was allowed to cut, and which
    group set that limit and since when."""

    removed: int
    #: Lowest id some group still needs (None when no group exists).
    floor_id: str | None
    #: True when the requested length could not be reached without losing unacknowledged entries.
    limited_by_groups: bool
    #: The group whose oldest pending entry or last-delivered id sets ``floor_id``.
    held_by: str | None = None
    #: ``pending`` (an entry delivered, not acknowledged) or ``unread`` (not read past it).
    held_reason: str | None = None
    #: That entry's id: the oldest pending id, or the last-delivered id (``0-0``: nothing read).
    held_since_id: str | None = None
    #: Age of that entry by the server's clock, in ms (None for ``0-0``).
    held_age_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Floor:
    """The lowest id any group still needs, and which group needs it for what reason."""

    floor_id: str
    group: str
    reason: str
    since_id: str


def _next_id(msg_id: str) -> str:
    ms, seq = stream_id_key(msg_id)
    return f"{ms}-{seq + 1}"


def _min_id(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if stream_id_key(a) <= stream_id_key(b) else b


def _lower(a: Floor | None, b: Floor) -> Floor:
    if a is None or stream_id_key(b.floor_id) < stream_id_key(a.floor_id):
        return b
    return a


async def stream_floor(client: Redis, stream: str) -> Floor | None:
    """The lowest id any group still needs and the group that needs it (None when the stream
    has no groups). A pending entry wins over an unread one at the same id."""
    try:
        groups = await client.xinfo_groups(stream)
    except redis_exc.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    floor: Floor | None = None
    for group in groups:
        name = to_str(first_field(group, "name"))
        if int(first_field(group, "pending") or 0) > 0:
            summary = await client.xpending(stream, name)
            lowest = summary.get("min") if isinstance(summary, dict) else None
            if lowest:
                floor = _lower(floor, Floor(to_str(lowest), name, HELD_PENDING,
                                            to_str(lowest)))
        last = to_str(first_field(group, "last-delivered-id")) or "0-0"
        floor = _lower(floor, Floor(_next_id(last), name, HELD_UNREAD, last))
    return floor


async def safe_floor(client: Redis, stream: str) -> str | None:
    """The lowest id any group still needs (None when the stream has no groups)."""
    floor = await stream_floor(client, stream)
    return None if floor is None else floor.floor_id


async def _server_ms(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _held(client: Redis, floor: Floor | None, limited: bool, removed: int,
                floor_id: str | None) -> TrimResult:
    if floor is None or not limited:
        return TrimResult(removed, floor_id, limited)
    since_ms = stream_id_key(floor.since_id)[0]
    age = max(0, await _server_ms(client) - since_ms) if since_ms > 0 else None
    return TrimResult(removed, floor_id, limited, floor.group, floor.reason, floor.since_id, age)


async def unacknowledged_cut(client: Redis, stream: str, max_length: int) -> int:
    """How many of the entries a hard trim to ``max_length`` (``force=True``, exact) would
    remove some consumer group has not read and acknowledged yet (0 without groups)."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
        raise InvalidArgumentError(f"max_length must be an integer >= 0, got {max_length!r}")

    async def count() -> int:
        cut = await client.eval(scripts.MAXLEN_CUT_ID, 1, stream, max_length)
        if cut is None:
            return 0
        floor = await safe_floor(client, stream)
        if floor is None:
            return 0
        cut_id = to_str(cut)
        total, start = 0, floor
        while True:  # entries in [floor, cut): removed by the hard trim, needed by a group
            end = "+" if cut_id == "+" else "(" + cut_id
            rows: Any = await client.xrange(stream, min=start, max=end, count=_COUNT_BATCH)
            total += len(rows)
            if len(rows) < _COUNT_BATCH:
                return total
            start = "(" + to_str(rows[-1][0])

    return int(await call(count, stream=stream))


async def trim(client: Redis, stream: str, max_length: int, *, approximate: bool = True,
               force: bool = False) -> TrimResult:
    """Trim ``stream`` towards ``max_length`` entries, never past what a group still needs."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
        raise InvalidArgumentError(f"max_length must be an integer >= 0, got {max_length!r}")

    async def run() -> TrimResult:
        if force:
            removed = await client.xtrim(stream, maxlen=max_length, approximate=approximate)
            return TrimResult(int(removed), None, False)
        cut = await client.eval(scripts.MAXLEN_CUT_ID, 1, stream, max_length)
        if cut is None:
            return TrimResult(0, None, False)
        cut_id = to_str(cut)
        held = await stream_floor(client, stream)
        floor = None if held is None else held.floor_id
        if cut_id == "+":
            last = await client.xrevrange(stream, count=1)
            cut_id = _next_id(to_str(last[0][0])) if last else "0-1"
        threshold = _min_id(cut_id, floor) or cut_id
        limited = threshold != cut_id
        removed = await client.xtrim(stream, minid=threshold, approximate=approximate)
        return await _held(client, held, limited, int(removed), floor)

    return await call(run, stream=stream)

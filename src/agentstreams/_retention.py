"""Safe retention: trim a stream without removing what a consumer group still needs.

An entry may be removed only when every group has delivered *and* acknowledged it, i.e. its id
is below every group's oldest pending id and not above its last-delivered id. ``force=True``
trims to the requested length regardless (a hard cap).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.exceptions as redis_exc

from agentstreams import _scripts as scripts
from agentstreams._connection import Redis, call
from agentstreams._streams import first_field, stream_id_key, to_str
from agentstreams.errors import InvalidArgumentError

__all__ = ["TrimResult", "safe_floor", "trim"]


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What a trim did: entries removed, and the id below which it was allowed to cut."""

    removed: int
    #: Lowest id some group still needs (None when no group exists).
    floor_id: str | None
    #: True when the requested length could not be reached without losing unacknowledged entries.
    limited_by_groups: bool


def _next_id(msg_id: str) -> str:
    ms, seq = stream_id_key(msg_id)
    return f"{ms}-{seq + 1}"


def _min_id(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if stream_id_key(a) <= stream_id_key(b) else b


async def safe_floor(client: Redis, stream: str) -> str | None:
    """The lowest id any group still needs (None when the stream has no groups)."""
    try:
        groups = await client.xinfo_groups(stream)
    except redis_exc.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    floor: str | None = None
    for group in groups:
        name = to_str(first_field(group, "name"))
        last = to_str(first_field(group, "last-delivered-id")) or "0-0"
        floor = _min_id(floor, _next_id(last))
        if int(first_field(group, "pending") or 0) > 0:
            summary = await client.xpending(stream, name)
            lowest = summary.get("min") if isinstance(summary, dict) else None
            if lowest:
                floor = _min_id(floor, to_str(lowest))
    return floor


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
        floor = await safe_floor(client, stream)
        if cut_id == "+":
            last = await client.xrevrange(stream, count=1)
            cut_id = _next_id(to_str(last[0][0])) if last else "0-1"
        threshold = _min_id(cut_id, floor) or cut_id
        limited = threshold != cut_id
        removed = await client.xtrim(stream, minid=threshold, approximate=approximate)
        return TrimResult(int(removed), floor, limited)

    return await call(run, stream=stream)

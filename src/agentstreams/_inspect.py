"""What the server holds: streams, consumer groups, consumers, pending entries and dead letters.

One read-only implementation for every reader: ``agentstreams info`` and ``pending``, the
Prometheus collector (``agentstreams.metrics``) and the dashboard. Each call returns typed
snapshots (frozen dataclasses), pipelines its commands (a few round trips, whatever the number of
streams), finds streams with ``SCAN ... TYPE stream`` (never ``KEYS``), examines at most
``max_streams`` of them, and reads both RESP2 and RESP3 reply shapes from a bytes client. Ages are
measured with the server's clock (``TIME``), the clock stream ids come from.

Dead-letter streams (``{stream}:dlq``) are not streams of their own here: their length is the
``dead_letters`` of the stream they belong to. A key ``{x}:dlq`` could belong to a stream ``x``
or to one literally named ``{x}``; it belongs to ``x`` when a stream ``x`` exists, else to
``{x}`` (``dead_letter_owner``).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

import redis.exceptions as redis_exc

from agentstreams._codec import decode_entry
from agentstreams._connection import Redis, call, translate_error
from agentstreams._constants import DEFAULT_INSPECT_MAX_STREAMS, DLQ_SUFFIX, SCAN_BATCH
from agentstreams._streams import dlq_key, first_field, stream_id_key, to_str
from agentstreams.errors import InvalidArgumentError, MalformedEventError

__all__ = [
    "ConsumerStats",
    "EntrySummary",
    "GroupStats",
    "PendingEntry",
    "PendingReport",
    "ServerStats",
    "StreamKeys",
    "StreamStats",
    "dead_letter_owner",
    "describe_entry",
    "find_streams",
    "inspect_server",
    "inspect_stream",
    "inspect_streams",
    "pending_entries",
]

#: Decoding an entry for display must never fail on size: show what is there.
_NO_SIZE_LIMIT = 1 << 62


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """Type and session of one entry, for tables; never raises on a malformed entry."""

    type: str | None
    session_id: str | None
    #: Why the entry cannot be decoded (None when it can).
    malformed: str | None = None
    #: The entry was deleted or trimmed (a pending id whose entry is gone).
    deleted: bool = False

    @property
    def label(self) -> str:
        """``(deleted)``, ``(malformed)``, the type, or ``-``."""
        if self.deleted:
            return "(deleted)"
        if self.malformed:
            return "(malformed)"
        return self.type or "-"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the ``pending`` command's entry columns)."""
        return {"type": self.type, "session_id": self.session_id,
                "malformed": self.malformed, "deleted": self.deleted}


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One entry delivered to a group and not acknowledged yet."""

    id: str
    consumer: str
    #: Time since it was last delivered.
    idle_ms: int
    deliveries: int
    #: Time since it was added to the stream (server clock).
    age_ms: int | None
    #: Type and session (only where asked for: ``pending_entries``).
    summary: EntrySummary | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        data: dict[str, Any] = {"id": self.id, "consumer": self.consumer,
                                "idle_ms": self.idle_ms, "deliveries": self.deliveries,
                                "age_ms": self.age_ms}
        if self.summary is not None:
            data.update(self.summary.as_dict())
        return data


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """One consumer of a group."""

    name: str
    pending: int
    #: Time since its last read or claim attempt.
    idle_ms: int
    #: Time since it last read successfully (Redis 7.2+ / Valkey; None on older servers).
    inactive_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"name": self.name, "pending": self.pending, "idle_ms": self.idle_ms,
                "inactive_ms": self.inactive_ms}


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One consumer group of a stream."""

    name: str
    #: Consumers registered in the group.
    consumers: int
    pending: int
    #: Entries not delivered to the group yet; None when the server cannot tell (after
    #: deletions inside the range, or before Redis 7).
    lag: int | None
    last_delivered_id: str | None
    entries_read: int | None
    #: The oldest entry delivered and never acknowledged (None when nothing is pending).
    oldest_pending: PendingEntry | None = None
    #: Each consumer (only with ``detail``).
    consumer_stats: tuple[ConsumerStats, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``agentstreams info --json``)."""
        oldest = self.oldest_pending
        return {
            "name": self.name,
            "lag": self.lag,
            "pending": self.pending,
            "last_delivered_id": self.last_delivered_id,
            "entries_read": self.entries_read,
            "oldest_pending_id": oldest.id if oldest else None,
            "oldest_pending_age_ms": oldest.age_ms if oldest else None,
            "oldest_pending_idle_ms": oldest.idle_ms if oldest else None,
            "oldest_pending_deliveries": oldest.deliveries if oldest else None,
            "oldest_pending_consumer": oldest.consumer if oldest else None,
            "consumers": [c.as_dict() for c in self.consumer_stats],
        }


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One stream: length, dead letters, groups; first and last entries with ``detail``."""

    name: str
    #: False for a named stream that does not exist, or a dead-letter stream whose stream is
    #: gone (its letters are still counted).
    exists: bool
    length: int
    dead_letters: int
    groups: tuple[GroupStats, ...] = ()
    first_entry_id: str | None = None
    first_entry_age_ms: int | None = None
    last_entry_id: str | None = None
    last_entry_age_ms: int | None = None
    #: ``EntrySummary.label`` of the last entry.
    last_entry_type: str | None = None
    last_generated_id: str | None = None
    #: Entries ever added (Redis 7+; a rate is its change over time). Not in ``as_dict``, which
    #: is the stable ``info --json`` shape.
    entries_added: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``agentstreams info --json``)."""
        return {
            "stream": self.name,
            "exists": self.exists,
            "length": self.length,
            "first_entry_id": self.first_entry_id,
            "first_entry_age_ms": self.first_entry_age_ms,
            "last_entry_id": self.last_entry_id,
            "last_entry_age_ms": self.last_entry_age_ms,
            "last_entry_type": self.last_entry_type,
            "last_generated_id": self.last_generated_id,
            "dead_letters": self.dead_letters,
            "groups": [g.as_dict() for g in self.groups],
        }


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """What ``SCAN ... TYPE stream`` found: streams, and dead-letter streams apart."""

    #: Stream names, sorted, at most ``max_streams``.
    streams: tuple[str, ...]
    #: Dead-letter stream keys found (their owners are decided later, see ``inspect_server``).
    dead_letter_keys: tuple[str, ...]
    #: Every stream found, also those beyond ``max_streams`` (to decide who owns a dead letter).
    all_streams: frozenset[str] = frozenset()

    @property
    def truncated(self) -> bool:
        """More streams exist than ``max_streams``; the first ones (sorted) were kept."""
        return len(self.all_streams) > len(self.streams)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Every stream asked for (or found), and dead letters whose stream is gone."""

    streams: tuple[StreamStats, ...]
    #: Dead-letter streams whose stream no longer exists (``exists`` False, length 0).
    orphans: tuple[StreamStats, ...] = ()
    #: Some streams were left out to respect ``max_streams``.
    truncated: bool = False
    #: Streams found (or named) in all, before ``max_streams``.
    found: int = 0
    server_time_ms: int = 0

    @property
    def rows(self) -> tuple[StreamStats, ...]:
        """Streams, then orphaned dead letters: one row each, as ``info`` shows them."""
        return self.streams + self.orphans


@dataclass(frozen=True, slots=True)
class PendingReport:
    """The pending entries of one group (``agentstreams pending``)."""

    stream: str
    group: str
    #: Pending entries in all (``entries`` may hold fewer).
    pending: int
    oldest_id: str | None
    newest_id: str | None
    #: Pending entries per consumer.
    consumers: dict[str, int] = field(default_factory=dict)
    #: Oldest first, at most ``count``.
    entries: tuple[PendingEntry, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"stream": self.stream, "group": self.group, "pending": self.pending,
                "oldest_id": self.oldest_id, "newest_id": self.newest_id,
                "consumers": dict(self.consumers),
                "entries": [e.as_dict() for e in self.entries]}


# ------------------------------------------------------------------------------ dead letters


def _owner_candidates(key: str) -> list[str]:
    """Streams whose dead-letter stream ``key`` could be, preferred first."""
    suffix = ":" + DLQ_SUFFIX
    if not key.endswith(suffix):
        return []
    base = key[:-len(suffix)]
    candidates = [base[1:-1], base] if base.startswith("{") and base.endswith("}") else [base]
    return [c for c in candidates if c and dlq_key(c) == key]


def _preferred_to(stream: str) -> list[str]:
    """Streams that would own ``stream``'s dead-letter stream instead of it, if they exist."""
    candidates = _owner_candidates(dlq_key(stream))
    return candidates[:candidates.index(stream)] if stream in candidates else candidates


def dead_letter_owner(key: str, streams: Container[str]) -> str | None:
    """The stream whose dead-letter stream ``key`` is, or None when ``key`` is not one.

    ``{x}:dlq`` belongs to ``x``, unless only a stream literally named ``{x}`` is among
    ``streams`` (the streams known to exist); with neither, to ``x`` (a stream that is gone).
    """
    candidates = _owner_candidates(key)
    for candidate in candidates:
        if candidate in streams:
            return candidate
    return candidates[0] if candidates else None


# ------------------------------------------------------------------------------ helpers


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _age_ms(msg_id: str | None, now_ms: int) -> int | None:
    """How long before ``now_ms`` the entry ``msg_id`` was added (never negative)."""
    if not msg_id:
        return None
    try:
        added_ms = stream_id_key(msg_id)[0]
    except ValueError:
        return None
    return max(0, now_ms - added_ms)


async def _execute(pipe: Any) -> list[Any]:
    """Run a pipeline: a server error stays in place of its reply; a lost connection raises
    (translated, as ``call`` does)."""
    replies: list[Any] = await call(lambda: pipe.execute(raise_on_error=False))
    for reply in replies:
        if isinstance(reply, redis_exc.ConnectionError | redis_exc.TimeoutError):
            raise translate_error(reply) from reply
    return replies


def _server_ms(reply: Any) -> int:
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def describe_entry(msg_id: str, fields: Mapping[bytes, bytes] | None,
                   stream: str) -> EntrySummary:
    """Type and session of one entry (``fields`` None: the entry was deleted)."""
    if fields is None:
        return EntrySummary(None, None, deleted=True)
    try:
        event = decode_entry(msg_id, fields, stream=stream, max_event_bytes=_NO_SIZE_LIMIT)
    except MalformedEventError as exc:
        return EntrySummary(None, None, malformed=exc.reason)
    session = event.session_id
    return EntrySummary(event.type, None if session is None else str(session))


def _pending_entry(row: Mapping[str, Any], now_ms: int,
                   summary: EntrySummary | None = None) -> PendingEntry:
    msg_id = to_str(row["message_id"])
    return PendingEntry(id=msg_id, consumer=to_str(row["consumer"]),
                        idle_ms=int(row["time_since_delivered"]),
                        deliveries=int(row["times_delivered"]), age_ms=_age_ms(msg_id, now_ms),
                        summary=summary)


def _consumer_stats(info: Mapping[Any, Any]) -> ConsumerStats:
    return ConsumerStats(name=to_str(first_field(info, "name")),
                         pending=int(first_field(info, "pending") or 0),
                         idle_ms=int(first_field(info, "idle") or 0),
                         inactive_ms=_int_or_none(first_field(info, "inactive")))


def _group_stats(info: Mapping[Any, Any]) -> GroupStats:
    return GroupStats(
        name=to_str(first_field(info, "name")),
        consumers=int(first_field(info, "consumers") or 0),
        pending=int(first_field(info, "pending") or 0),
        lag=_int_or_none(first_field(info, "lag")),
        last_delivered_id=to_str(first_field(info, "last-delivered-id")) or None,
        entries_read=_int_or_none(first_field(info, "entries-read")),
    )


def _check_max_streams(max_streams: int) -> None:
    if not isinstance(max_streams, int) or max_streams < 1:
        raise InvalidArgumentError(f"max_streams must be an integer >= 1, got {max_streams!r}")


# ------------------------------------------------------------------------------ discovery


async def find_streams(client: Redis, *, match: str | None = None,
                       max_streams: int = DEFAULT_INSPECT_MAX_STREAMS) -> StreamKeys:
    """Stream keys on the server (``SCAN ... TYPE stream``, never ``KEYS``), dead-letter
    streams apart; at most ``max_streams`` streams, the first in sorted order."""
    _check_max_streams(max_streams)
    keys: set[str] = set()

    async def scan() -> None:
        async for key in client.scan_iter(match=match, count=SCAN_BATCH, _type="stream"):
            keys.add(to_str(key))

    await call(scan)
    streams: list[str] = []
    dead: list[str] = []
    for key in sorted(keys):
        # A key shaped like a dead-letter stream (`{x}:dlq`) is one, whoever owns it.
        (dead if dead_letter_owner(key, keys) is not None else streams).append(key)
    return StreamKeys(streams=tuple(streams[:max_streams]), dead_letter_keys=tuple(dead),
                      all_streams=frozenset(streams))


# ------------------------------------------------------------------------------ inspection


async def _streams_among(client: Redis, names: Iterable[str], known: AbstractSet[str],
                         complete: bool) -> set[str]:
    """Which of ``names`` are streams: those in ``known``, and (unless ``known`` is every
    stream on the server) those a pipelined TYPE says are."""
    wanted = set(names)
    found = wanted & known
    unknown = sorted(wanted - known)
    if complete or not unknown:
        return found
    pipe = client.pipeline(transaction=False)
    for name in unknown:
        pipe.type(name)
    replies = await _execute(pipe)
    return found | {name for name, kind in zip(unknown, replies, strict=True)
                    if not isinstance(kind, Exception) and to_str(kind) == "stream"}


async def inspect_streams(client: Redis, names: Sequence[str], *, detail: bool = False,
                          dead_letter_keys: Sequence[str] = (),
                          known_streams: AbstractSet[str] = frozenset(),
                          complete: bool = False) -> ServerStats:
    """Stats of each stream in ``names`` (a missing one: ``exists`` False, length 0; a key of
    another type is left out), plus ``dead_letter_keys`` whose stream is gone, as orphans.

    ``detail`` adds first and last entries and each consumer (``info STREAM``); without it, the
    cheap counts a scrape needs. ``known_streams`` are names known to be streams and
    ``complete`` says they are all the server has (then no TYPE is needed to decide who owns a
    dead-letter stream).
    """
    names = list(dict.fromkeys(names))
    # Whether a name owns its dead-letter stream depends only on the candidates preferred to
    # it (a `{x}` loses `{x}:dlq` to an existing x); an orphan, on all of its candidates.
    in_doubt = [c for name in names for c in _preferred_to(name)]
    in_doubt += [c for key in dead_letter_keys for c in _owner_candidates(key)]
    streams_set = await _streams_among(client, in_doubt, known_streams, complete)
    streams_set |= {name for name in names if name not in in_doubt}
    owned = [name for name in names if dead_letter_owner(dlq_key(name), streams_set) == name]
    orphans_of = {key: owner for key in dead_letter_keys
                  if (owner := dead_letter_owner(key, streams_set)) is not None
                  and owner not in streams_set and owner not in names}
    orphan_keys = sorted(orphans_of, key=orphans_of.__getitem__)

    pipe = client.pipeline(transaction=False)
    pipe.time()
    for name in names:
        if detail:
            pipe.xinfo_stream(name)
        else:
            pipe.xlen(name)
        pipe.xinfo_groups(name)
    for name in owned:
        pipe.xlen(dlq_key(name))
    for key in orphan_keys:
        pipe.xlen(key)
    replies = await _execute(pipe)
    now_ms = _server_ms(replies[0])
    offset = 1 + 2 * len(names)
    dead_counts = {name: _count(reply) for name, reply in
                   zip(owned, replies[offset:offset + len(owned)], strict=True)}
    orphans = tuple(StreamStats(orphans_of[key], exists=False, length=0, dead_letters=_count(reply))
                    for key, reply in zip(orphan_keys, replies[offset + len(owned):], strict=True))

    partial: list[tuple[StreamStats, list[GroupStats]]] = []
    for index, name in enumerate(names):
        head, groups_reply = replies[1 + 2 * index: 3 + 2 * index]
        dead = dead_counts.get(name, 0)
        if isinstance(head, Exception):
            if "no such key" in str(head):
                partial.append((StreamStats(name, exists=False, length=0, dead_letters=dead), []))
            continue  # otherwise WRONGTYPE: not a stream, nothing to report
        if not detail and int(head) == 0 and isinstance(groups_reply, Exception):
            # XLEN answers 0 for a missing key; XINFO GROUPS tells it apart.
            partial.append((StreamStats(name, exists=False, length=0, dead_letters=dead), []))
            continue
        groups = [] if isinstance(groups_reply, Exception) else [
            _group_stats(info) for info in groups_reply]
        partial.append((_stream_head(name, head, detail, dead, now_ms), groups))

    # Second round: the oldest pending entry of each busy group; consumers with ``detail``.
    pipe = client.pipeline(transaction=False)
    asked: list[tuple[list[GroupStats], int, bool]] = []
    for stream, groups in partial:
        for g_index, group in enumerate(groups):
            if group.pending:
                pipe.xpending_range(stream.name, group.name, min="-", max="+", count=1)
                asked.append((groups, g_index, True))
            if detail:
                pipe.xinfo_consumers(stream.name, group.name)
                asked.append((groups, g_index, False))
    for (groups, g_index, oldest), reply in zip(asked, await _execute(pipe) if asked else [],
                                               strict=True):
        if isinstance(reply, Exception):
            continue  # the group went away between the two rounds
        if oldest:
            groups[g_index] = replace(groups[g_index], oldest_pending=_pending_entry(
                reply[0], now_ms) if reply else None)
        else:
            groups[g_index] = replace(groups[g_index], consumer_stats=tuple(
                _consumer_stats(c) for c in reply))
    return ServerStats(streams=tuple(replace(s, groups=tuple(g)) for s, g in partial),
                       orphans=orphans, found=len(names), server_time_ms=now_ms)


def _count(reply: Any) -> int:
    """An XLEN reply; 0 for an error (a key of another type)."""
    return 0 if isinstance(reply, Exception) else int(reply)


def _stream_head(name: str, head: Any, detail: bool, dead: int, now_ms: int) -> StreamStats:
    """Length (XLEN), or with ``detail`` length and first and last entries (XINFO STREAM)."""
    if not detail:
        return StreamStats(name, exists=True, length=int(head), dead_letters=dead)
    first = first_field(head, "first-entry")
    last = first_field(head, "last-entry")
    first_id = to_str(first[0]) if first else None
    last_id = to_str(last[0]) if last else None
    return StreamStats(
        name, exists=True, length=int(first_field(head, "length") or 0), dead_letters=dead,
        first_entry_id=first_id, first_entry_age_ms=_age_ms(first_id, now_ms),
        last_entry_id=last_id, last_entry_age_ms=_age_ms(last_id, now_ms),
        last_entry_type=describe_entry(last_id, last[1], name).label if last_id else None,
        last_generated_id=to_str(first_field(head, "last-generated-id")) or None,
        entries_added=_int_or_none(first_field(head, "entries-added")),
    )


async def inspect_stream(client: Redis, stream: str, *, detail: bool = True) -> StreamStats:
    """Stats of one stream, by default with entries and consumers (``info STREAM``)."""
    stats = await inspect_streams(client, [stream], detail=detail)
    if not stats.streams:
        raise InvalidArgumentError(f"key {stream!r} is not a stream")
    return stats.streams[0]


async def inspect_server(client: Redis, *, streams: Sequence[str] | None = None,
                         match: str | None = None, detail: bool = False,
                         max_streams: int = DEFAULT_INSPECT_MAX_STREAMS) -> ServerStats:
    """Stats of ``streams``, or of every stream found by SCAN (``match`` narrows it), with the
    dead letters of streams that are gone; at most ``max_streams`` streams per call."""
    _check_max_streams(max_streams)
    if streams is not None:
        names = list(dict.fromkeys(streams))
        stats = await inspect_streams(client, names[:max_streams], detail=detail)
        return ServerStats(streams=stats.streams, truncated=len(names) > max_streams,
                           found=len(names), server_time_ms=stats.server_time_ms)
    found = await find_streams(client, match=match, max_streams=max_streams)
    # Without --match (and untruncated) the scan saw every stream: no TYPE needed for owners.
    stats = await inspect_streams(client, found.streams, detail=detail,
                                  dead_letter_keys=found.dead_letter_keys,
                                  known_streams=frozenset(found.all_streams),
                                  complete=match is None)
    # Orphaned dead letters count against the bound too.
    orphans = stats.orphans[:max(0, max_streams - len(stats.streams))]
    return ServerStats(streams=stats.streams, orphans=orphans,
                       truncated=found.truncated or len(orphans) < len(stats.orphans),
                       found=len(found.all_streams), server_time_ms=stats.server_time_ms)


# ------------------------------------------------------------------------------ pending


async def pending_entries(client: Redis, stream: str, group: str, *, count: int = 50,
                          consumer: str | None = None, min_idle_ms: int = 0) -> PendingReport:
    """The group's pending entries, oldest first (at most ``count``), each with its owner, idle
    time, deliveries and the entry's type and session."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.xpending(stream, group)
    pipe.xpending_range(stream, group, min="-", max="+", count=count, consumername=consumer,
                        idle=min_idle_ms or None)
    replies: list[Any] = await call(pipe.execute, stream=stream, group=group)
    now_ms = _server_ms(replies[0])
    summary: Mapping[str, Any] = replies[1]
    rows: list[Mapping[str, Any]] = replies[2]
    ids = [to_str(row["message_id"]) for row in rows]
    summaries: dict[str, EntrySummary] = {}
    if ids:
        pipe = client.pipeline(transaction=False)
        for msg_id in ids:
            pipe.xrange(stream, min=msg_id, max=msg_id, count=1)
        found = await call(pipe.execute, stream=stream)
        for msg_id, reply in zip(ids, found, strict=True):
            summaries[msg_id] = describe_entry(msg_id, reply[0][1] if reply else None, stream)
    return PendingReport(
        stream=stream, group=group, pending=int(summary.get("pending") or 0),
        oldest_id=to_str(summary.get("min")) or None,
        newest_id=to_str(summary.get("max")) or None,
        consumers={to_str(c["name"]): int(c["pending"])
                   for c in summary.get("consumers") or []},
        entries=tuple(_pending_entry(row, now_ms, summaries[msg_id])
                      for msg_id, row in zip(ids, rows, strict=True)),
    )

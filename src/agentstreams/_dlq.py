"""Dead letters: events that failed too often, or could not be decoded, kept with the reason.

A dead letter is a stream entry in ``{stream}:dlq`` holding the original fields unchanged plus
these fields: ``original_id``, ``original_stream``, ``group``, ``consumer``, ``reason``
(``max_deliveries``, ``malformed``, ``rejected``), ``error`` (``Type: message``),
``deliveries`` and ``dead_at_ms``. An original field whose name collides with one of them, or
starts with ``_orig_``, is kept as ``_orig_<name>`` and restored on read and replay.
"""

from __future__ import annotations

import builtins
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentstreams import _scripts as scripts
from agentstreams._codec import decode_entry
from agentstreams._connection import Redis, call
from agentstreams._constants import (
    DLQ_FIELD_CONSUMER,
    DLQ_FIELD_DEAD_AT_MS,
    DLQ_FIELD_DELIVERIES,
    DLQ_FIELD_ERROR,
    DLQ_FIELD_GROUP,
    DLQ_FIELD_ORIGINAL_ID,
    DLQ_FIELD_ORIGINAL_STREAM,
    DLQ_FIELD_REASON,
    DLQ_FIELD_TRACEBACK,
    DLQ_TRACEBACK_MAX_CHARS,
    FIELD_FOR_GROUP,
)
from agentstreams._events import Event
from agentstreams._streams import dlq_key, entries_from_read_reply, to_str
from agentstreams.errors import InvalidArgumentError

__all__ = ["DeadLetter", "DeadLetterQueue", "dead_letter", "format_error", "format_traceback"]

_B_FOR_GROUP = FIELD_FOR_GROUP.encode()
logger = logging.getLogger("agentstreams.dlq")

_META_FIELDS = (
    DLQ_FIELD_ORIGINAL_ID, DLQ_FIELD_ORIGINAL_STREAM, DLQ_FIELD_GROUP, DLQ_FIELD_CONSUMER,
    DLQ_FIELD_REASON, DLQ_FIELD_ERROR, DLQ_FIELD_DELIVERIES, DLQ_FIELD_DEAD_AT_MS,
    DLQ_FIELD_TRACEBACK,
)
_META_BYTES = frozenset(name.encode() for name in _META_FIELDS)
_COLLISION_PREFIX = b"_orig_"
#: Arguments a server-side script takes at most (Lua's C stack holds about 8,000 values); a
#: dead letter with more fields is moved by a transaction instead (see ``dead_letter``).
_SCRIPT_ARGS_MAX = 7000


def format_error(exc: BaseException | None) -> str:
    """``Type: message`` of an exception, cut to a readable length."""
    if exc is None:
        return ""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def format_traceback(exc: BaseException | None) -> str:
    """The traceback of ``exc`` (with its causes), cut to its innermost
    ``DLQ_TRACEBACK_MAX_CHARS`` characters: where it failed is at the end."""
    if exc is None or exc.__traceback__ is None:
        return ""
    text = "".join(traceback.format_exception(exc))
    if len(text) <= DLQ_TRACEBACK_MAX_CHARS:
        return text
    return "...\n" + text[-(DLQ_TRACEBACK_MAX_CHARS - 4):]


def _dead_letter_fields(stream: str, group: str, consumer: str, msg_id: str,
                        fields: Mapping[bytes, bytes], reason: str, error: str,
                        deliveries: int, trace: str) -> list[bytes | str]:
    pairs: list[bytes | str] = [
        DLQ_FIELD_ORIGINAL_ID, msg_id,
        DLQ_FIELD_ORIGINAL_STREAM, stream,
        DLQ_FIELD_GROUP, group,
        DLQ_FIELD_CONSUMER, consumer,
        DLQ_FIELD_REASON, reason,
        DLQ_FIELD_ERROR, error,
        DLQ_FIELD_DELIVERIES, str(deliveries),
        DLQ_FIELD_DEAD_AT_MS, str(int(time.time() * 1000)),
    ]
    if trace:
        pairs += [DLQ_FIELD_TRACEBACK, trace]
    for key, value in fields.items():
        # Escape names that clash with ours, and names that look escaped already, so that
        # stripping one prefix on the way back restores every name exactly.
        escape = key in _META_BYTES or key.startswith(_COLLISION_PREFIX)
        pairs.append(_COLLISION_PREFIX + key if escape else key)
        pairs.append(value)
    return pairs


async def dead_letter(
    client: Redis,
    *,
    stream: str,
    group: str,
    consumer: str,
    msg_id: str,
    fields: Mapping[bytes, bytes] | None,
    reason: str,
    error: str,
    deliveries: int,
    trace: str = "",
) -> str | None:
    """Move a pending entry of ``consumer`` to the dead-letter stream and ack it, atomically,
    keeping every original field (and ``trace``, a handler's traceback, when there is one).

    Returns the dead-letter id, or None when the entry was no longer pending for this consumer
    (another consumer claimed or acknowledged it first).
    """
    pairs = _dead_letter_fields(stream, group, consumer, msg_id, fields or {}, reason, error,
                                deliveries, trace)
    keys = [stream, dlq_key(stream)]
    if len(pairs) + 3 <= _SCRIPT_ARGS_MAX:
        script = client.register_script(scripts.DEAD_LETTER)
        args = [group, consumer, msg_id, *pairs]
        result = await call(lambda: script(keys=keys, args=args), stream=stream, group=group)
        return None if result is None else to_str(result)
    # Too many fields for one script call. Renewing the lease checks that the entry is still
    # ours and resets its idle time, so no reclaimer can take it for a visibility timeout;
    # the transaction then writes the dead letter and the XACK together.
    renew = client.register_script(scripts.RENEW_LEASES)
    lost = await call(lambda: renew(keys=[stream], args=[group, consumer, msg_id]),
                      stream=stream, group=group)
    if lost:
        return None

    async def move() -> Any:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(keys[1], dict(zip(pairs[::2], pairs[1::2], strict=True)))
            pipe.xack(stream, group, msg_id)
            return await pipe.execute()

    replies = await call(move, stream=stream, group=group)
    return to_str(replies[0])


@dataclass(slots=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    dlq_id: str
    original_id: str
    original_stream: str
    group: str
    consumer: str
    reason: str
    error: str
    deliveries: int
    dead_at_ms: int
    #: The original entry's fields, exactly as they were (bytes).
    fields: dict[bytes, bytes] = field(default_factory=dict)
    #: The failed handler's traceback (innermost part), "" when there was none.
    traceback: str = ""

    @classmethod
    def from_entry(cls, dlq_id: str, raw: Mapping[bytes, bytes]) -> DeadLetter:
        """Split a dead-letter entry into its metadata and the original fields."""
        meta = {name: to_str(raw.get(name.encode(), b"")) for name in _META_FIELDS}
        original: dict[bytes, bytes] = {}
        for key, value in raw.items():
            if key in _META_BYTES:
                continue
            name = key[len(_COLLISION_PREFIX):] if key.startswith(_COLLISION_PREFIX) else key
            original[name] = value
        return cls(
            dlq_id=dlq_id,
            original_id=meta[DLQ_FIELD_ORIGINAL_ID],
            original_stream=meta[DLQ_FIELD_ORIGINAL_STREAM],
            group=meta[DLQ_FIELD_GROUP],
            consumer=meta[DLQ_FIELD_CONSUMER],
            reason=meta[DLQ_FIELD_REASON],
            error=meta[DLQ_FIELD_ERROR],
            deliveries=int(meta[DLQ_FIELD_DELIVERIES] or 0),
            dead_at_ms=int(meta[DLQ_FIELD_DEAD_AT_MS] or 0),
            traceback=meta[DLQ_FIELD_TRACEBACK],
            fields=original,
        )

    def event(self) -> Event:
        """The original event, decoded (raises MalformedEventError for malformed ones)."""
        return decode_entry(self.original_id, self.fields, stream=self.original_stream,
                            delivery_count=self.deliveries, max_event_bytes=1 << 62)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (original fields decoded as UTF-8 with replacement)."""
        return {
            "dlq_id": self.dlq_id, "original_id": self.original_id,
            "original_stream": self.original_stream, "group": self.group,
            "consumer": self.consumer, "reason": self.reason, "error": self.error,
            "traceback": self.traceback,
            "deliveries": self.deliveries, "dead_at_ms": self.dead_at_ms,
            "fields": {to_str(k): to_str(v) for k, v in self.fields.items()},
        }


class DeadLetterQueue:
    """List, inspect, replay and purge the dead letters of one stream."""

    def __init__(self, client: Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.key = dlq_key(stream)
        self._replay = client.register_script(scripts.REPLAY)

    async def length(self) -> int:
        """How many dead letters there are."""
        return int(await call(lambda: self.client.xlen(self.key), stream=self.key))

    async def list(self, count: int = 100, start: str = "-", end: str = "+",
                   reason: str | None = None) -> builtins.list[DeadLetter]:
        """Up to ``count`` dead letters, oldest first, optionally only one ``reason``."""
        if count <= 0:
            raise InvalidArgumentError("count must be positive")
        out: builtins.list[DeadLetter] = []
        cursor = start
        while len(out) < count:
            raw = await call(lambda c=cursor: self.client.xrange(  # type: ignore[misc]
                self.key, min=c, max=end, count=max(count - len(out), 100)), stream=self.key)
            if not raw:
                break
            for dlq_id, fields in entries_from_read_reply([(self.key, raw)]):
                letter = DeadLetter.from_entry(dlq_id, fields or {})
                if reason is None or letter.reason == reason:
                    out.append(letter)
                    if len(out) >= count:
                        break
            cursor = "(" + to_str(raw[-1][0])
        return out

    async def get(self, dlq_id: str) -> DeadLetter | None:
        """One dead letter by its id in the dead-letter stream."""
        raw = await call(lambda: self.client.xrange(self.key, min=dlq_id, max=dlq_id, count=1),
                         stream=self.key)
        if not raw:
            return None
        entries = entries_from_read_reply([(self.key, raw)])
        return DeadLetter.from_entry(entries[0][0], entries[0][1] or {})

    async def _all(self, where: Callable[[DeadLetter], bool] | None) -> builtins.list[DeadLetter]:
        letters: builtins.list[DeadLetter] = []
        cursor = "-"
        while True:
            batch = await self.list(count=500, start=cursor)
            if not batch:
                return letters
            letters.extend(x for x in batch if where is None or where(x))
            cursor = "(" + batch[-1].dlq_id

    async def replay(
        self, ids: Iterable[str] | None = None, *,
        where: Callable[[DeadLetter], bool] | None = None,
        all_letters: bool = False,
        all_groups: bool = False,
    ) -> builtins.list[tuple[str, str]]:
        """Put dead letters back on this queue's stream (new stream id, same event id).

        Select by ``ids``, by ``where``, or every dead letter with ``all_letters=True`` (never
        by default). A replayed event runs again only in the consumer group where it died
        (the others acknowledge it without running it: they handled it already); with
        ``all_groups=True`` every group gets it again. Returns (dead-letter id, new stream id)
        pairs. Each replay is atomic.
        """
        if ids is None and where is None and not all_letters:
            raise InvalidArgumentError("say which dead letters to replay: ids, where=, or "
                                       "all_letters=True")
        if ids is not None:
            letters = [x for x in [await self.get(i) for i in ids] if x is not None]
            if where is not None:
                letters = [x for x in letters if where(x)]
        else:
            letters = await self._all(where)
        out: builtins.list[tuple[str, str]] = []
        for letter in letters:
            # Always back to this queue's own stream: ``original_stream`` is a field anyone
            # who can write the dead-letter stream controls, so it never picks the target.
            if letter.original_stream and letter.original_stream != self.stream:
                logger.warning("dead letter %s names %r as its stream; replaying it to %r, "
                               "whose dead-letter stream holds it", letter.dlq_id,
                               letter.original_stream, self.stream,
                               extra={"stream": self.stream, "dlq_id": letter.dlq_id})
            target = self.stream
            args: list[Any] = [letter.dlq_id]
            for key, value in letter.fields.items():
                if key != _B_FOR_GROUP:  # a dead letter of a replay: route it afresh
                    args += [key, value]
            if letter.group and not all_groups:
                args += [_B_FOR_GROUP, letter.group.encode()]
            new_id = await call(lambda a=args, t=target: self._replay(  # type: ignore[misc]
                keys=[self.key, t], args=a), stream=self.key)
            if new_id is not None:
                out.append((letter.dlq_id, to_str(new_id)))
        return out

    async def purge(self, ids: Iterable[str] | None = None, *,
                    where: Callable[[DeadLetter], bool] | None = None,
                    all_letters: bool = False) -> int:
        """Delete dead letters by ``ids``, by ``where``, or every one with
        ``all_letters=True`` (never by default); returns how many."""
        if ids is None and where is None:
            if not all_letters:
                raise InvalidArgumentError("say which dead letters to purge: ids, where=, or "
                                           "all_letters=True")
            removed = await call(lambda: self.client.xtrim(self.key, maxlen=0,
                                                           approximate=False), stream=self.key)
            return int(removed)
        selected = list(ids) if ids is not None else [x.dlq_id for x in await self._all(where)]
        if ids is not None and where is not None:
            letters = [await self.get(i) for i in selected]
            selected = [x.dlq_id for x in letters if x is not None and where(x)]
        if not selected:
            return 0
        return int(await call(lambda: self.client.xdel(self.key, *selected), stream=self.key))

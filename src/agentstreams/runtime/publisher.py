"""Publishing: single events, batches in one round trip, and idempotent publishes.

Concurrent ``publish`` calls on one ``Publisher`` are coalesced: while one round trip is in
flight, what arrives waits and goes out together in the next one (one script call, the batch as
one JSON argument). An idle publisher sends at once, so coalescing adds no latency, and a
sequential caller always takes the plain XADD path. Every path writes the same entry.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.exceptions as redis_exc

from agentstreams.codec import encode_event, encode_event_text, entry_to_pairs
from agentstreams.connection import Redis, translate_error
from agentstreams.constants import DEFAULT_IDEMPOTENCY_WINDOW_S, DEFAULT_MAX_EVENT_BYTES
from agentstreams.errors import InvalidArgumentError, PublishTimeoutError
from agentstreams.events import EventType
from agentstreams.observe import get_observer
from agentstreams.runtime import scripts
from agentstreams.runtime.streams import idempotency_key_name, to_str
from agentstreams.tracing import current_trace_headers

__all__ = ["Publisher", "StreamCap"]

#: Largest batch sent in one script call; bigger batches are split.
MAX_BATCH = 1000

#: ``[(k, v), ...]`` -> ``k, v, ...`` at C speed (the plain XADD path is latency-critical).
_flatten = itertools.chain.from_iterable


@dataclass(frozen=True, slots=True)
class StreamCap:
    """How publishing bounds the stream: approximate MAXLEN, or MINID by age.

    A cap applied at publish time is a hard cap: it can remove entries no group has
    acknowledged yet. Prefer ``trim`` (safe) for retention, and use a cap well above the
    expected backlog as a memory guard.
    """

    kind: Literal["maxlen", "minid"] = "maxlen"
    #: For maxlen: entries to keep. For minid: age in milliseconds to keep.
    value: int = 100_000
    approximate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("maxlen", "minid"):
            raise InvalidArgumentError("StreamCap.kind must be 'maxlen' or 'minid'")
        if not isinstance(self.value, int) or self.value < 0:
            raise InvalidArgumentError("StreamCap.value must be an integer >= 0")

    def args(self) -> list[str | int]:
        """XADD arguments implementing the cap."""
        op = "~" if self.approximate else "="
        if self.kind == "maxlen":
            return ["MAXLEN", op, self.value]
        return ["MINID", op, f"{max(0, int(time.time() * 1000) - self.value)}-0"]


class Publisher:
    """Writes events to one stream. Cheap to create; shares the client it is given."""

    def __init__(
        self,
        client: Redis,
        stream: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        cap: StreamCap | None = None,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        coalesce: bool = True,
    ) -> None:
        if not isinstance(max_event_bytes, int) or max_event_bytes <= 0:
            raise InvalidArgumentError("max_event_bytes must be a positive integer")
        if idempotency_window_s <= 0:
            raise InvalidArgumentError("idempotency_window_s must be positive")
        self.client = client
        self.stream = stream
        self.max_event_bytes = max_event_bytes
        self.cap = cap
        self.idempotency_window_s = idempotency_window_s
        self._cap_args: list[str | int] = cap.args() if cap and cap.kind == "maxlen" else []
        self._idempotent = client.register_script(scripts.IDEMPOTENT_XADD)
        self._batch = client.register_script(scripts.BATCH_XADD)
        self._batch_json = client.register_script(scripts.BATCH_XADD_JSON)
        #: Coalesce concurrent ``publish`` calls into one round trip (see the module docstring).
        self.coalesce = coalesce
        #: True while a round trip of this publisher's (a plain XADD or a flush) is in flight.
        self._busy = False
        #: Events that arrived while busy: (fields as text, the caller's future).
        self._waiting: list[tuple[list[str], asyncio.Future[str]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _current_cap_args(self) -> list[str | int]:
        if self.cap is None:
            return []
        return self._cap_args if self.cap.kind == "maxlen" else self.cap.args()

    def _fail(self, exc: BaseException) -> BaseException:
        if isinstance(exc, redis_exc.TimeoutError):
            return PublishTimeoutError(
                "no reply to a publish: it may or may not have been written; retry with the "
                "same idempotency_key to publish exactly once", stream=self.stream)
        return translate_error(exc, stream=self.stream)

    def encode(self, event_type: str | EventType, fields: Mapping[str, Any],
               **kwargs: Any) -> dict[bytes, bytes]:
        """Encode (and validate) without sending."""
        return encode_event(event_type, fields, max_event_bytes=self.max_event_bytes,
                            stream=self.stream, **kwargs)

    async def publish(
        self,
        event_type: str | EventType,
        fields: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        event_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> str:
        """Append one event; returns its stream id.

        With ``idempotency_key``, a second publish with the same key within the window returns
        the first id and writes nothing.
        """
        if traceparent is None:
            traceparent, tracestate = current_trace_headers()
        if idempotency_key is None and self._busy and self.coalesce:
            return await self._publish_coalesced(event_type, fields, event_id, traceparent,
                                                 tracestate)
        entry = encode_event(event_type, fields, event_id=event_id,
                             max_event_bytes=self.max_event_bytes, traceparent=traceparent,
                             tracestate=tracestate, stream=self.stream)
        if idempotency_key is not None:
            return await self._publish_idempotent(entry, idempotency_key)
        self._busy = True
        try:
            msg_id = await self.client.execute_command(  # type: ignore[no-untyped-call]
                "XADD", self.stream, *(self._cap_args if self.cap is None
                                       or self.cap.kind == "maxlen" else self.cap.args()),
                "*", *_flatten(entry.items()))
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        finally:
            self._busy = False
            if self._waiting:
                self._start_flusher()
        get_observer().on_published(self.stream, 1)
        return to_str(msg_id)

    async def _publish_coalesced(self, event_type: str | EventType, fields: Mapping[str, Any],
                                 event_id: str | None, traceparent: str | None,
                                 tracestate: str | None) -> str:
        """Queue one event for the next round trip and wait for its id."""
        text = encode_event_text(event_type, fields, event_id=event_id,
                                 max_event_bytes=self.max_event_bytes, traceparent=traceparent,
                                 tracestate=tracestate, stream=self.stream)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if not self._busy:  # the round trip we queued behind ended meanwhile
            self._start_flusher()
        return await future

    def _start_flusher(self) -> None:
        self._busy = True
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_waiting(), name=f"agentstreams-publish-{self.stream}")

    async def _flush_waiting(self) -> None:
        """Send what waits, MAX_BATCH per round trip, until nothing does; then go idle.

        After a round trip the callers it answered usually publish again at once: one loop
        iteration's grace lets them queue here instead of each starting a plain XADD.
        """
        try:
            while True:
                if not self._waiting:
                    await asyncio.sleep(0)
                    if not self._waiting:
                        break
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                try:
                    ids = await self._send_text_batch([text for text, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(self._fail(exc))
                    continue
                for (_, future), msg_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(msg_id)
        except asyncio.CancelledError:
            for _, future in self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._busy = False
            self._flusher = None

    async def _send_text_batch(self, entries: Sequence[list[str]]) -> list[str]:
        """One script call writing ``entries`` (text pairs) in order; returns their ids."""
        args: list[Any] = [orjson.dumps(entries), *self._current_cap_args()]
        try:
            reply = await self._batch_json(keys=[self.stream], args=args)
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        get_observer().on_published(self.stream, len(entries))
        return [to_str(x) for x in reply]

    async def _publish_idempotent(self, entry: dict[bytes, bytes], key: str) -> str:
        if not isinstance(key, str) or not key or len(key) > 256:
            raise InvalidArgumentError("idempotency_key must be a non-empty string of at most "
                                       "256 characters")
        cap = self._current_cap_args()
        args: list[Any] = [int(self.idempotency_window_s * 1000), len(cap), *cap,
                           *entry_to_pairs(entry)]
        try:
            reply = await self._idempotent(
                keys=[self.stream, idempotency_key_name(self.stream, key)], args=args)
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        if reply[0] == 1:
            get_observer().on_published(self.stream, 1)
        return to_str(reply[1])

    async def publish_many(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Append many events in one round trip (per 1,000); returns their ids in order.

        Each mapping holds a ``type`` and the event's fields. Everything is validated before
        anything is sent, so one bad event publishes nothing.
        """
        if isinstance(events, Mapping | str | bytes):
            raise InvalidArgumentError("publish_many takes a list of event mappings")
        encoded: list[list[str]] = []
        traceparent, tracestate = current_trace_headers()
        max_event_bytes = self.max_event_bytes
        for index, event in enumerate(events):
            if not isinstance(event, Mapping):
                raise InvalidArgumentError(f"event #{index} is a {type(event).__name__}, "
                                           "not a mapping")
            if "type" not in event:
                raise InvalidArgumentError(f"event #{index} has no 'type'")
            encoded.append(encode_event_text(
                event["type"], event, max_event_bytes=max_event_bytes, traceparent=traceparent,
                tracestate=tracestate, stream=self.stream, type_in_fields=True))
        ids: list[str] = []
        for start in range(0, len(encoded), MAX_BATCH):
            ids.extend(await self._send_text_batch(encoded[start:start + MAX_BATCH]))
        return ids

    async def publish_encoded(self, entries: Sequence[Mapping[bytes, bytes]]) -> list[str]:
        """Send already-encoded entries in as few script calls as possible."""
        ids: list[str] = []
        cap = self._current_cap_args()
        for start in range(0, len(entries), MAX_BATCH):
            args: list[Any] = [len(cap), *cap]
            for entry in entries[start:start + MAX_BATCH]:
                args.append(len(entry) * 2)
                args.extend(entry_to_pairs(entry))
            try:
                reply = await self._batch(keys=[self.stream], args=args)
            except (redis_exc.RedisError, OSError) as exc:
                raise self._fail(exc) from exc
            ids.extend(to_str(x) for x in reply)
        get_observer().on_published(self.stream, len(entries))
        return ids

"""Publishing: single events, batches in one round trip, and idempotent publishes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.exceptions as redis_exc

from agentstreams.codec import encode_event, entry_to_pairs
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
        entry = self.encode(event_type, fields, event_id=event_id, traceparent=traceparent,
                            tracestate=tracestate)
        if idempotency_key is not None:
            return await self._publish_idempotent(entry, idempotency_key)
        try:
            msg_id = await self.client.execute_command(  # type: ignore[no-untyped-call]
                "XADD", self.stream, *self._current_cap_args(), "*", *entry_to_pairs(entry))
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        get_observer().on_published(self.stream, 1)
        return to_str(msg_id)

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
        encoded: list[dict[bytes, bytes]] = []
        traceparent, tracestate = current_trace_headers()
        for index, event in enumerate(events):
            if not isinstance(event, Mapping):
                raise InvalidArgumentError(f"event #{index} is a {type(event).__name__}, "
                                           "not a mapping")
            if "type" not in event:
                raise InvalidArgumentError(f"event #{index} has no 'type'")
            fields = {k: v for k, v in event.items() if k != "type"}
            encoded.append(self.encode(event["type"], fields, traceparent=traceparent,
                                       tracestate=tracestate))
        return await self.publish_encoded(encoded)

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

"""``AgentCoordinator``: the reference API, unchanged, on top of the reliable runtime.

A program written against the reference runs after changing only its import. What changes
underneath: values keep their types, a restarted consumer finishes its own pending entries,
claimed events can be acknowledged, filtered subscriptions steal nothing, trimming is safe,
and a lost connection is retried instead of ending the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any, Unpack

import redis.exceptions as redis_exc

from agentstreams._connection import (
    Backoff,
    ConnectionSettings,
    Redis,
    TLSKwargs,
    call,
    create_client,
    translate_error,
)
from agentstreams._constants import (
    B_FIELD_REPLY_TO,
    DEFAULT_BLOCK_MS,
    DEFAULT_CLAIM_MIN_IDLE_MS,
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    REPLY_BLOCK_MS,
    SOCKET_TIMEOUT_MARGIN_S,
)
from agentstreams._dlq import DeadLetterQueue
from agentstreams._events import Event, EventType
from agentstreams._intake import Intake
from agentstreams._observe import get_observer
from agentstreams._publisher import Publisher, StreamCap
from agentstreams._reply import (
    ReplySender,
    Requester,
    RequestStats,
    add_reply_keys,
    check_reply_id,
    reply_target_from_mapping,
)
from agentstreams._retention import trim
from agentstreams._signing import SigningKeys, signing_keys_from
from agentstreams._streams import (
    RawEntry,
    ack,
    ensure_group,
    first_field,
    to_str,
    validate_name,
)
from agentstreams.errors import (
    BackpressureError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
)

__all__ = ["AgentCoordinator"]

logger = logging.getLogger("agentstreams.coordinator")

#: Entries fetched per XREADGROUP in subscribe, as the reference did: a caller that stops early
#: leaves at most this many read-ahead entries pending on its consumer.
SUBSCRIBE_READ_COUNT = 10


def _check_int(name: str, value: object, *, minimum: int = 0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _max_block_ms(socket_timeout_s: float) -> int:
    """Longest BLOCK that returns well before a socket with this timeout gives up."""
    if socket_timeout_s > SOCKET_TIMEOUT_MARGIN_S + 1:
        return int(max(1.0, socket_timeout_s - SOCKET_TIMEOUT_MARGIN_S) * 1000)
    return max(1, int(socket_timeout_s * 500))


def _raise_if_cancel_was_swallowed() -> None:
    """Stop a loop whose task was cancelled even if the CancelledError got lost.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py uses to send every command) drops a
    cancellation that arrives just as the send completes; the loop would then run on forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _decode_reply(value: Any) -> Any:
    """bytes -> str throughout a reply (what a decode_responses client would return)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {_decode_reply(k): _decode_reply(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_decode_reply(v) for v in value)
    return value


class AgentCoordinator:
    """Streams-based coordination for distributed agents (reference-compatible API).

    ``redis_url`` may also be an existing ``redis.asyncio.Redis`` client (it is not closed by
    ``close()``). Use ``async with AgentCoordinator(...) as c:`` to initialize and close.

    ``signing_keys`` (key id -> secret, ordered; the first signs, all verify): every publish
    is signed, and ``subscribe`` / ``claim_abandoned_messages`` dead-letter, as
    ``unauthenticated``, every entry whose signature does not verify (unsigned ones included).
    Requests and replies are signed too; a reply that does not verify never resolves a request.

    ``caller_id`` names this coordinator's reply stream for ``request()``,
    ``{stream}:replies:<caller_id>`` (1-64 letters, digits, ``_``, ``.``, ``-``; unique among
    live coordinators: random by default).
    """

    def __init__(
        self,
        redis_url: str | Redis = "redis://localhost:6379",
        stream_name: str = "agent_events",
        consumer_group: str | None = None,
        consumer_name: str | None = None,
        *,
        client: Redis | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        cap: StreamCap | None = None,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        signing_keys: SigningKeys | Mapping[str, bytes | str] | None = None,
        caller_id: str | None = None,
        **tls: Unpack[TLSKwargs],
    ) -> None:
        self._stream_name = validate_name("stream_name", stream_name)
        self._caller_id = (check_reply_id("caller_id", caller_id) if caller_id is not None
                           else uuid.uuid4().hex[:16])
        self._consumer_group = (validate_name("consumer_group", consumer_group)
                                if consumer_group is not None else None)
        if consumer_name is not None:
            validate_name("consumer_name", consumer_name)
        self._consumer_name = consumer_name or (
            f"consumer_{uuid.uuid4().hex[:8]}" if consumer_group else None
        )
        _check_int("max_deliveries", max_deliveries, minimum=1)
        _check_int("max_event_bytes", max_event_bytes, minimum=1)
        if isinstance(redis_url, Redis):
            client, redis_url = redis_url, ""
        self._settings: ConnectionSettings | None = None
        if client is None:
            self._settings = ConnectionSettings(url=redis_url, socket_timeout_s=socket_timeout_s,
                                                **tls)
        self._external_client = client
        self._client: Redis | None = None
        self._initialized = False
        self._max_event_bytes = max_event_bytes
        self._max_deliveries = max_deliveries
        self._cap = cap
        self._idempotency_window_s = idempotency_window_s
        #: With keys, every publish is signed and every read entry verified before decoding
        self._signing_keys = signing_keys_from(signing_keys)
        self._publisher: Publisher | None = None
        self._derived_groups: set[str] = set()
        # A blocking read must return before the socket times out.
        self._max_block_ms = _max_block_ms(socket_timeout_s)
        #: request/reply: the caller side (one reply reader) and the replier side, made on use
        self._requester: Requester | None = None
        self._reply_sender: ReplySender | None = None
        self._request_stats = RequestStats()

    # ---------------------------------------------------------------- lifecycle

    @property
    def stream_name(self) -> str:
        """The stream this coordinator publishes to and reads from."""
        return self._stream_name

    @property
    def consumer_group(self) -> str | None:
        """The consumer group (None for a publish-only coordinator)."""
        return self._consumer_group

    @property
    def consumer_name(self) -> str | None:
        """This consumer's name in the group."""
        return self._consumer_name

    async def initialize(self) -> None:
        """Connect and create the consumer group (with its stream) if needed. Idempotent."""
        if self._initialized:
            return
        if self._client is None:
            if self._external_client is not None:
                self._client = self._external_client
                # Block for less than the caller's client waits for a reply, or every idle read
                # would end in a timeout (and a bounded subscribe would never finish).
                client_timeout = self._client.connection_pool.connection_kwargs.get(
                    "socket_timeout")
                if isinstance(client_timeout, int | float) and client_timeout > 0:
                    self._max_block_ms = min(self._max_block_ms,
                                             _max_block_ms(float(client_timeout)))
            else:
                assert self._settings is not None
                self._client = create_client(self._settings)
        client = self._client
        if self._consumer_group:
            group = self._consumer_group
            await call(lambda: ensure_group(client, self._stream_name, group, "0"),
                       stream=self._stream_name, group=group)
        self._publisher = Publisher(client, self._stream_name,
                                    max_event_bytes=self._max_event_bytes, cap=self._cap,
                                    idempotency_window_s=self._idempotency_window_s,
                                    signing_keys=self._signing_keys)
        self._initialized = True

    async def _get_client(self) -> Redis:
        if not self._initialized or self._client is None:
            await self.initialize()
        assert self._client is not None
        return self._client

    async def _get_publisher(self) -> Publisher:
        if not self._initialized or self._publisher is None:
            await self.initialize()
        assert self._publisher is not None
        return self._publisher

    async def close(self) -> None:
        """Close the connection (a client passed in by the caller is left open). Idempotent.

        Requests still waiting for their reply raise ``ClosedError``."""
        requester, self._requester = self._requester, None
        if requester is not None:
            await requester.close()  # stops the reply reader, fails the waiting requests
        self._reply_sender = None
        if self._client is not None and self._client is not self._external_client:
            await self._client.aclose()
        self._client = None
        self._publisher = None
        self._initialized = False

    async def __aenter__(self) -> AgentCoordinator:
        await self.initialize()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---------------------------------------------------------------- publishing

    async def publish(self, event_type: str | EventType, fields: Mapping[str, Any] | None = None,
                      *, idempotency_key: str | None = None) -> str:
        """Publish any event type with any JSON-representable fields; returns the stream id."""
        publisher = self._publisher if self._initialized else None
        if publisher is None:
            publisher = await self._get_publisher()
        return await publisher.publish(event_type, fields or {}, idempotency_key=idempotency_key)

    async def publish_many(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Publish a list of ``{"type": ..., **fields}`` mappings in one round trip."""
        publisher = await self._get_publisher()
        return await publisher.publish_many(events)

    async def publish_handoff_ready(self, from_agent: str, to_agent: str, session_id: str,
                                    context: dict[str, Any], *,
                                    idempotency_key: str | None = None) -> str:
        """Notify the target agent that a handoff is ready."""
        return await self.publish(EventType.HANDOFF_READY, {
            "from_agent": from_agent, "to_agent": to_agent, "session_id": session_id,
            "context": context, "timestamp": time.time(),
        }, idempotency_key=idempotency_key)

    async def publish_tool_result(self, tool_name: str, session_id: str, result: Any,
                                  execution_time_ms: float, *,
                                  idempotency_key: str | None = None) -> str:
        """Broadcast a tool's result to every interested consumer."""
        return await self.publish(EventType.TOOL_RESULT, {
            "tool_name": tool_name, "session_id": session_id, "result": result,
            "execution_time_ms": execution_time_ms, "timestamp": time.time(),
        }, idempotency_key=idempotency_key)

    async def publish_state_changed(self, session_id: str, changes: dict[str, Any], *,
                                    idempotency_key: str | None = None) -> str:
        """Announce changes to a session's state."""
        return await self.publish(EventType.STATE_CHANGED, {
            "session_id": session_id, "changes": changes, "timestamp": time.time(),
        }, idempotency_key=idempotency_key)

    async def publish_agent_started(self, agent_name: str, session_id: str, input_summary: str,
                                    *, idempotency_key: str | None = None) -> str:
        """Announce that an agent started working on a session."""
        return await self.publish(EventType.AGENT_STARTED, {
            "agent_name": agent_name, "session_id": session_id,
            "input_summary": input_summary, "timestamp": time.time(),
        }, idempotency_key=idempotency_key)

    async def publish_agent_completed(self, agent_name: str, session_id: str,
                                      output_summary: str, duration_ms: float, tokens_used: int,
                                      *, idempotency_key: str | None = None) -> str:
        """Announce that an agent finished, with its duration and token use."""
        return await self.publish(EventType.AGENT_COMPLETED, {
            "agent_name": agent_name, "session_id": session_id,
            "output_summary": output_summary, "duration_ms": duration_ms,
            "tokens_used": tokens_used, "timestamp": time.time(),
        }, idempotency_key=idempotency_key)

    async def publish_error(self, session_id: str, error_type: str, error_message: str,
                            agent_name: str | None = None, *,
                            idempotency_key: str | None = None) -> str:
        """Publish an error event (``agent_name`` is omitted when None, as in the reference)."""
        fields: dict[str, Any] = {
            "session_id": session_id, "error_type": error_type, "error_message": error_message,
        }
        if agent_name is not None:
            fields["agent_name"] = agent_name
        fields["timestamp"] = time.time()
        return await self.publish(EventType.ERROR, fields, idempotency_key=idempotency_key)

    # ---------------------------------------------------------------- consuming

    def _require_group(self, action: str) -> tuple[str, str]:
        if not self._consumer_group:
            raise InvalidArgumentError(f"Consumer group required for {action}: pass "
                                       "consumer_group= to AgentCoordinator")
        assert self._consumer_name is not None
        return self._consumer_group, self._consumer_name

    async def _filter_group(self, client: Redis, group: str, event_types: Sequence[str]) -> str:
        """The derived group a filtered subscription reads through (created on first use).

        A consumer group hands each entry to one consumer; a filter that acknowledged and
        dropped the other types there would steal them from the consumers that want them. So
        a filtered subscription reads through its own group, ``<group>:types:<t1,t2>``, which
        starts where the parent group stands.
        """
        derived = f"{group}:types:{','.join(sorted(set(event_types)))}"
        if derived in self._derived_groups:
            return derived
        start = "0"
        groups = await call(lambda: client.xinfo_groups(self._stream_name),
                            stream=self._stream_name)
        for info in groups:
            if to_str(first_field(info, "name")) == group:
                start = to_str(first_field(info, "last-delivered-id")) or "0"
        await call(lambda: ensure_group(client, self._stream_name, derived, start),
                   stream=self._stream_name, group=derived)
        self._derived_groups.add(derived)
        return derived

    def _log_extra(self, group: str, **more: Any) -> dict[str, Any]:
        return {"stream": self._stream_name, "group": group, "consumer": self._consumer_name,
                **more}

    def _intake(self, client: Redis, group: str) -> Intake:
        assert self._consumer_name is not None
        return Intake(client, self._stream_name, group, self._consumer_name,
                      max_deliveries=self._max_deliveries, max_event_bytes=self._max_event_bytes,
                      signing_keys=self._signing_keys)

    async def subscribe(
        self,
        event_types: list[str] | None = None,
        timeout_ms: int = DEFAULT_BLOCK_MS,
        max_events: int | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield events as dicts carrying ``_msg_id``; each is acknowledged when you ask for
        the next one, or when the loop ends by ``max_events`` or ``timeout_ms``.

        Leaving the loop on an event (``break``, ``return``, an exception) leaves that event
        pending: it comes back first to this consumer (a crash does the same; nothing is
        lost). Done with it? ``await coordinator.ack(event["_msg_id"])`` before leaving.

        This consumer's own pending entries (from before a restart) come first. ``max_events``
        of 0 yields nothing, None means no limit; with a limit, the loop also ends after
        ``timeout_ms`` without events (0 = wait indefinitely). A lost connection is retried
        with backoff. Unreadable entries go to the dead-letter stream.
        """
        group, _ = self._require_group("subscription")
        _check_int("timeout_ms", timeout_ms)
        _check_int("max_events", max_events, allow_none=True)
        if event_types is not None:
            if isinstance(event_types, str | bytes) or not all(  # type: ignore[unreachable]
                    isinstance(t, str) and t for t in event_types):
                raise InvalidArgumentError("event_types must be a list of event type strings")
            event_types = [t.value if isinstance(t, EventType) else t for t in event_types]
        if max_events == 0:
            return
        wanted = frozenset(event_types) if event_types else None
        client = await self._get_client()
        if wanted:
            group = await self._filter_group(client, group, sorted(wanted))
        intake = self._intake(client, group)
        yielded = 0
        backoff = Backoff()
        # A bounded subscription ends when the server stays unreachable for its timeout too.
        outage_limit_s = timeout_ms / 1000 if max_events is not None and timeout_ms else None
        last_contact = time.monotonic()
        while True:
            _raise_if_cancel_was_swallowed()
            # Never read more than the caller will take: read-ahead beyond max_events would be
            # left pending for this consumer when the loop ends.
            read_count = SUBSCRIBE_READ_COUNT if max_events is None \
                else min(SUBSCRIBE_READ_COUNT, max_events - yielded)
            try:
                if intake.reading_pending:
                    entries, counts = await intake.read(read_count, None)
                    if not entries:
                        continue
                else:
                    entries = await self._blocking_read(intake, timeout_ms, read_count)
                    counts = None
                    if not entries:
                        if max_events is not None:
                            return
                        continue
                backoff.reset()
                last_contact = time.monotonic()
            except (GroupNotFoundError, ConnectionLostError, BackpressureError) as exc:
                if isinstance(exc, ConnectionLostError):
                    get_observer().on_reconnect(self._stream_name, group)
                down_s = time.monotonic() - last_contact
                if outage_limit_s is not None and down_s >= outage_limit_s:
                    raise ConnectionLostError(
                        f"the server stayed unreachable for {down_s:.1f}s, longer than this "
                        f"subscription's timeout ({exc})", stream=self._stream_name,
                        group=group) from exc
                delay = backoff.next_delay()
                if outage_limit_s is not None:
                    delay = min(delay, max(0.0, outage_limit_s - down_s))
                logger.warning("subscribe: %s; retrying in %.2fs", exc, delay,
                               extra=self._log_extra(group))
                await asyncio.sleep(delay)
                if isinstance(exc, GroupNotFoundError):
                    with contextlib.suppress(ConnectionLostError, BackpressureError):
                        await intake.recreate_group()
                intake.restart_pending()  # a lost reply may have left entries pending for us
                continue
            batch = intake.sort(entries, counts)
            if batch.settle:
                await ack(client, self._stream_name, group, batch.settle)
            await intake.dead_letter_all(batch.dead)
            for event, fields in zip(batch.events, batch.fields, strict=True):
                _raise_if_cancel_was_swallowed()
                if wanted is not None and event.type not in wanted:
                    await ack(client, self._stream_name, group, [event.msg_id])
                    continue
                item = event.to_dict()
                if B_FIELD_REPLY_TO in fields:  # a request: reply() needs its metadata
                    add_reply_keys(item, fields)
                try:
                    yield item
                except GeneratorExit:
                    # The loop was left on this event (break, return, an exception): it stays
                    # pending. Acknowledging here could lose an event whose processing failed;
                    # a caller that is done with it says so with ack() before leaving.
                    logger.info("subscription left on %s before asking for the next event: it "
                                "stays pending and comes back first to %r (ack() it before "
                                "leaving if it is done)", event.msg_id, self._consumer_name,
                                extra=self._log_extra(group, msg_id=event.msg_id))
                    raise
                await self._ack_with_retry(client, group, event.msg_id)
                yielded += 1
                if max_events is not None and yielded >= max_events:
                    return

    async def _blocking_read(self, intake: Intake, timeout_ms: int,
                             count: int) -> list[RawEntry]:
        """New entries, blocking up to ``timeout_ms`` in slices shorter than the socket
        timeout (0 = indefinitely), so a half-open connection is noticed."""
        deadline = None if timeout_ms == 0 else time.monotonic() + timeout_ms / 1000
        while True:
            _raise_if_cancel_was_swallowed()
            if deadline is None:
                block = self._max_block_ms
            else:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    return []
                block = min(remaining_ms, self._max_block_ms)
            entries, _ = await intake.read(count, block)
            if entries:
                return entries

    async def _ack_with_retry(self, client: Redis, group: str, msg_id: str) -> None:
        backoff = Backoff()
        for _attempt in range(5):
            try:
                await ack(client, self._stream_name, group, [msg_id])
                get_observer().on_acked(self._stream_name, group, 1)
                return
            except ConnectionLostError:
                await asyncio.sleep(backoff.next_delay())
        logger.warning("could not acknowledge %s; it stays pending and will be redelivered",
                       msg_id, extra=self._log_extra(group, msg_id=msg_id))

    async def ack(self, *msg_ids: str) -> int:
        """Acknowledge events by ``_msg_id``; returns how many were still pending."""
        group, _ = self._require_group("acknowledging")
        for msg_id in msg_ids:
            if not isinstance(msg_id, str) or not msg_id:
                raise InvalidArgumentError(f"message ids must be non-empty strings, got "
                                           f"{msg_id!r}")
        client = await self._get_client()
        return await ack(client, self._stream_name, group, list(msg_ids))

    async def claim_abandoned_messages(
        self, min_idle_ms: int = DEFAULT_CLAIM_MIN_IDLE_MS,
    ) -> list[dict[str, Any]]:
        """Claim every entry other consumers have held for ``min_idle_ms`` or more.

        The returned events carry ``_msg_id`` and ``_delivery_count``; acknowledge them with
        ``ack()`` once handled. Entries delivered more than ``max_deliveries`` times go to the
        dead-letter stream instead; entries trimmed while pending are logged and skipped.
        """
        group, _ = self._require_group("claiming")
        _check_int("min_idle_ms", min_idle_ms)
        client = await self._get_client()
        intake = self._intake(client, group)
        claimed, counts = await intake.claim_idle(min_idle_ms)
        batch = intake.sort(claimed, counts)
        await intake.dead_letter_all(batch.dead)
        out = []
        for event, fields in zip(batch.events, batch.fields, strict=True):
            item = event.to_dict(with_delivery_count=True)
            if B_FIELD_REPLY_TO in fields:
                add_reply_keys(item, fields)
            out.append(item)
        return out

    # ---------------------------------------------------------------- request/reply

    @property
    def caller_id(self) -> str:
        """Names this coordinator's reply stream, ``{stream}:replies:<caller_id>``."""
        return self._caller_id

    @property
    def request_stats(self) -> RequestStats:
        """Counters of ``request()``: requests, replies, timeouts, and the replies ignored
        (late or duplicate, malformed, unauthenticated)."""
        return self._request_stats

    async def request(self, event_type: str | EventType, fields: Mapping[str, Any] | None = None,
                      *, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                      session_id: str | None = None) -> dict[str, Any]:
        """Publish a request and wait for its reply; returns the reply's fields (with its
        ``timestamp``).

        A ``Worker`` handler answers with ``await event.reply(fields)``, a ``subscribe`` user
        with ``await coordinator.reply(event, fields)``. Raises ``RequestTimeoutError`` after
        ``timeout_s`` without a reply (a later reply is ignored), ``ClosedError`` when the
        coordinator is closed meanwhile. ``session_id`` is added to the fields when given.
        """
        requester = self._requester
        if requester is None:
            client = await self._get_client()
            publisher = await self._get_publisher()
            requester = self._requester = Requester(
                client, self._stream_name, self._caller_id, signing_keys=self._signing_keys,
                max_event_bytes=self._max_event_bytes, cap=self._cap,
                publish_timeout_s=publisher.timeout_s,
                block_ms=min(REPLY_BLOCK_MS, self._max_block_ms))
            requester.stats = self._request_stats
        return await requester.request(event_type, fields if fields is not None else {},
                                       timeout_s=timeout_s, session_id=session_id)

    async def reply(self, event: Mapping[str, Any], fields: Mapping[str, Any] | None = None
                    ) -> str:
        """Answer a request yielded by ``subscribe`` (or ``claim_abandoned_messages``).

        ``event`` is the dict as yielded (it carries ``_reply_to`` and ``_request_id``). The
        reply goes to ``{stream}:replies:<caller>`` of THIS coordinator's stream, whatever the
        dict says; one reply entry is written per request however often this is called.
        Returns the reply's stream id. Raises ``InvalidArgumentError`` for an event that is
        not a request.
        """
        if isinstance(event, Event):
            return await event.reply(fields)
        target = reply_target_from_mapping(event)
        sender = self._reply_sender
        if sender is None:
            client = await self._get_client()
            sender = self._reply_sender = ReplySender(
                client, self._stream_name, signing_keys=self._signing_keys,
                max_event_bytes=self._max_event_bytes)
        return await sender.send(target, fields if fields is not None else {})

    # ---------------------------------------------------------------- inspection and retention

    @property
    def dead_letters(self) -> DeadLetterQueue:
        """The dead-letter stream of this coordinator's stream (call after initialize())."""
        if self._client is None:
            raise InvalidArgumentError("call initialize() first")
        return DeadLetterQueue(self._client, self._stream_name)

    async def get_stream_info(self) -> dict[str, Any]:
        """Stream statistics: length, first and last entry, groups (and dead-letter count)."""
        client = await self._get_client()
        try:
            info = await client.xinfo_stream(self._stream_name)
        except redis_exc.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return {"length": 0, "groups": []}  # no stream (yet): the reference's answer
            raise translate_error(exc, stream=self._stream_name) from exc
        except (redis_exc.RedisError, OSError) as exc:
            raise translate_error(exc, stream=self._stream_name) from exc
        groups = await call(lambda: client.xinfo_groups(self._stream_name),
                            stream=self._stream_name)
        dead = await DeadLetterQueue(client, self._stream_name).length()
        return {
            "length": int(info.get("length", 0)),
            "first_entry": _decode_reply(info.get("first-entry")),
            "last_entry": _decode_reply(info.get("last-entry")),
            "groups": _decode_reply(groups),
            "dead_letters": dead,
        }

    async def trim_stream(self, max_length: int, approximate: bool = True, *,
                          force: bool = False) -> int:
        """Trim towards ``max_length`` entries; returns how many were removed.

        Entries some consumer group has not yet acknowledged are kept, so the stream may stay
        longer than ``max_length``. ``force=True`` trims regardless (a hard cap).
        """
        client = await self._get_client()
        result = await trim(client, self._stream_name, max_length, approximate=approximate,
                            force=force)
        if result.limited_by_groups:
            age = (f", {result.held_age_ms / 1000:.0f} s old" if result.held_age_ms is not None
                   else "")
            what = ("has an unacknowledged entry" if result.held_reason == "pending"
                    else "has not read past")
            # WARNING: a group nobody reads (a parent group left behind by filtered
            # subscriptions, a retired service) silently keeps the whole stream otherwise.
            logger.warning("trim of %r stopped at %s: group %r %s %s%s; it keeps every entry "
                           "after that (remove the group if nobody reads it: XGROUP DESTROY)",
                           self._stream_name, result.floor_id, result.held_by, what,
                           result.held_since_id, age,
                           extra={"stream": self._stream_name, "floor_id": result.floor_id,
                                  "group": result.held_by})
        return result.removed

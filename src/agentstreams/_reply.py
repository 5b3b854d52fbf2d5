"""Request/reply over streams: ``AgentCoordinator.request`` and ``Event.reply``.

A request is an ordinary event of the coordinator's stream with two more metadata fields::

    _rto    3f9a0c1d2e4b5a69        the caller id (whose reply stream to answer on)
    _rid    9f0c...                 the request id

The replier never writes to a key a message names. It derives the reply stream from its OWN
stream and the caller id, ``{stream}:replies:<caller id>`` (``side_key``: the stream's hash
slot), after checking both ids are 1-64 characters among letters, digits, ``_``, ``.`` and
``-``. A forged request can therefore only make a worker write under its own stream's
``replies:`` keys: the reply stream and the reply's idempotency key
``{stream}:replies:<caller id>:idem:<request id>``.

The reply is an event of type ``reply`` whose event id (``_eid``) is the request id, written
with an idempotent publish keyed by the request id: a redelivered request answered twice
writes one entry. Each reply sets a TTL (``DEFAULT_REPLY_TTL_S``) on its reply stream, so the
stream of a caller that went away expires. With ``signing_keys``, the request and the reply
are signed like every other entry, each for the stream it is written to, and the caller drops
a reply whose signature does not verify (``StreamVerifier``, the one intake uses).

The caller runs one background reader per coordinator: XREAD on its reply stream with a short
block, dispatching each reply to the waiting request by request id and deleting what it read.
A reply nobody waits for (timed out, answered twice, cancelled) is ignored and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis.exceptions as redis_exc

from agentstreams._codec import decode_entry, encode_event_resp, new_event_id
from agentstreams._connection import Backoff, Redis, call, translate_error
from agentstreams._constants import (
    B_FIELD_REPLY_TO,
    B_FIELD_REQUEST_ID,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_REPLY_TTL_S,
    FIELD_REPLY_TO,
    FIELD_REQUEST_ID,
    KEY_MSG_ID,
    KEY_REPLY_TO,
    KEY_REQUEST_ID,
    REPLIES_SUFFIX,
    REPLY_BLOCK_MS,
    REPLY_EVENT_TYPE,
    REPLY_ID_PATTERN,
)
from agentstreams._events import Event, EventType, Replier
from agentstreams._observe import get_observer
from agentstreams._publisher import Publisher, StreamCap
from agentstreams._signing import SigningKeys
from agentstreams._streams import entries_from_read_reply, side_key
from agentstreams._transport import MaybeWrittenError, exchange
from agentstreams.errors import (
    BackpressureError,
    ClosedError,
    ConnectionLostError,
    IdempotencyConflictError,
    InvalidArgumentError,
    MalformedEventError,
    PayloadTooLargeError,
    PublishTimeoutError,
    RequestTimeoutError,
)
from agentstreams.tracing import current_trace_headers

__all__ = [
    "ReplyReader",
    "ReplySender",
    "ReplyTarget",
    "RequestStats",
    "Requester",
    "add_reply_keys",
    "check_reply_id",
    "reply_stream_key",
    "reply_target_from_fields",
    "reply_target_from_mapping",
    "validate_type",
    "wire_reply",
]

logger = logging.getLogger("agentstreams.reply")

_REPLY_ID = re.compile(REPLY_ID_PATTERN + r"\Z")
#: Publishers of reply streams a sender keeps (one per caller it answered recently).
_SENDER_CACHE_MAX = 256


def check_reply_id(kind: str, value: object) -> str:
    """A caller id or request id: 1-64 letters, digits, ``_``, ``.``, ``-``; else raise."""
    if not isinstance(value, str) or not _REPLY_ID.match(value):
        raise InvalidArgumentError(
            f"{kind} must be 1-64 characters among letters, digits, '_', '.' and '-', got "
            f"{value!r}")
    return value


def reply_stream_key(stream: str, caller_id: str) -> str:
    """The reply stream of ``caller_id`` for requests published to ``stream``:
    ``{stream}:replies:<caller id>`` (always derived from the replier's own stream)."""
    return side_key(stream, f"{REPLIES_SUFFIX}:{check_reply_id('caller id', caller_id)}")


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Whom to answer: the caller (its reply stream) and the request."""

    caller_id: str
    request_id: str


def reply_target_from_fields(fields: Mapping[bytes, bytes]) -> ReplyTarget:
    """The reply target of a request entry (raw fields); raises InvalidArgumentError when
    the metadata is missing or not a valid pair of ids (a forged or foreign entry)."""
    caller = fields.get(B_FIELD_REPLY_TO)
    request = fields.get(B_FIELD_REQUEST_ID)
    if caller is None or request is None:
        raise InvalidArgumentError(f"a request needs both {FIELD_REPLY_TO} and "
                                   f"{FIELD_REQUEST_ID}")
    return ReplyTarget(check_reply_id("caller id", caller.decode(errors="replace")),
                       check_reply_id("request id", request.decode(errors="replace")))


def add_reply_keys(item: dict[str, Any], fields: Mapping[bytes, bytes]) -> None:
    """Put a request's reply metadata into the dict ``subscribe`` yields (not checked here:
    ``AgentCoordinator.reply`` checks it)."""
    item[KEY_REPLY_TO] = fields[B_FIELD_REPLY_TO].decode(errors="replace")
    request = fields.get(B_FIELD_REQUEST_ID)
    item[KEY_REQUEST_ID] = request.decode(errors="replace") if request is not None else ""


def reply_target_from_mapping(event: Mapping[str, Any]) -> ReplyTarget:
    """The reply target of a dict yielded by ``subscribe``."""
    if KEY_REPLY_TO not in event or KEY_REQUEST_ID not in event:
        raise InvalidArgumentError(
            f"event {event.get(KEY_MSG_ID, '')!s} carries no reply metadata ({KEY_REPLY_TO}, "
            f"{KEY_REQUEST_ID}): only requests published by AgentCoordinator.request() can be "
            "answered")
    return ReplyTarget(check_reply_id("caller id", event[KEY_REPLY_TO]),
                       check_reply_id("request id", event[KEY_REQUEST_ID]))


# ---------------------------------------------------------------------------- replier side


class ReplySender:
    """Writes replies for requests read from ``stream`` (one per worker or coordinator)."""

    def __init__(self, client: Redis, stream: str, *, signing_keys: SigningKeys | None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 ttl_s: float = DEFAULT_REPLY_TTL_S) -> None:
        self.client = client
        self.stream = stream
        self.signing_keys = signing_keys
        self.max_event_bytes = max_event_bytes
        self.ttl_ms = int(ttl_s * 1000)
        self._ttl_s = ttl_s
        self._publishers: dict[str, Publisher] = {}

    def _publisher(self, key: str) -> Publisher:
        publisher = self._publishers.get(key)
        if publisher is None:
            if len(self._publishers) >= _SENDER_CACHE_MAX:
                self._publishers.pop(next(iter(self._publishers)))
            publisher = Publisher(self.client, key, max_event_bytes=self.max_event_bytes,
                                  idempotency_window_s=self._ttl_s, coalesce=False,
                                  signing_keys=self.signing_keys)
            self._publishers[key] = publisher
        return publisher

    async def send(self, target: ReplyTarget, fields: Mapping[str, Any]) -> str:
        """Publish the reply (once per request id: a second answer, even a different one,
        returns the first reply's id) and refresh the reply stream's TTL."""
        if not isinstance(fields, Mapping):
            raise InvalidArgumentError(f"reply fields must be a mapping, got "
                                       f"{type(fields).__name__}")
        key = reply_stream_key(self.stream, target.caller_id)
        try:
            msg_id = await self._publisher(key).publish(
                REPLY_EVENT_TYPE, fields, idempotency_key=target.request_id,
                event_id=target.request_id)
        except IdempotencyConflictError as exc:
            # Answered before with other fields (a redelivered request, a model that answers
            # differently): the first reply stands; the caller has it or will.
            msg_id = exc.first_id
        client, ttl_ms = self.client, self.ttl_ms
        await call(lambda: client.pexpire(key, ttl_ms), stream=key)
        return msg_id

    def bind(self, target: ReplyTarget) -> Replier:
        """``Event.reply`` for one request."""
        async def reply(fields: Mapping[str, Any]) -> str:
            return await self.send(target, fields)
        return reply


# ---------------------------------------------------------------------------- caller side


@dataclass(slots=True)
class RequestStats:
    """Counters of a coordinator's requests (``AgentCoordinator.request_stats``)."""

    #: requests published
    requests: int = 0
    #: replies that resolved a waiting request
    replies: int = 0
    #: requests that raised RequestTimeoutError
    timeouts: int = 0
    #: replies nobody waits for (timed out, cancelled, or answered twice): ignored
    late_or_duplicate_replies: int = 0
    #: entries of the reply stream that are not a decodable reply: ignored
    malformed_replies: int = 0
    #: replies refused by signature verification (unsigned, forged, copied): ignored
    unauthenticated_replies: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


class ReplyReader:
    """Reads one private reply stream in the background (XREAD, short blocks), hands each
    entry to ``dispatch`` and deletes what it read. Shared by ``Requester`` and usable by any
    per-caller reply stream."""

    def __init__(self, client: Redis, stream: str,
                 dispatch: Callable[[str, dict[bytes, bytes]], None], *,
                 block_ms: int = REPLY_BLOCK_MS) -> None:
        self.client = client
        self.stream = stream
        self.block_ms = block_ms
        self._dispatch = dispatch
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The reading task (None before ``start``)."""
        return self._task

    def start(self, on_exit: Callable[[asyncio.Task[None]], None] | None = None) -> None:
        """Start reading (again, if a previous task ended)."""
        if self._closed:
            raise ClosedError("the reply reader was closed")
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._run(), name=f"agentstreams-replies:{self.stream}")
        if on_exit is not None:
            self._task.add_done_callback(on_exit)

    async def close(self) -> None:
        """Stop reading (promptly: within about one block). Idempotent."""
        self._closed = True
        task = self._task
        if task is None:
            return
        task.cancel()
        # redis-py can swallow the cancellation of a blocking read, so the loop also checks
        # _closed. asyncio.wait, unlike awaiting the task, never eats the caller's own cancel.
        done, _ = await asyncio.wait([task], timeout=self.block_ms / 1000 * 3)
        if not done:
            logger.warning("the reply reader of %r did not stop; closing its connection "
                           "anyway", self.stream, extra={"stream": self.stream})
        elif not task.cancelled() and task.exception() is not None:
            logger.warning("the reply reader of %r had failed: %r", self.stream,
                           task.exception(), extra={"stream": self.stream})

    async def _run(self) -> None:
        client, stream = self.client, self.stream
        last_id = "0-0"  # a fresh stream: what is there was written for us (no start race)
        backoff = Backoff()
        while not self._closed:
            try:
                reply = await call(lambda start=last_id: client.xread(  # type: ignore[misc]
                    {stream: start}, count=100, block=self.block_ms), stream=stream)
                backoff.reset()
            except (ConnectionLostError, BackpressureError) as exc:
                delay = backoff.next_delay()
                logger.warning("reply reader: %s; retrying in %.2fs", exc, delay,
                               extra={"stream": stream})
                await asyncio.sleep(delay)
                continue
            done: list[str] = []
            for msg_id, fields in entries_from_read_reply(reply):
                last_id = msg_id
                done.append(msg_id)
                if fields is not None:
                    self._dispatch(msg_id, fields)
            if done:
                with contextlib.suppress(ConnectionLostError, BackpressureError):
                    await call(lambda d=done: client.xdel(stream, *d),  # type: ignore[misc]
                               stream=stream)


class Requester:
    """The caller side of one coordinator: publishes requests, waits for their replies."""

    def __init__(self, client: Redis, stream: str, caller_id: str | None = None, *,
                 signing_keys: SigningKeys | None = None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, cap: StreamCap | None = None,
                 publish_timeout_s: float = 10.0, block_ms: int = REPLY_BLOCK_MS) -> None:
        self.client = client
        self.stream = stream
        self.caller_id = check_reply_id("caller_id", caller_id or uuid.uuid4().hex[:16])
        self.reply_stream = reply_stream_key(stream, self.caller_id)
        self.max_event_bytes = max_event_bytes
        self.cap = cap
        self.publish_timeout_s = publish_timeout_s
        self.stats = RequestStats()
        self._signer = signing_keys.signer(stream) if signing_keys is not None else None
        self._verifier = (signing_keys.verifier(self.reply_stream)
                          if signing_keys is not None else None)
        self._key_resp = _bulk(stream)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = ReplyReader(client, self.reply_stream, self._on_reply,
                                   block_ms=block_ms)
        self._closed = False

    @property
    def waiting(self) -> int:
        """Requests waiting for their reply."""
        return len(self._pending)

    async def request(self, event_type: str | EventType, fields: Mapping[str, Any], *,
                      timeout_s: float, session_id: str | None = None) -> dict[str, Any]:
        """Publish a request and return its reply's fields (see ``AgentCoordinator.request``)."""
        if self._closed:
            raise ClosedError("request() after close(): create (or initialize) a coordinator")
        if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) \
                or not timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be a positive number, got {timeout_s!r}")
        if not isinstance(fields, Mapping):
            raise InvalidArgumentError(f"fields must be a mapping, got {type(fields).__name__}")
        if session_id is not None:
            fields = {**fields, "session_id": session_id}
        self._reader.start(self._reader_exited)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request_id = new_event_id()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[request_id] = future
        try:
            await self._publish(event_type, fields, request_id)
            self.stats.requests += 1
            try:
                async with asyncio.timeout_at(deadline):
                    return await future
            except TimeoutError:
                if future.done() and not future.cancelled():
                    return future.result()  # resolved just as the deadline passed
                self.stats.timeouts += 1
                raise RequestTimeoutError(
                    f"no reply to request {request_id} ({validate_type(event_type)!r} on "
                    f"{self.stream!r}) within {timeout_s}s; it may still be handled (a later "
                    "reply is ignored)", request_id=request_id, timeout_s=float(timeout_s),
                    stream=self.stream) from None
        finally:
            self._pending.pop(request_id, None)
            if not future.done():
                future.cancel()

    async def _publish(self, event_type: str | EventType, fields: Mapping[str, Any],
                       request_id: str) -> str:
        """XADD the request: the one encoder's entry, the reply metadata appended, then signed
        (so the signature covers the metadata too)."""
        caller_id = self.caller_id
        extra = (_bulk(FIELD_REPLY_TO) + _bulk(caller_id) + _bulk(FIELD_REQUEST_ID)
                 + _bulk(request_id))
        extra_bytes = len(FIELD_REPLY_TO) + len(caller_id) + len(FIELD_REQUEST_ID) \
            + len(request_id)
        signer = self._signer
        overhead = extra_bytes + (signer.overhead if signer is not None else 0)
        traceparent, tracestate = current_trace_headers()
        try:
            nargs, body = encode_event_resp(
                event_type, fields, max_event_bytes=self.max_event_bytes - overhead,
                traceparent=traceparent, tracestate=tracestate, stream=self.stream)
        except PayloadTooLargeError as exc:
            size = exc.size + overhead
            raise PayloadTooLargeError(
                f"request of type {validate_type(event_type)!r} is {size} bytes (field names "
                f"and values, metadata included), over the {self.max_event_bytes}-byte limit",
                size=size, limit=self.max_event_bytes, stream=self.stream) from None
        nargs, body = nargs + 4, body + extra
        if signer is not None:
            nargs, body = signer.sign(nargs, body)
        cap = self.cap.args() if self.cap is not None else []
        head = "$4\r\nXADD\r\n" + self._key_resp + "".join(_bulk(str(a)) for a in cap) \
            + "$1\r\n*\r\n"
        payload = f"*{2 + len(cap) + 1 + nargs}\r\n{head}{body}".encode()
        try:
            (reply,) = await exchange(self.client.connection_pool, payload, 1,
                                      timeout_s=self.publish_timeout_s)
        except MaybeWrittenError as exc:
            raise PublishTimeoutError(
                f"the connection failed after the request was sent ({exc}): it may or may not "
                "have been written", stream=self.stream) from exc.cause
        except (redis_exc.RedisError, OSError) as exc:
            raise translate_error(exc, stream=self.stream) from exc
        if isinstance(reply, Exception):
            raise translate_error(reply, stream=self.stream) from reply
        get_observer().on_published(self.stream, 1)
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _on_reply(self, msg_id: str, fields: dict[bytes, bytes]) -> None:
        """One entry of the reply stream: verify, decode, resolve its request."""
        if self._verifier is not None:  # before anything decodes the entry
            problem = self._verifier.problem(fields)
            if problem is not None:
                self.stats.unauthenticated_replies += 1
                logger.warning("ignored an unauthenticated reply %s: %s", msg_id, problem,
                               extra={"stream": self.reply_stream, "msg_id": msg_id})
                return
        try:
            event = decode_entry(msg_id, fields, stream=self.reply_stream,
                                 max_event_bytes=self.max_event_bytes)
            if event.type != REPLY_EVENT_TYPE or not event.event_id:
                raise MalformedEventError(f"not a reply (type {event.type!r})",
                                          fields=fields, stream=self.reply_stream,
                                          msg_id=msg_id)
        except MalformedEventError as exc:
            self.stats.malformed_replies += 1
            logger.warning("ignored a malformed reply %s: %s", msg_id, exc.reason,
                           extra={"stream": self.reply_stream, "msg_id": msg_id})
            return
        future = self._pending.get(event.event_id)
        if future is None or future.done():
            self.stats.late_or_duplicate_replies += 1
            logger.info("reply to request %s arrived late or twice; ignored", event.event_id,
                        extra={"stream": self.reply_stream, "msg_id": msg_id})
            return
        data = dict(event.data)
        del data["type"]
        self.stats.replies += 1
        future.set_result(data)

    def _reader_exited(self, task: asyncio.Task[None]) -> None:
        """The reader stopped on its own (a permanent fault): fail who waits; the next
        request starts it again."""
        if task.cancelled() or self._closed:
            return
        error = task.exception()
        if error is None:
            return
        logger.error("the reply reader of %r failed: %r", self.reply_stream, error,
                     exc_info=error, extra={"stream": self.reply_stream})
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Stop the reader, fail waiting requests with ClosedError, delete the reply stream."""
        if self._closed:
            return
        self._closed = True
        await self._reader.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClosedError("the coordinator was closed while this "
                                                 "request waited for its reply"))
        self._pending.clear()
        with contextlib.suppress(Exception):
            await self.client.delete(self.reply_stream)


def validate_type(event_type: str | EventType) -> str:
    """An event type as text (for messages)."""
    return event_type.value if isinstance(event_type, EventType) else str(event_type)


def _bulk(text: str) -> str:
    return f"${len(text.encode())}\r\n{text}\r\n"


def wire_reply(event: Event, fields: Mapping[bytes, bytes], sender: ReplySender) -> None:
    """Make ``event.reply`` answer the request ``fields`` carry (Worker, per request only).

    Invalid reply metadata (a forged or foreign entry) is logged and leaves ``reply``
    unavailable: the handler still runs."""
    try:
        target = reply_target_from_fields(fields)
    except InvalidArgumentError as exc:
        logger.warning("event %s has invalid reply metadata (%s): it cannot be answered",
                       event.msg_id, exc, extra={"stream": event.stream, "msg_id": event.msg_id})
        return
    event._replier = sender.bind(target)

"""Publishing: single events, atomic batches, coalesced concurrent publishes, idempotent
publishes. Every byte goes through ``_transport`` (connection checks, timeouts, replies).

Paths, all writing the entry ``encode_event_resp`` encodes:

* ``publish`` on an idle publisher: one XADD, packed by us in one ``str.encode``.
* ``publish`` while a round trip is in flight: coalesced. What arrives waits and goes out in
  the next write, as pipelined plain XADDs on a connection the publisher holds while callers
  keep publishing (a full chunk is written at once, without waiting for earlier replies, so
  the server works while the callers encode). Each caller gets its own id or its own error;
  the XADDs are independent (no transaction: atomicity between callers means nothing).
* ``publish_many``: ``MULTI``, one XADD per event, ``EXEC`` in one round trip, streamed while
  it is encoded; atomic like a script call, but per event the server does a plain XADD (about
  1 us) instead of a script's JSON decode and ``redis.call`` (about 4 us).
* ``publish(..., idempotency_key=...)``: ``EVALSHA`` of the idempotent-XADD script with the
  same encoded fields.

Errors say what happened: ``ConnectionLostError`` means nothing was written;
``PublishTimeoutError`` (a subclass) means it may have landed. Every publish returns or raises
within ``timeout_s``: connecting, writing and waiting for the reply together (the client's
socket timeout unless given; only the time spent encoding a large batch does not count).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.exceptions as redis_exc

from agentstreams import _scripts as scripts
from agentstreams._codec import encode_event_resp
from agentstreams._connection import Redis, translate_error
from agentstreams._constants import (
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_SOCKET_TIMEOUT_S,
    FIELD_TIMESTAMP,
)
from agentstreams._events import EventType
from agentstreams._observe import get_observer
from agentstreams._signing import SigningKeys, signing_keys_from
from agentstreams._streams import idempotency_key_name, to_str
from agentstreams._transport import MaybeWrittenError, Pipe, exchange
from agentstreams.errors import (
    AgentStreamsError,
    ConnectionLostError,
    IdempotencyConflictError,
    InvalidArgumentError,
    PermissionDeniedError,
    PublishTimeoutError,
)
from agentstreams.tracing import current_trace_headers

__all__ = ["Publisher", "StreamCap"]

#: Events encoded per write when a ``publish_many`` transaction is streamed.
_STREAM_CHUNK = 64
#: Coalesced publishes written as soon as this many wait (see ``Publisher._flush_waiting``).
_PIPE_CHUNK = 16
#: Most coalesced publishes written in one batch.
_PIPE_MAX = 1000

_MULTI = "*1\r\n$5\r\nMULTI\r\n"
_EXEC = "*1\r\n$4\r\nEXEC\r\n"
_IDEMPOTENT_SHA = hashlib.sha1(scripts.IDEMPOTENT_XADD.encode()).hexdigest()


def _bulk(text: str) -> str:
    return f"${len(text.encode())}\r\n{text}\r\n"


def _fail_all(futures: Iterable[asyncio.Future[str]], error: BaseException | None) -> None:
    """Fail (or, without an error, cancel) every caller still waiting."""
    for future in futures:
        if not future.done():
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)


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



def _payload_digest(event_type: str | EventType, fields: Mapping[str, Any]) -> str:
    """What makes two idempotent publishes "the same event": the type and the fields, but
    not ``timestamp`` (a retry stamps a new one; the publish_* helpers always do)."""
    type_text = event_type.value if isinstance(event_type, EventType) else event_type
    payload = {name: value for name, value in fields.items() if name != FIELD_TIMESTAMP}
    data = orjson.dumps([type_text, payload], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=12).hexdigest()

class Publisher:
    """Writes events to one stream. Cheap to create; shares the client it is given.

    ``timeout_s`` bounds every publish (connecting, writing and waiting for the reply
    together); by default it is the client's socket timeout (``socket_timeout_s`` of
    ``AgentCoordinator``, 10 s unless set).

    ``signing_keys`` (key id -> secret, ordered): every event is signed with the first key on
    every path (``_kid`` and ``_sig`` fields; see ``agentstreams._signing``).
    """

    def __init__(
        self,
        client: Redis,
        stream: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        cap: StreamCap | None = None,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        coalesce: bool = True,
        timeout_s: float | None = None,
        signing_keys: SigningKeys | Mapping[str, bytes | str] | None = None,
    ) -> None:
        keys = signing_keys_from(signing_keys)
        if not isinstance(max_event_bytes, int) or max_event_bytes <= 0:
            raise InvalidArgumentError("max_event_bytes must be a positive integer")
        if idempotency_window_s <= 0:
            raise InvalidArgumentError("idempotency_window_s must be positive")
        if timeout_s is None:
            configured = client.connection_pool.connection_kwargs.get("socket_timeout")
            timeout_s = (float(configured) if isinstance(configured, int | float)
                         and configured > 0 else DEFAULT_SOCKET_TIMEOUT_S)
        elif not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise InvalidArgumentError("timeout_s must be a positive number of seconds")
        self.client = client
        self.stream = stream
        self.max_event_bytes = max_event_bytes
        self.cap = cap
        self.idempotency_window_s = idempotency_window_s
        self.timeout_s = float(timeout_s)
        #: Signs every entry (``_kid``, ``_sig``) when ``signing_keys`` were given
        self.signing_keys = keys
        self._signer = keys.signer(stream) if keys is not None else None
        self._pool = client.connection_pool
        self._cap_args: list[str | int] = cap.args() if cap and cap.kind == "maxlen" else []
        #: RESP of the stream key, for the hand-packed commands
        self._key_resp = _bulk(stream)
        self._head: tuple[str, int] | None = None
        #: True once this publisher saw the server accept a MULTI: until then a transaction
        #: waits for MULTI's +OK before writing its XADDs (when MULTI is denied, XADDs sent
        #: behind it would run outside the transaction).
        self._multi_confirmed = False
        #: Coalesce concurrent ``publish`` calls into one round trip (see the module docstring).
        self.coalesce = coalesce
        #: True while a round trip of this publisher's (a plain XADD or a flush) is in flight.
        self._busy = False
        #: Events that arrived while busy: (encoded, the caller's future), and the loop time
        #: by which the oldest of them must be answered.
        self._waiting: list[tuple[tuple[int, str], asyncio.Future[str]]] = []
        self._waiting_deadline = 0.0
        self._flusher: asyncio.Task[None] | None = None
        #: The connection the flusher holds while batches are in flight, and those batches'
        #: callers with their deadline, oldest first (replies come back in write order).
        self._pipe: Pipe | None = None
        self._in_flight: deque[tuple[list[asyncio.Future[str]], float]] = deque()

    def _current_cap_args(self) -> list[str | int]:
        if self.cap is None:
            return []
        return self._cap_args if self.cap.kind == "maxlen" else self.cap.args()

    def _maybe_landed(self, exc: MaybeWrittenError) -> PublishTimeoutError:
        return PublishTimeoutError(
            f"the connection failed after the publish was sent ({exc}): it may or may not "
            "have been written; retry with the same idempotency_key to publish exactly once",
            stream=self.stream)

    def _refused(self, reply: Exception) -> BaseException:
        """The error for a command the server refused (an error reply)."""
        error = translate_error(reply, stream=self.stream)
        if error is not reply:
            error.__cause__ = reply
        return error

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
        the first id and writes nothing. Returns or raises within ``timeout_s``:
        ``ConnectionLostError`` when nothing was written (retry freely),
        ``PublishTimeoutError`` when it may have been (retry with an idempotency key).
        """
        if traceparent is None:
            traceparent, tracestate = current_trace_headers()
        if idempotency_key is not None:
            return await self._publish_idempotent(event_type, fields, idempotency_key,
                                                  event_id, traceparent, tracestate)
        encoded = encode_event_resp(event_type, fields, event_id=event_id,
                                    max_event_bytes=self.max_event_bytes,
                                    traceparent=traceparent, tracestate=tracestate,
                                    stream=self.stream, signer=self._signer)
        if self._busy and self.coalesce:
            # Queue for the next round trip (see the module docstring) and wait for the id.
            loop = asyncio.get_running_loop()
            future: asyncio.Future[str] = loop.create_future()
            waiting = self._waiting
            if not waiting:
                self._waiting_deadline = loop.time() + self.timeout_s
            waiting.append((encoded, future))
            if len(waiting) >= _PIPE_CHUNK and self._pipe is not None:
                self._write_waiting()  # out now, while the other callers are still encoding
            return await future
        nargs, body = encoded
        head, base = self._xadd_head()
        self._busy = True
        try:
            (reply,) = await exchange(self._pool, f"*{base + nargs}\r\n{head}{body}".encode(), 1,
                                      timeout_s=self.timeout_s)
        except MaybeWrittenError as exc:
            raise self._maybe_landed(exc) from exc.cause
        except (redis_exc.RedisError, OSError) as exc:
            raise translate_error(exc, stream=self.stream) from exc
        finally:
            self._busy = False
            if self._waiting:
                self._start_flusher()
        if isinstance(reply, Exception):
            raise self._refused(reply)
        get_observer().on_published(self.stream, 1)
        return to_str(reply)

    def _xadd_head(self) -> tuple[str, int]:
        """RESP of ``XADD <stream> [cap] *`` and its argument count."""
        if self._head is not None:
            return self._head
        cap = self._current_cap_args()
        head = "$4\r\nXADD\r\n" + self._key_resp + "".join(_bulk(str(a)) for a in cap) \
            + "$1\r\n*\r\n"
        if self.cap is None or self.cap.kind == "maxlen":  # a MINID bound moves with the clock
            self._head = (head, 3 + len(cap))
        return head, 3 + len(cap)

    # ------------------------------------------------------------------ coalesced publishes

    def _start_flusher(self) -> None:
        self._busy = True
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_waiting(), name=f"agentstreams-publish-{self.stream}")

    async def _flush_waiting(self) -> None:
        """Hold one pooled connection while publishes keep arriving and pipeline them on it.

        What waits is written as one batch of XADDs without waiting for the batches already in
        flight; a publishing call that fills a chunk writes it itself, so the server works on
        it while the other callers are still encoding. The replies are read here, in order,
        each within the deadline of the batch's oldest caller, and each caller gets its id or
        its error. After a batch is answered its callers usually publish again at once: one
        loop iteration's grace lets them queue here instead of each starting a plain XADD.
        The connection goes back to the pool when nothing waits.
        """
        pipe: Pipe | None = None
        clean = False
        try:
            async with asyncio.timeout_at(self._waiting_deadline):
                pipe = await Pipe.open(self._pool)
            self._pipe = pipe
            while True:
                if not self._in_flight and not self._waiting:
                    await asyncio.sleep(0)
                    if not self._in_flight and not self._waiting:
                        break
                if self._waiting:
                    self._write_waiting()
                    if not self._in_flight:  # the connection is closing: nothing was written
                        raise redis_exc.ConnectionError("Connection closed by server.")
                futures, deadline = self._in_flight[0]
                async with asyncio.timeout_at(deadline):
                    await pipe.flush()
                    replies = await pipe.read(len(futures))
                self._in_flight.popleft()
                self._settle(futures, replies)
            clean = True
        except BaseException as exc:
            # Lost, timed out, cancelled (or a bug): every waiting caller is told. What was
            # written may or may not have been applied; what still waited was not written.
            written_error, unwritten_error = self._flush_errors(exc)
            for futures, _ in self._in_flight:
                _fail_all(futures, written_error)
            self._in_flight.clear()
            _fail_all([future for _, future in self._waiting], unwritten_error)
            self._waiting.clear()
            if not isinstance(exc, Exception):
                raise  # cancelled: so are the callers
        finally:
            self._pipe = None
            if pipe is not None:
                await pipe.close(clean=clean)
            self._flusher = None
            self._busy = False
            if self._waiting:  # arrived while the connection was given back
                self._start_flusher()

    def _flush_errors(self, exc: BaseException) -> tuple[BaseException | None,
                                                          BaseException | None]:
        """The errors for the callers whose events were written, and for the others."""
        if not isinstance(exc, Exception):
            return None, None
        if isinstance(exc, TimeoutError):
            exc = redis_exc.TimeoutError(f"no reply from the server within {self.timeout_s}s")
        elif not isinstance(exc, redis_exc.RedisError | OSError):
            return exc, exc
        written = self._maybe_landed(MaybeWrittenError(exc))
        unwritten = translate_error(exc, stream=self.stream)
        if isinstance(unwritten, ConnectionLostError):
            unwritten = ConnectionLostError(
                f"{unwritten} (this event was not sent)", stream=self.stream)
        return written, unwritten

    def _write_waiting(self) -> None:
        """Write what waits as one pipelined batch on the held connection (no await)."""
        pipe = self._pipe
        batch = self._waiting[:_PIPE_MAX]
        head, base = self._xadd_head()
        data = "".join([f"*{base + nargs}\r\n{head}{body}"
                        for (nargs, body), _ in batch]).encode()
        if pipe is None or not pipe.write(data):
            return  # the connection is closing: the flusher finds out and tells the callers
        del self._waiting[:_PIPE_MAX]
        self._in_flight.append(([future for _, future in batch], self._waiting_deadline))

    def _settle(self, futures: list[asyncio.Future[str]], replies: list[Any]) -> None:
        """Give each caller of a batch its id, or its own error."""
        published = 0
        for future, reply in zip(futures, replies, strict=True):
            if isinstance(reply, Exception):
                if not future.done():
                    future.set_exception(self._refused(reply))
            else:
                published += 1
                if not future.done():
                    future.set_result(to_str(reply))
        if published:
            get_observer().on_published(self.stream, published)

    # ------------------------------------------------------------------ batches

    async def publish_many(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Append many events in one atomic transaction, in one round trip whatever their
        number; returns their ids in order.

        Each mapping holds a ``type`` and the event's fields. The transaction is written
        while it is encoded: an event that fails validation raises before ``EXEC`` is sent
        and the transaction is discarded, so one bad event publishes nothing. If the server
        refuses ``MULTI`` (an ACL), nothing is written and ``PermissionDeniedError`` is
        raised; should that start happening after this publisher saw MULTI accepted (the ACL
        changed meanwhile), the XADDs run on their own and the error lists the ids written.
        """
        if isinstance(events, Mapping | str | bytes):
            raise InvalidArgumentError("publish_many takes a list of event mappings")
        events = events if isinstance(events, list | tuple) else list(events)
        if not events:
            return []
        traceparent, tracestate = current_trace_headers()
        gated = not self._multi_confirmed
        try:
            replies = await exchange(
                self._pool, self._transaction(events, traceparent, tracestate, gated),
                len(events) + 2, timeout_s=self.timeout_s, gated=gated)
        except MaybeWrittenError as exc:
            raise self._maybe_landed(exc) from exc.cause
        except (redis_exc.RedisError, OSError) as exc:
            raise translate_error(exc, stream=self.stream) from exc
        return self._transaction_ids(replies, len(events))

    def _transaction(self, events: Sequence[Mapping[str, Any]], traceparent: str | None,
                     tracestate: str | None, gated: bool) -> Iterator[bytes]:
        """``MULTI``, one XADD per event and ``EXEC`` as RESP, encoded a chunk at a time.

        Written while the rest is still being encoded, the first XADDs are parsed and queued by
        the server meanwhile. With ``gated``, MULTI comes alone first (see ``exchange``).
        """
        head, base = self._xadd_head()
        if gated:
            yield _MULTI.encode()
        parts = [] if gated else [_MULTI]
        for index, event in enumerate(events):
            nargs, body = self._encode_item(index, event, traceparent, tracestate)
            parts.append(f"*{base + nargs}\r\n{head}{body}")
            if len(parts) >= _STREAM_CHUNK:
                yield "".join(parts).encode()
                parts = []
        parts.append(_EXEC)
        yield "".join(parts).encode()

    def _transaction_ids(self, replies: list[Any], count: int) -> list[str]:
        """The ids from the replies to ``MULTI``, ``count`` XADDs and ``EXEC``; raises what
        the server refused, naming the events written if any were."""
        multi = replies[0]
        if isinstance(multi, Exception):
            self._multi_confirmed = False
            # Gated, only MULTI was sent. Otherwise the XADDs ran on their own.
            written = [(index, to_str(reply)) for index, reply in enumerate(replies[1:1 + count])
                       if not isinstance(reply, Exception)]
            error = self._refused(multi)
            if written:
                text = self._written_text(f"the server refused MULTI ({multi}), so the "
                                          "XADDs ran outside a transaction", written, count)
                if isinstance(error, PermissionDeniedError):
                    raise PermissionDeniedError(text, command="MULTI",
                                                stream=self.stream) from multi
                error.add_note(text)
            raise error
        self._multi_confirmed = True
        result = replies[-1]
        if isinstance(result, Exception):  # EXECABORT: a queued XADD was refused, none ran
            raise self._refused(next((reply for reply in replies[1:-1]
                                      if isinstance(reply, Exception)), result))
        if not isinstance(result, list):
            raise redis_exc.ResponseError(f"unexpected reply to EXEC: {result!r}")
        failed = [reply for reply in result if isinstance(reply, Exception)]
        if failed:
            error = self._refused(failed[0])
            written = [(index, to_str(reply)) for index, reply in enumerate(result)
                       if not isinstance(reply, Exception)]
            if written:
                error.add_note(self._written_text("some XADDs of the transaction failed",
                                                  written, count))
            raise error
        get_observer().on_published(self.stream, count)
        return [to_str(reply) for reply in result]

    @staticmethod
    def _written_text(what: str, written: list[tuple[int, str]], count: int) -> str:
        listing = ", ".join(f"#{index} -> {msg_id}" for index, msg_id in written)
        return (f"{what}: {len(written)} of the {count} events were written ({listing}); "
                "publish only the others again")

    def _encode_item(self, index: int, event: Mapping[str, Any], traceparent: str | None,
                     tracestate: str | None) -> tuple[int, str]:
        """Validate and encode the ``index``-th mapping given to ``publish_many``."""
        if type(event) is not dict and not isinstance(event, Mapping):  # dict: no ABC check
            raise InvalidArgumentError(f"event #{index} is a {type(event).__name__}, "
                                       "not a mapping")
        if "type" not in event:
            raise InvalidArgumentError(f"event #{index} has no 'type'")
        try:
            return encode_event_resp(event["type"], event, type_in_fields=True,
                                     max_event_bytes=self.max_event_bytes,
                                     traceparent=traceparent, tracestate=tracestate,
                                     stream=self.stream, signer=self._signer)
        except AgentStreamsError as exc:
            exc.add_note(f"in event #{index} of the batch given to publish_many")
            raise

    # ------------------------------------------------------------------ idempotent publish

    async def _publish_idempotent(self, event_type: str | EventType, fields: Mapping[str, Any],
                                  key: str, event_id: str | None, traceparent: str | None,
                                  tracestate: str | None) -> str:
        """``EVALSHA`` of the idempotent-XADD script with the encoded entry (``EVAL`` when
        the server does not have the script yet)."""
        if not isinstance(key, str) or not key or len(key) > 256:
            raise InvalidArgumentError("idempotency_key must be a non-empty string of at most "
                                       "256 characters")
        nargs, body = encode_event_resp(event_type, fields, event_id=event_id,
                                        max_event_bytes=self.max_event_bytes,
                                        traceparent=traceparent, tracestate=tracestate,
                                        stream=self.stream, signer=self._signer)
        cap = self._current_cap_args()
        digest = _payload_digest(event_type, fields)
        # KEYS: stream, idempotency key. ARGV: window ms, digest, n cap args, cap args...,
        # fields...
        tail = (f"$1\r\n2\r\n{self._key_resp}{_bulk(idempotency_key_name(self.stream, key))}"
                f"{_bulk(str(int(self.idempotency_window_s * 1000)))}{_bulk(digest)}"
                f"{_bulk(str(len(cap)))}" + "".join(_bulk(str(a)) for a in cap) + body)
        count = 8 + len(cap) + nargs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            (reply,) = await exchange(
                self._pool, f"*{count}\r\n$7\r\nEVALSHA\r\n$40\r\n{_IDEMPOTENT_SHA}\r\n{tail}"
                .encode(), 1, timeout_s=self.timeout_s)
            if isinstance(reply, redis_exc.NoScriptError):  # not loaded yet: nothing ran
                (reply,) = await exchange(
                    self._pool, f"*{count}\r\n$4\r\nEVAL\r\n{_bulk(scripts.IDEMPOTENT_XADD)}"
                    f"{tail}".encode(), 1, timeout_s=max(0.001, deadline - loop.time()))
        except MaybeWrittenError as exc:
            raise self._maybe_landed(exc) from exc.cause
        except (redis_exc.RedisError, OSError) as exc:
            raise translate_error(exc, stream=self.stream) from exc
        if isinstance(reply, Exception):
            raise self._refused(reply)
        created, remembered = reply
        if created == 1:
            get_observer().on_published(self.stream, 1)
            return to_str(remembered)
        msg_id, _, first_digest = to_str(remembered).partition(" ")
        if first_digest and first_digest != digest:  # (keys from before digests: no check)
            raise IdempotencyConflictError(
                f"idempotency key {key!r} already published a different event (stream id "
                f"{msg_id}) within its {self.idempotency_window_s:g} s window; a retry must "
                "repeat the same event, a new event needs a new key", first_id=msg_id,
                stream=self.stream)
        return msg_id

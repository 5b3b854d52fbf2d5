"""Publishing: single events, batches in one round trip, and idempotent publishes.

Concurrent ``publish`` calls on one ``Publisher`` are coalesced: while one round trip is in
flight, what arrives waits and goes out together in the next one. An idle publisher sends at
once, so coalescing adds no latency, and a sequential caller always takes the plain XADD path.
While callers keep publishing, the publisher holds one connection and pipelines their batches
on it: a batch is written as soon as it is full, without waiting for the replies to earlier
ones, so the server works while the callers encode. Every path writes the same entry.

A batch (``publish_many``, or coalesced publishes) is ``MULTI``, one ``XADD`` per event,
``EXEC``, written as one pipelined round trip whose RESP we pack ourselves (one ``str.encode``
for the whole batch). It is atomic like a script call (the server runs all of it or, when the
connection drops before ``EXEC``, none of it), and per event the server does a plain XADD
(about 1 us) instead of a script's JSON decode and ``redis.call`` (about 4 us).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.exceptions as redis_exc

from agentstreams import _scripts as scripts
from agentstreams._codec import encode_event, encode_resp, entry_to_pairs
from agentstreams._connection import Redis, translate_error
from agentstreams._constants import DEFAULT_IDEMPOTENCY_WINDOW_S, DEFAULT_MAX_EVENT_BYTES
from agentstreams._events import EventType
from agentstreams._observe import get_observer
from agentstreams._streams import idempotency_key_name, to_str
from agentstreams.errors import AgentStreamsError, InvalidArgumentError, PublishTimeoutError
from agentstreams.tracing import current_trace_headers

__all__ = ["Publisher", "StreamCap"]

#: Largest batch sent in one round trip; bigger batches are split.
MAX_BATCH = 1000

#: Events encoded per write when a batch is streamed into its transaction.
_STREAM_CHUNK = 64
#: Coalesced publishes written as soon as this many wait (see ``Publisher._flush_waiting``).
_PIPE_CHUNK = 16

_MULTI = "*1\r\n$5\r\nMULTI\r\n"
_EXEC = "*1\r\n$4\r\nEXEC\r\n"


def _bulk(text: str) -> str:
    return f"${len(text.encode())}\r\n{text}\r\n"



try:  # what redis-py's hiredis reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: per-reply reads instead
    _NOT_ENOUGH_DATA = None


async def _read_replies(conn: Any, count: int) -> list[Any]:
    """Read ``count`` replies from a connection; error replies are returned, not raised.

    With hiredis, replies already received are taken straight from its reader (one C call
    each) and the socket is read only when the reader runs dry: the parser's per-reply
    coroutine would cost more than the XADD behind each reply. Otherwise, one
    ``read_response`` per reply.
    """
    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or _NOT_ENOUGH_DATA is None or not hasattr(parser, "read_from_socket"):
        read = conn.read_response if parser is None else parser.read_response
        return [await read() for _ in range(count)]
    if not getattr(parser, "_connected", True):
        raise redis_exc.ConnectionError("Connection closed by server.")
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)
    gets = reader.gets
    replies: list[Any] = []
    append = replies.append
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            await parser.read_from_socket()
        elif isinstance(reply, redis_exc.ConnectionError):
            raise reply
        elif push_type is not None and isinstance(reply, push_type):
            await parser.handle_push_response(reply)  # RESP3 out-of-band message
        else:
            append(reply)
    return replies


def _exec_ids(replies: list[Any]) -> list[str]:
    """The stream ids from the replies to ``MULTI``, the ``XADD``s and ``EXEC``; raises the
    first error the server gave (one queued command refused aborts the whole EXEC)."""
    for reply in replies[:-1]:  # +OK, then +QUEUED or the error that aborts the EXEC
        if isinstance(reply, Exception):
            raise reply
    result = replies[-1]
    if isinstance(result, Exception):
        raise result
    if not isinstance(result, list):
        raise redis_exc.ResponseError(f"unexpected reply to EXEC: {result!r}")
    for item in result:
        if isinstance(item, Exception):
            raise item
    return [to_str(x) for x in result]


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
        #: RESP of the stream key, for the pipelined batches
        self._key_resp = _bulk(stream)
        self._head: tuple[str, int] | None = None
        #: Coalesce concurrent ``publish`` calls into one round trip (see the module docstring).
        self.coalesce = coalesce
        #: True while a round trip of this publisher's (a plain XADD or a flush) is in flight.
        self._busy = False
        #: Events that arrived while busy: (encoded as RESP, the caller's future).
        self._waiting: list[tuple[tuple[int, str], asyncio.Future[str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: The connection the flusher holds while batches are in flight, and those batches'
        #: callers, oldest first (replies come back in the order the batches were written).
        self._pipe: Any = None
        self._in_flight: deque[list[asyncio.Future[str]]] = deque()

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
            # Queue for the next round trip (see the module docstring) and wait for the id.
            text = encode_resp(event_type, fields, False, self.max_event_bytes, event_id, None,
                               traceparent, tracestate, self.stream)
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            waiting = self._waiting
            waiting.append((text, future))
            if len(waiting) >= _PIPE_CHUNK and self._pipe is not None:
                self._write_waiting()  # out now, while the other callers are still encoding
            return await future
        if idempotency_key is not None:
            entry = encode_event(event_type, fields, event_id=event_id,
                                 max_event_bytes=self.max_event_bytes, traceparent=traceparent,
                                 tracestate=tracestate, stream=self.stream)
            return await self._publish_idempotent(entry, idempotency_key)
        nargs, body = encode_resp(event_type, fields, False, self.max_event_bytes, event_id,
                                  None, traceparent, tracestate, self.stream)
        head, base = self._xadd_head()
        self._busy = True
        try:
            # Packed by us in one encode: redis-py's per-argument packing costs more than the
            # rest of a publish (the entry carries three metadata fields on top of the user's).
            (msg_id,) = await self._exchange((f"*{base + nargs}\r\n{head}{body}".encode(),), 1)
            if isinstance(msg_id, Exception):
                raise msg_id
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        finally:
            self._busy = False
            if self._waiting:
                self._start_flusher()
        get_observer().on_published(self.stream, 1)
        return to_str(msg_id)

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

    def _start_flusher(self) -> None:
        self._busy = True
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_waiting(), name=f"agentstreams-publish-{self.stream}")

    async def _flush_waiting(self) -> None:
        """Hold one pooled connection while publishes keep arriving and pipeline them on it.

        What waits is written as a batch (``MULTI``/``XADD``.../``EXEC``) without waiting for
        the batches already in flight; a publishing call that fills a chunk writes it itself,
        so the server works on it while the other callers are still encoding. The replies are
        read here, in order, and each caller gets its id. After a batch is answered its callers
        usually publish again at once: one loop iteration's grace lets them queue here instead
        of each starting a plain XADD. The connection goes back to the pool when nothing waits.
        """
        pool = self.client.connection_pool
        conn: Any = None
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._pipe = conn
            while True:
                if not self._in_flight and not self._waiting:
                    await asyncio.sleep(0)
                    if not self._in_flight and not self._waiting:
                        break
                if self._waiting:
                    self._write_waiting()
                    if not self._in_flight:  # the connection is closing: nothing was written
                        raise redis_exc.ConnectionError("Connection closed by server.")
                futures = self._in_flight[0]
                async with asyncio.timeout(conn.socket_timeout):
                    replies = await _read_replies(conn, len(futures) + 2)
                self._in_flight.popleft()
                try:
                    ids = _exec_ids(replies)
                except redis_exc.RedisError as exc:  # the server refused this batch
                    _fail_all(futures, self._fail(exc))
                    continue
                get_observer().on_published(self.stream, len(ids))
                for future, msg_id in zip(futures, ids, strict=True):
                    if not future.done():
                        future.set_result(msg_id)
        except BaseException as exc:
            # Lost, timed out, cancelled (or a bug): what was written may or may not have been
            # applied, and the connection's state is unknown. Every waiting caller is told.
            if conn is not None:
                await conn.disconnect(nowait=True)
            error: BaseException | None
            if isinstance(exc, TimeoutError):
                error = self._fail(redis_exc.TimeoutError("Timeout reading a batch's replies"))
            elif isinstance(exc, redis_exc.RedisError | OSError):
                error = self._fail(exc)
            elif isinstance(exc, Exception):
                error = exc
            else:
                error = None  # cancelled: so are the callers
            for futures in self._in_flight:
                _fail_all(futures, error)
            self._in_flight.clear()
            _fail_all([future for _, future in self._waiting], error)
            self._waiting.clear()
            if error is None:
                raise
        finally:
            self._pipe = None
            if conn is not None:
                await pool.release(conn)
            self._busy = False
            self._flusher = None

    def _write_waiting(self) -> None:
        """Write what waits as one batch on the held connection (no await: buffered)."""
        writer = getattr(self._pipe, "_writer", None)
        if writer is None or writer.is_closing():
            return  # the flusher finds out when it reads, and fails what is in flight
        batch = self._waiting[:MAX_BATCH]
        del self._waiting[:MAX_BATCH]
        writer.write(self._pack_batch(text for text, _ in batch))
        self._in_flight.append([future for _, future in batch])

    async def _send_text_batch(self, entries: Sequence[tuple[int, str]]) -> list[str]:
        """One atomic round trip writing ``entries`` (from ``encode_event_resp``) in order;
        returns their ids."""
        return await self._send_transaction([self._pack_batch(entries)], len(entries))

    def _pack_batch(self, entries: Iterable[tuple[int, str]]) -> bytes:
        """``MULTI``, one XADD per encoded event, ``EXEC``, as one RESP payload."""
        head, base = self._xadd_head()
        parts = [_MULTI]
        for nargs, body in entries:
            parts.append(f"*{base + nargs}\r\n{head}{body}")
        parts.append(_EXEC)
        return "".join(parts).encode()

    async def _send_transaction(self, pieces: Iterable[bytes], commands: int) -> list[str]:
        """Run a transaction of ``commands`` XADDs written as ``pieces``; returns the ids."""
        try:
            # MULTI's +OK, one +QUEUED per command, then EXEC's reply
            reply = _exec_ids(await self._exchange(pieces, commands + 2))
        except (redis_exc.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        get_observer().on_published(self.stream, commands)
        return reply

    def _streamed_batch(self, events: Sequence[Mapping[str, Any]], traceparent: str | None,
                        tracestate: str | None) -> Iterator[bytes]:
        """``MULTI``, one XADD per event and ``EXEC`` as RESP, encoded a chunk at a time.

        Written while the rest is still being encoded, the first XADDs are parsed and queued by
        the server meanwhile. An event that fails validation raises here before ``EXEC`` is
        written; the connection is then dropped, which discards the transaction.
        """
        head, base = self._xadd_head()
        parts = [_MULTI]
        for index, event in enumerate(events):
            nargs, body = self._encode_item(index, event, traceparent, tracestate)
            parts.append(f"*{base + nargs}\r\n{head}{body}")
            if len(parts) >= _STREAM_CHUNK:
                yield "".join(parts).encode()
                parts = []
        parts.append(_EXEC)
        yield "".join(parts).encode()

    async def _exchange(self, pieces: Iterable[bytes], count: int) -> list[Any]:
        """Write packed commands on a pooled connection and read ``count`` replies (error
        replies are returned as exception objects, not raised).

        ``pieces`` may be produced lazily (see ``_streamed_batch``); if producing them raises
        once something was written, the connection is dropped with whatever it had open. The
        replies are read under ONE timeout (see ``_read_replies``). A connection whose replies
        were not all read is disconnected, so no reply is ever left for its next user.
        """
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        written = False
        try:
            try:
                for piece in pieces:
                    await conn.send_packed_command(piece, not written)
                    written = True
            except BaseException:
                if written:  # an open MULTI must not go back to the pool
                    await conn.disconnect(nowait=True)
                raise
            try:
                async with asyncio.timeout(conn.socket_timeout):
                    replies = await _read_replies(conn, count)
            except TimeoutError:
                await conn.disconnect(nowait=True)
                raise redis_exc.TimeoutError("Timeout reading a batch's replies") from None
            except redis_exc.RedisError:
                await conn.disconnect(nowait=True)
                raise
            except OSError as exc:
                await conn.disconnect(nowait=True)
                raise redis_exc.ConnectionError(f"Error while reading a batch's replies: "
                                                f"{exc}") from exc
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
        finally:
            await pool.release(conn)
        return replies

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
        """Append many events atomically, in one round trip per 1,000; returns their ids in
        order.

        Each mapping holds a ``type`` and the event's fields. Everything is validated before
        anything is written, so one bad event publishes nothing.
        """
        if isinstance(events, Mapping | str | bytes):
            raise InvalidArgumentError("publish_many takes a list of event mappings")
        events = events if isinstance(events, list | tuple) else list(events)
        if not events:
            return []
        traceparent, tracestate = current_trace_headers()
        if len(events) <= MAX_BATCH:
            return await self._send_transaction(
                self._streamed_batch(events, traceparent, tracestate), len(events))
        encoded = [self._encode_item(index, event, traceparent, tracestate)
                   for index, event in enumerate(events)]
        ids: list[str] = []
        for start in range(0, len(encoded), MAX_BATCH):
            ids.extend(await self._send_text_batch(encoded[start:start + MAX_BATCH]))
        return ids

    def _encode_item(self, index: int, event: Mapping[str, Any], traceparent: str | None,
                     tracestate: str | None) -> tuple[int, str]:
        """Validate and encode the ``index``-th mapping given to ``publish_many``."""
        if type(event) is not dict and not isinstance(event, Mapping):  # dict: no ABC check
            raise InvalidArgumentError(f"event #{index} is a {type(event).__name__}, "
                                       "not a mapping")
        if "type" not in event:
            raise InvalidArgumentError(f"event #{index} has no 'type'")
        try:
            return encode_resp(event["type"], event, True, self.max_event_bytes, None, None,
                               traceparent, tracestate, self.stream)
        except AgentStreamsError as exc:
            exc.add_note(f"in event #{index} of the batch given to publish_many")
            raise

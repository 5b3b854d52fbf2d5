"""The transport: the one module that writes to Redis outside redis-py's public API.

Publishing packs its own RESP (one ``str.encode`` for a whole batch: redis-py's per-argument
packing costs more than the XADD behind it) and reads the replies straight from the hiredis
reader (the parser's per-reply coroutine would cost more than the XADD, too). Everything that
needs redis-py's private internals for that is here, behind a small API:

``checkout(pool)``
    A pooled connection that is safe to write to: one that the server closed (or that holds
    unread data) while it sat idle in the pool is replaced first. redis-py 8.1 skips this
    check when maintenance notifications are on, which they are by default ("auto").
``CheckedConnectionPool``
    A redis-py pool doing the same check on every checkout, so redis-py's own command paths
    on the clients ``create_client`` makes never write on a dead idle connection either.
``replace_if_broken(conn)``
    The check itself: disconnect a connection that died or holds unread data.
``exchange(pool, payload, replies, timeout_s=...)``
    One write-then-read round trip on a checked-out connection, all of it within
    ``timeout_s`` (time spent producing a lazy payload does not count).
``Pipe``
    A connection held for pipelined batches: written without awaiting, replies read in order.
``MaybeWrittenError``
    What ``exchange`` raises when the connection failed after bytes were handed to the
    socket: the server may have applied them. A redis-py ``ConnectionError``/``TimeoutError``
    raised instead means nothing was written.

The private internals used are listed in ``INTERNALS`` (a test pins each). When one is missing
(another redis-py layout, no hiredis), ``fast_path_problem()`` says why and the transport uses
redis-py's public ``send_packed_command``/``read_response`` instead: slower, same behaviour.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Iterable
from typing import Any, Final

import redis.exceptions as redis_exc
from redis.asyncio.connection import ConnectionPool

__all__ = [
    "INTERNALS",
    "CheckedConnectionPool",
    "MaybeWrittenError",
    "Pipe",
    "checkout",
    "exchange",
    "fast_path_problem",
    "read_replies",
    "replace_if_broken",
]

#: The private parts of redis-py the fast path relies on (tests/test_transport_internals.py).
INTERNALS: Final = (
    "redis._parsers.hiredis.NOT_ENOUGH_DATA: what the hiredis reader returns for a partial reply",
    "redis._parsers.hiredis._AsyncHiredisParser._reader: the hiredis.Reader of a connection",
    "redis._parsers.hiredis._AsyncHiredisParser.read_from_socket(): feed it from the socket",
    "redis._parsers.hiredis._AsyncHiredisParser._connected: False once disconnected",
    "redis._parsers.hiredis._AsyncHiredisParser._hiredis_PushNotificationType (optional)",
    "redis.asyncio.connection.AbstractConnection._parser / ._writer (asyncio.StreamWriter)",
    "AbstractConnection.can_read() (can_read_destructive() before redis-py 8): True (or "
    "ConnectionError) when an idle connection holds data or reached EOF",
)

#: Reply written for a closed connection (the words redis-py uses).
_CLOSED = "Connection closed by server."


def _probe() -> tuple[object | None, str | None]:
    """The hiredis reader's "incomplete reply" marker, or why the fast path is off."""
    try:
        import hiredis  # noqa: F401  (the fast path reads from its Reader)
        from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
        from redis.asyncio.connection import AbstractConnection
    except ImportError as exc:
        return None, f"hiredis or redis._parsers.hiredis is missing ({exc})"
    for name in ("read_from_socket", "on_connect", "on_disconnect"):
        if not callable(getattr(_AsyncHiredisParser, name, None)):
            return None, f"redis-py's _AsyncHiredisParser has no {name}()"
    if not (hasattr(AbstractConnection, "can_read")
            or hasattr(AbstractConnection, "can_read_destructive")):
        return None, "redis-py's AbstractConnection has neither can_read() nor " \
                     "can_read_destructive()"
    return NOT_ENOUGH_DATA, None


_NOT_ENOUGH_DATA, _PROBLEM = _probe()


def fast_path_problem() -> str | None:
    """Why the fast path is off with the installed redis-py (None: it is on)."""
    return _PROBLEM


class MaybeWrittenError(Exception):
    """The connection failed after the request was handed to the socket: the server may
    have applied it. ``cause`` is the redis-py (or OS) error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# --------------------------------------------------------------------------- connections


async def _can_read(conn: Any) -> bool:
    """redis-py's "data or EOF on the socket" check. Before redis-py 8 it was
    ``can_read_destructive()``: it consumes what it finds and raises on EOF, which is fine
    for an idle connection (data or EOF both mean it is replaced)."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    return bool(await check())


_HAS_POLL = hasattr(select, "poll")


def _socket_readable(writer: Any) -> bool:
    """True when the kernel holds data or EOF the event loop has not read yet (the server
    closed the connection since the loop last ran): one ``select`` with no wait."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    if not _HAS_POLL:  # pragma: no cover - Windows
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()  # cheaper than select() for one descriptor
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def replace_if_broken(conn: Any) -> None:
    """Disconnect ``conn`` if it cannot be written to safely, so the next write reconnects.

    An idle connection has nothing to read: data means a reply someone left unread, EOF or a
    closed transport means the server (or a proxy, or a failover) dropped it. Nothing was
    sent on it yet, so a fresh connection is always safe.
    """
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return  # not connected: the next write connects
    try:
        broken = writer.is_closing() or await _can_read(conn) or _socket_readable(writer)
    except (redis_exc.ConnectionError, OSError, ValueError):
        broken = True
    if broken:
        await conn.disconnect(nowait=True)


class CheckedConnectionPool(ConnectionPool):
    """A connection pool that never hands out a connection that died (or got unread data)
    while idle: redis-py's own check is skipped in 8.1 when maintenance notifications are on
    (the default, "auto"), and a command written on such a connection fails, or is retried
    by redis-py only if retries are configured (a worker's client has none).

    ``create_client`` builds clients on it, so every redis-py command path (XACK,
    XREADGROUP, scripts) gets a live connection.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A pooled connection, replaced first if it died while idle (see the class)."""
        conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        try:
            await replace_if_broken(conn)
            if not conn.is_connected:
                await conn.connect()
        except BaseException:
            await self.release(conn)
            raise
        return conn


async def checkout(pool: Any) -> Any:
    """A connected pooled connection, replaced first if it died while idle; PINGed first when
    its health-check interval passed. Give it back with ``pool.release``."""
    conn = await pool.get_connection()
    try:
        if not isinstance(pool, CheckedConnectionPool):  # that one checked already
            await replace_if_broken(conn)
            if not conn.is_connected:
                await conn.connect()
        await conn.check_health()
    except BaseException:
        await pool.release(conn)
        raise
    return conn


async def _send(conn: Any, data: bytes) -> None:
    writer = getattr(conn, "_writer", None) if _PROBLEM is None else None
    if writer is None:
        await conn.send_packed_command(data, False)
        return
    writer.write(data)
    await writer.drain()


async def read_replies(conn: Any, count: int) -> list[Any]:
    """Read ``count`` replies; error replies are returned as exception objects, not raised.

    With hiredis, replies already received are taken straight from its reader (one C call
    each) and the socket is read only when the reader runs dry. Otherwise one public
    ``read_response`` per reply.
    """
    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or _PROBLEM is not None:
        return await _read_replies_slowly(conn, count)
    if not getattr(parser, "_connected", True):
        raise redis_exc.ConnectionError(_CLOSED)
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


async def _read_replies_slowly(conn: Any, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except redis_exc.ResponseError as exc:  # the reply was consumed; keep reading
            replies.append(exc)
    return replies


# --------------------------------------------------------------------------- round trips


async def exchange(pool: Any, payload: bytes | Iterable[bytes], replies: int, *,
                   timeout_s: float, gated: bool = False) -> list[Any]:
    """Write ``payload`` on a pooled connection and read ``replies`` replies (error replies
    are returned as exception objects), everything within ``timeout_s``.

    ``payload`` is the packed RESP, or pieces of it produced lazily (written as they come;
    time spent producing them does not count against the timeout). If producing a piece
    raises, the connection is dropped (with whatever it had open, e.g. a ``MULTI``) and the
    exception propagates unchanged. With ``gated``, the first piece is one command written on
    its own; when its reply is an error, nothing more is written and ``[error]`` is returned.

    Raises a redis-py ``ConnectionError``/``TimeoutError`` (or ``OSError``) when nothing was
    written, ``MaybeWrittenError`` when the connection failed after something was. A
    connection whose replies were not all read never goes back to the pool usable.
    """
    loop = asyncio.get_running_loop()
    conn: Any = None
    written = False
    producing = False
    out: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            conn = await checkout(pool)
            if isinstance(payload, bytes):
                written = True
                await _send(conn, payload)
            else:
                pieces = iter(payload)
                while True:
                    started = loop.time()
                    producing = True
                    piece = next(pieces, None)
                    producing = False
                    if piece is None:
                        break
                    when = deadline.when()
                    if when is not None:  # encoding is not waiting for the server
                        deadline.reschedule(when + loop.time() - started)
                    written = True
                    await _send(conn, piece)
                    if gated:
                        gated = False
                        out = await read_replies(conn, 1)
                        replies -= 1
                        if isinstance(out[0], Exception):
                            return out
            out.extend(await read_replies(conn, replies))
        return out
    except BaseException as exc:
        if conn is not None and written:
            await conn.disconnect(nowait=True)
        if producing or not isinstance(exc, redis_exc.RedisError | OSError):
            raise  # the caller's own error, or cancelled: passed on unchanged
        if isinstance(exc, TimeoutError):  # our deadline (builtin, not redis-py's)
            timeout = redis_exc.TimeoutError(f"no reply from the server within {timeout_s}s")
            if written:
                raise MaybeWrittenError(timeout) from exc
            raise timeout from exc
        if written:
            raise MaybeWrittenError(exc) from exc
        raise
    finally:
        if conn is not None:
            await pool.release(conn)


class Pipe:
    """A pooled connection held for pipelined batches.

    ``write`` hands a batch to the socket without awaiting (so callers can write while
    others encode); ``read`` returns replies in the order the batches were written.
    ``close`` gives the connection back, dropping it unless every reply was read.
    """

    def __init__(self, pool: Any, conn: Any) -> None:
        self._pool = pool
        self._conn = conn
        self._writer: Any = getattr(conn, "_writer", None) if _PROBLEM is None else None
        #: Batches waiting to be sent by ``flush`` (slow path only: no buffered write).
        self._unsent: list[bytes] = []
        #: True once something was handed to the socket (a failure may then have landed).
        self.written = False

    @classmethod
    async def open(cls, pool: Any) -> Pipe:
        """Check out a connection (see ``checkout``) and hold it."""
        return cls(pool, await checkout(pool))

    def write(self, data: bytes) -> bool:
        """Send ``data`` (buffered, no await). False when the connection is already closing:
        then nothing was written."""
        writer = self._writer
        if writer is None:
            self._unsent.append(data)
        elif writer.is_closing():
            return False
        else:
            writer.write(data)
        self.written = True
        return True

    async def flush(self) -> None:
        """Wait until the socket takes what was written (backpressure from a slow server)."""
        if self._writer is not None:
            await self._writer.drain()
            return
        while self._unsent:
            await self._conn.send_packed_command(self._unsent.pop(0), False)

    async def read(self, count: int) -> list[Any]:
        """The next ``count`` replies (error replies as exception objects)."""
        return await read_replies(self._conn, count)

    async def close(self, *, clean: bool) -> None:
        """Give the connection back; drop it first unless ``clean`` (every reply read)."""
        try:
            if not clean:
                await self._conn.disconnect(nowait=True)
        finally:
            await self._pool.release(self._conn)

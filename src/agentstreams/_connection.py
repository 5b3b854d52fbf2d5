"""The one place that turns a URL (or an existing client) into a redis-py asyncio client.

It also owns the error translation (redis-py exceptions -> agentstreams.errors) and the
reconnect backoff policy, so every layer above handles faults the same way.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from agentstreams._constants import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_CAP_S,
)
from agentstreams._transport import CheckedConnectionPool
from agentstreams.errors import (
    AgentStreamsError,
    AuthenticationError,
    BackpressureError,
    ConfigurationError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    PermissionDeniedError,
    TLSError,
    WrongTypeError,
)

__all__ = [
    "Backoff",
    "ConnectionSettings",
    "Redis",
    "TLSKwargs",
    "call",
    "create_client",
    "is_permanent",
    "redact_url",
    "translate_error",
]

Redis = aioredis.Redis
T = TypeVar("T")

SUPPORTED_SCHEMES = ("redis", "rediss", "unix")
_REFUSED_WRITE_ERRORS = (redis_exc.OutOfMemoryError, redis_exc.ReadOnlyError,
                         redis_exc.MasterDownError)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (never log credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if parts.password is not None:
        # Rewrite only the user-info part, so an IPv6 host keeps its brackets.
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    # redis-py also takes the password as a query parameter (?password=...).
    query = "&".join(
        f"{item.split('=', 1)[0]}=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
    ) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return url
    # Not urlunsplit: it turns unix:///path into unix:/path.
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


class TLSKwargs(TypedDict, total=False):
    """TLS keyword arguments every entry point takes (``rediss://`` URLs only); the same as
    the URL's ``ssl_*`` query parameters (which win when both are given)."""

    #: the CA bundle that signs the server's certificate
    ssl_ca_certs: str
    #: client certificate and key, for mutual TLS
    ssl_certfile: str
    ssl_keyfile: str
    #: "required" (the default), "optional" or "none"
    ssl_cert_reqs: str


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """How to reach the server; rejects impossible values when built."""

    url: str = "redis://localhost:6379"
    #: Socket timeout for ordinary commands; blocking reads get their own, longer one.
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    #: How often an idle pooled connection is PINGed before reuse (0 = never).
    health_check_interval_s: float = 15.0
    #: Retries redis-py makes on a connection error before we see it (a write may then land twice;
    #: event ids and idempotency keys make that harmless).
    command_retries: int = 2
    max_connections: int | None = None
    client_name: str | None = None
    #: TLS (``rediss://`` only), the same as the URL's ``ssl_*`` query parameters: the CA
    #: bundle to trust, a client certificate and key (mutual TLS), and whether the server's
    #: certificate is checked (``required``, the default; ``optional``; ``none``).
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise InvalidArgumentError("redis_url must be a non-empty string like "
                                       "'redis://localhost:6379'")
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme not in SUPPORTED_SCHEMES:
            raise InvalidArgumentError(
                f"unsupported URL {redact_url(self.url)!r}: use redis://, rediss:// (TLS) or "
                "unix:///path/to/socket"
            )
        for name in ("socket_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise InvalidArgumentError(f"{name} must be a positive number, got {value!r}")
        if self.health_check_interval_s < 0:
            raise InvalidArgumentError("health_check_interval_s must be >= 0")
        if self.command_retries < 0:
            raise InvalidArgumentError("command_retries must be >= 0")
        self._check_tls(scheme)

    def _check_tls(self, scheme: str) -> None:
        options = self.tls_options()
        if not options:
            return
        if scheme != "rediss":
            raise InvalidArgumentError(
                f"{', '.join(options)} need a rediss:// URL (TLS); got {redact_url(self.url)!r}")
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            path = options.get(name)
            if path is not None and not os.path.isfile(path):
                raise InvalidArgumentError(f"{name}: no such file {path!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise InvalidArgumentError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        if self.ssl_cert_reqs is not None and self.ssl_cert_reqs not in (
                "none", "optional", "required"):
            raise InvalidArgumentError(
                f"ssl_cert_reqs must be 'none', 'optional' or 'required', got "
                f"{self.ssl_cert_reqs!r}")

    def tls_options(self) -> dict[str, str]:
        """The TLS keyword arguments that are set, for redis-py."""
        values = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
                  "ssl_keyfile": self.ssl_keyfile, "ssl_cert_reqs": self.ssl_cert_reqs}
        return {name: value for name, value in values.items() if value is not None}


class _WriteTimeoutWithoutTask:
    """Bounds socket writes with ``asyncio.timeout`` instead of redis-py's ``wait_for``.

    redis-py wraps every write in ``asyncio.wait_for`` when a socket timeout is set: one extra
    task per command (about a tenth of a publish's cost), and on Python 3.11 a ``wait_for`` can
    swallow the cancellation of the task that awaits it. ``asyncio.timeout`` bounds the write
    the same way without either. Reads keep redis-py's own timeout.
    """

    socket_timeout: float | None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        self.socket_timeout = None  # the parent then writes directly, without wait_for
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:
            raise redis_exc.TimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


class _TcpConnection(_WriteTimeoutWithoutTask, aioredis.Connection):
    """TCP connection with task-free write timeouts."""


#: A TLS handshake still unanswered after this long makes us ask the port in plain text
#: whether it is a plain Redis: rediss:// to a plain server otherwise waits out the whole
#: connect timeout and ends in a bare "Timeout connecting".
PLAIN_TEXT_PROBE_AFTER_S = 0.3
PLAIN_TEXT_PROBE_TIMEOUT_S = 0.5


async def _answers_plain_text(host: str, port: int) -> bool:
    """True when ``host:port`` answers a plain-text PING the way a Redis server does."""
    try:
        async with asyncio.timeout(PLAIN_TEXT_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                reply = await reader.read(64)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return reply[:1] in (b"+", b"-")  # +PONG, or -NOAUTH / -ERR from a plain server


class _TlsConnection(_WriteTimeoutWithoutTask, aioredis.SSLConnection):
    """TLS connection with task-free write timeouts, which tells a plain-text server apart
    from a slow handshake (and says so, as an ``ssl.SSLError``) instead of timing out."""

    host: str
    port: int

    async def _connect(self) -> None:
        attempt = asyncio.ensure_future(super()._connect())  # type: ignore[no-untyped-call]
        try:
            done, _ = await asyncio.wait({attempt}, timeout=PLAIN_TEXT_PROBE_AFTER_S)
            if not done and await _answers_plain_text(self.host, self.port):
                raise ssl.SSLError(
                    f"no TLS handshake from {self.host}:{self.port}, which answers plain-text "
                    "Redis commands: use redis:// for this port (or rediss:// with its TLS "
                    "port)")
            await attempt
        finally:
            if not attempt.done():
                attempt.cancel()


class _UnixConnection(_WriteTimeoutWithoutTask, aioredis.UnixDomainSocketConnection):
    """Unix-socket connection with task-free write timeouts."""


_CONNECTION_CLASSES: dict[type[Any], type[Any]] = {
    aioredis.Connection: _TcpConnection,
    aioredis.SSLConnection: _TlsConnection,
    aioredis.UnixDomainSocketConnection: _UnixConnection,
}


def create_client(settings: ConnectionSettings, **overrides: Any) -> Redis:
    """A new asyncio client that returns bytes (we decode per field, never per reply)."""
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "health_check_interval": settings.health_check_interval_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5),
                       settings.command_retries),
        "retry_on_error": [redis_exc.ConnectionError, redis_exc.TimeoutError],
    }
    if not settings.url.lower().startswith("unix://"):
        # TCP only: redis-py's unix-socket connections reject this argument.
        kwargs["socket_keepalive"] = True
    if settings.max_connections is not None:
        kwargs["max_connections"] = settings.max_connections
    if settings.client_name:
        kwargs["client_name"] = settings.client_name
    kwargs.update(settings.tls_options())  # (the URL's own ssl_* parameters win)
    kwargs.update(overrides)
    try:
        # Our pool: it never hands out a connection that died while idle (see its docstring).
        pool = CheckedConnectionPool.from_url(settings.url, **kwargs)
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid redis URL {redact_url(settings.url)!r}: {exc}") \
            from exc
    pool.connection_class = _CONNECTION_CLASSES.get(pool.connection_class,
                                                    pool.connection_class)
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as from_url does: aclose() closes the pool
    return client


#: Phrases of the replies a denied command or key gets (plain, or raised inside a script).
_DENIED_PHRASES = ("noperm", "no permissions to", "can't run this command",
                   "can't access at least one of the keys", "acl failure")
_AUTH_PHRASES = ("wrongpass", "noauth", "invalid username-password pair",
                 "authentication required", "invalid password")


def _ssl_error_in(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind a connection error (redis-py wraps it), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _configuration_error(exc: BaseException, *, stream: str | None,
                         group: str | None) -> ConfigurationError | None:
    """The permanent error ``exc`` stands for (credentials, ACL, TLS), or None."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, redis_exc.AuthenticationError) or (
            isinstance(exc, redis_exc.ResponseError) and any(p in lowered for p in _AUTH_PHRASES)):
        return AuthenticationError(
            f"the server refused the credentials ({text}); check the user name and password "
            "in the URL", stream=stream, group=group)
    if isinstance(exc, redis_exc.NoPermissionError) or (
            isinstance(exc, redis_exc.ResponseError)
            and any(p in lowered for p in _DENIED_PHRASES)):
        match = re.search(r"run the '([^']+)' command", text)
        command = match.group(1).upper() if match else None
        what = f"the {command} command" if command else (
            "a key" if "key" in text else "a command run by a server-side script")
        return PermissionDeniedError(
            f"the server's ACL denies {what} to this user ({text}); grant it (see "
            "`agentstreams acl`) or use a user that has it", command=command, stream=stream,
            group=group)
    if isinstance(exc, redis_exc.ConnectionError | OSError):
        tls = _ssl_error_in(exc)
        if tls is not None or "SSL" in text or "certificate verify failed" in text:
            return TLSError(
                f"TLS failed ({tls or text}); check the CA (ssl_ca_certs), the client "
                "certificate and that rediss:// points at a TLS port (and redis:// at a plain "
                "one)", stream=stream, group=group)
    return None


def is_permanent(exc: BaseException) -> bool:
    """True for errors that retrying cannot fix (misconfiguration, a wrong key type)."""
    return isinstance(exc, ConfigurationError | WrongTypeError)


def translate_error(exc: BaseException, *, stream: str | None = None,
                    group: str | None = None) -> BaseException:
    """Map a redis-py exception to our hierarchy; other exceptions pass through unchanged."""
    if isinstance(exc, AgentStreamsError):
        return exc
    permanent = _configuration_error(exc, stream=stream, group=group)
    if permanent is not None:
        return permanent
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError | OSError):
        # redis-py says "Error 111 connecting to ..." or "Timeout connecting to server"
        if "connecting" in str(exc):
            return ConnectionLostError(
                f"cannot reach the server ({type(exc).__name__}: {exc}); is it running and "
                "is the URL right? The operation can be retried", stream=stream, group=group)
        return ConnectionLostError(
            f"lost the connection to the server ({type(exc).__name__}: {exc}); "
            "the operation can be retried", stream=stream, group=group)
    if isinstance(exc, redis_exc.ResponseError):
        text = str(exc)
        if text.startswith("NOGROUP"):
            return GroupNotFoundError(
                f"consumer group {group!r} does not exist on stream {stream!r}; call "
                "initialize() (or create it with XGROUP CREATE ... MKSTREAM)",
                stream=stream, group=group)
        if text.startswith("UNBLOCKED"):
            # Redis 7 ends a blocked XREADGROUP this way when the stream is deleted (the group
            # went with it); CLIENT UNBLOCK ... ERROR also lands here: the read can be retried.
            if "no longer exists" in text:
                return GroupNotFoundError(
                    f"stream {stream!r} was deleted (with consumer group {group!r}) during a "
                    "blocking read", stream=stream, group=group)
            return ConnectionLostError(f"the server ended a blocking read ({text}); retry it",
                                       stream=stream, group=group)
        if text.startswith("WRONGTYPE"):
            return WrongTypeError(f"key {stream!r} holds a value that is not a stream",
                                  stream=stream, group=group)
        # redis-py turns OOM / READONLY / MASTERDOWN replies into subclasses and strips the code
        # from the message, so check the class as well as the text.
        if isinstance(exc, _REFUSED_WRITE_ERRORS) or text.startswith(
                ("OOM", "READONLY", "MASTERDOWN", "LOADING", "BUSY ")):
            return BackpressureError(
                f"the server refused the write ({text}); slow down or free memory",
                stream=stream, group=group)
    return exc


async def call(coro_fn: Callable[[], Awaitable[T]], *, stream: str | None = None,
               group: str | None = None) -> T:
    """Await ``coro_fn()`` and translate redis-py errors into agentstreams errors."""
    try:
        return await coro_fn()
    except (redis_exc.RedisError, OSError) as exc:
        raise translate_error(exc, stream=stream, group=group) from exc


class Backoff:
    """Exponential backoff with full jitter, for reconnect loops."""

    def __init__(self, base_s: float = RECONNECT_BACKOFF_BASE_S,
                 cap_s: float = RECONNECT_BACKOFF_CAP_S) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise InvalidArgumentError("backoff needs 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        """Delay before the next attempt; grows until it reaches the cap."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Call after a success."""
        self.attempt = 0

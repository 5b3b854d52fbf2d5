"""The one exception hierarchy of agentstreams.

* AgentStreamsError — root; every error we raise on purpose derives from it.
  * InvalidArgumentError (also ValueError) — a caller passed something we cannot use.
    * SerializationError — a payload value cannot be encoded as JSON.
    * PayloadTooLargeError — an event is bigger than the configured limit.
    * IdempotencyConflictError — an idempotency key reused for a different event.
  * ConnectionLostError — the server is unreachable or stopped answering; safe to retry.
    * PublishTimeoutError — a publish may or may not have landed; retry with an idempotency key.
  * ConfigurationError — the deployment is misconfigured; retrying cannot help (never retried).
    * AuthenticationError — wrong or missing user name or password.
    * PermissionDeniedError — an ACL denies a command or a key (NOPERM); names the command.
    * TLSError — a TLS handshake or certificate check failed (or TLS met a plain-text port).
  * BackpressureError — the server refused a write (out of memory, read-only replica).
  * GroupNotFoundError — the consumer group (or its stream) does not exist (NOGROUP).
  * WrongTypeError — a key holds something other than a stream.
  * MalformedEventError — a stream entry cannot be decoded; carries the raw fields.
  * ClosedError — the object was closed and cannot be used again.
  * WorkerFailedError — a worker's background task kept failing; the worker stopped.
  * RequestTimeoutError (also TimeoutError) — ``request()`` got no reply within ``timeout_s``;
    the request may still be handled (a reply arriving later is ignored).

Errors that correspond to a server reply also derive from the matching redis-py exception
(``redis.exceptions.ConnectionError`` / ``ResponseError``), so code written against the
reference implementation keeps catching them.

Handlers steer the worker with two control exceptions that are not failures:
``Retry(delay_s)`` asks for a later redelivery, ``Reject(reason)`` dead-letters at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.exceptions as _redis_exc

__all__ = [
    "AgentStreamsError",
    "AuthenticationError",
    "BackpressureError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionLostError",
    "GroupNotFoundError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "MalformedEventError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishTimeoutError",
    "Reject",
    "RequestTimeoutError",
    "Retry",
    "SerializationError",
    "TLSError",
    "WorkerFailedError",
    "WrongTypeError",
]


class AgentStreamsError(Exception):
    """Root of every error agentstreams raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        stream: str | None = None,
        group: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.group = group
        self.msg_id = msg_id


class InvalidArgumentError(AgentStreamsError, ValueError):
    """An argument is invalid; the message says which one and what to pass instead."""


class SerializationError(InvalidArgumentError):
    """A payload value cannot be represented losslessly as JSON."""


class PayloadTooLargeError(InvalidArgumentError):
    """An encoded event exceeds ``max_event_bytes``."""

    def __init__(self, message: str, *, size: int, limit: int, stream: str | None = None) -> None:
        super().__init__(message, stream=stream)
        self.size = size
        self.limit = limit


class IdempotencyConflictError(InvalidArgumentError):
    """An ``idempotency_key`` already published a different event within its window: a retry
    must repeat the same event; a new event needs a new key. ``first_id`` is what the key
    published."""

    def __init__(self, message: str, *, first_id: str, stream: str | None = None) -> None:
        super().__init__(message, stream=stream)
        self.first_id = first_id


class ConnectionLostError(AgentStreamsError, _redis_exc.ConnectionError):
    """The server could not be reached or stopped answering; the operation may be retried."""


class PublishTimeoutError(ConnectionLostError):
    """A publish got no reply: it may have been written. Retry with an ``idempotency_key``."""


class ConfigurationError(AgentStreamsError):
    """The deployment is misconfigured (credentials, ACLs, TLS): fix it; retrying cannot help.

    Loops that retry transient faults (a restarting server, a lost connection) never retry
    these: a worker stops and ``run()`` raises, so the fault is seen instead of idling.
    """


class AuthenticationError(ConfigurationError):
    """The server refused the user name or password (or wants one and got none)."""


class PermissionDeniedError(ConfigurationError, _redis_exc.ResponseError):
    """An ACL denies a command or a key (NOPERM). ``command`` names it when the server said.

    See ``agentstreams acl`` for the rules each role needs.
    """

    def __init__(self, message: str, *, command: str | None = None, stream: str | None = None,
                 group: str | None = None) -> None:
        super().__init__(message, stream=stream, group=group)
        self.command = command


class TLSError(ConfigurationError):
    """A TLS handshake or certificate check failed, or TLS met a plain-text port (or the
    reverse): check the URL scheme, the CA and the client certificate."""


class BackpressureError(AgentStreamsError, _redis_exc.ResponseError):
    """The server refused a write (OOM under ``noeviction``, read-only replica); slow down."""


class GroupNotFoundError(AgentStreamsError, _redis_exc.ResponseError):
    """The consumer group or its stream does not exist (the server answered NOGROUP)."""


class WrongTypeError(AgentStreamsError, _redis_exc.ResponseError):
    """A key that should hold a stream holds another type."""


class ClosedError(AgentStreamsError, RuntimeError):
    """The object was closed; create a new one."""


class WorkerFailedError(AgentStreamsError):
    """A background task of a worker kept failing unexpectedly, so the worker stopped instead
    of idling; ``__cause__`` is the last failure (its traceback was logged each time)."""


class RequestTimeoutError(AgentStreamsError, TimeoutError):
    """No reply to a ``request()`` arrived within ``timeout_s``. The request was published
    and may still be handled; a reply that arrives later is ignored (and counted).
    ``request_id`` names it (a reply's ``_eid``); ``timeout_s`` is how long it waited."""

    def __init__(self, message: str, *, request_id: str, timeout_s: float,
                 stream: str | None = None) -> None:
        super().__init__(message, stream=stream)
        self.request_id = request_id
        self.timeout_s = timeout_s


class MalformedEventError(AgentStreamsError):
    """A stream entry that cannot be decoded into an event.

    ``fields`` holds the entry exactly as read (bytes keys and values), ``reason`` says why.
    """

    def __init__(
        self,
        reason: str,
        *,
        fields: Mapping[bytes, bytes] | None = None,
        stream: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        super().__init__(f"malformed event {msg_id or ''}: {reason}".strip(), stream=stream,
                         msg_id=msg_id)
        self.reason = reason
        self.fields: dict[bytes, bytes] = dict(fields or {})


class Retry(Exception):
    """Raised by a handler to ask for redelivery after ``delay_s`` (counts as a delivery)."""

    def __init__(self, delay_s: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {delay_s}s")
        self.delay_s = delay_s
        self.reason = reason


class Reject(Exception):
    """Raised by a handler to dead-letter the event now, without further attempts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

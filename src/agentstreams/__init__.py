"""agentstreams: reliable coordination for AI agents across processes over Redis Streams."""

from agentstreams._connection import TLSKwargs
from agentstreams._coordinator import AgentCoordinator
from agentstreams._dlq import DeadLetter, DeadLetterQueue
from agentstreams._events import Event, EventType
from agentstreams._observe import Observer, get_observer, set_observer
from agentstreams._publisher import Publisher, StreamCap
from agentstreams._reply import RequestStats
from agentstreams._retention import TrimResult, trim
from agentstreams._worker import Handler, Worker, WorkerStats
from agentstreams.errors import (
    AgentStreamsError,
    AuthenticationError,
    BackpressureError,
    ClosedError,
    ConfigurationError,
    ConnectionLostError,
    GroupNotFoundError,
    IdempotencyConflictError,
    InvalidArgumentError,
    MalformedEventError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishTimeoutError,
    Reject,
    RequestTimeoutError,
    Retry,
    SerializationError,
    TLSError,
    WorkerFailedError,
    WrongTypeError,
)

__version__ = "0.1.0"

__all__ = [
    "AgentCoordinator",
    "AgentStreamsError",
    "AuthenticationError",
    "BackpressureError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionLostError",
    "DeadLetter",
    "DeadLetterQueue",
    "Event",
    "EventType",
    "GroupNotFoundError",
    "Handler",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "MalformedEventError",
    "Observer",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishTimeoutError",
    "Publisher",
    "Reject",
    "RequestStats",
    "RequestTimeoutError",
    "Retry",
    "SerializationError",
    "StreamCap",
    "TLSError",
    "TLSKwargs",
    "TrimResult",
    "Worker",
    "WorkerFailedError",
    "WorkerStats",
    "WrongTypeError",
    "__version__",
    "get_observer",
    "set_observer",
    "trim",
]

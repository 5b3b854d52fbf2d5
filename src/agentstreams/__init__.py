"""agentstreams: reliable coordination for AI agents across processes over Redis Streams."""

from agentstreams.coordinator import AgentCoordinator
from agentstreams.errors import (
    AgentStreamsError,
    BackpressureError,
    ClosedError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    MalformedEventError,
    PayloadTooLargeError,
    PublishTimeoutError,
    Reject,
    Retry,
    SerializationError,
    WrongTypeError,
)
from agentstreams.events import Event, EventType
from agentstreams.runtime.dlq import DeadLetter, DeadLetterQueue
from agentstreams.runtime.publisher import Publisher, StreamCap
from agentstreams.runtime.retention import TrimResult
from agentstreams.runtime.worker import Worker, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "AgentCoordinator",
    "AgentStreamsError",
    "BackpressureError",
    "ClosedError",
    "ConnectionLostError",
    "DeadLetter",
    "DeadLetterQueue",
    "Event",
    "EventType",
    "GroupNotFoundError",
    "InvalidArgumentError",
    "MalformedEventError",
    "PayloadTooLargeError",
    "PublishTimeoutError",
    "Publisher",
    "Reject",
    "Retry",
    "SerializationError",
    "StreamCap",
    "TrimResult",
    "Worker",
    "WorkerStats",
    "WrongTypeError",
    "__version__",
]

"""The event model: what a handler receives and what a publisher describes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from agentstreams._constants import KEY_DELIVERY_COUNT, KEY_EVENT_ID, KEY_MSG_ID
from agentstreams.errors import InvalidArgumentError

__all__ = ["Event", "EventType", "Replier"]

#: Sends the reply to one request (the worker sets it on events that carry reply metadata).
Replier = Callable[[Mapping[str, Any]], Awaitable[str]]


class EventType(str, Enum):
    """The six coordination event types of the reference API (any other string works too)."""

    HANDOFF_READY = "handoff_ready"
    TOOL_RESULT = "tool_result"
    STATE_CHANGED = "state_changed"
    AGENT_STARTED = "agent_started"
    AGENT_COMPLETED = "agent_completed"
    ERROR = "error"


@dataclass(slots=True, eq=False)
class Event(Mapping[str, Any]):
    """One decoded stream entry.

    It is a read-only mapping of the published fields (``event["session_id"]``), plus the
    delivery facts: stream id, event id, format version and how often it was delivered.
    """

    data: dict[str, Any]
    msg_id: str
    stream: str
    event_id: str | None = None
    #: 0 for entries written by the reference implementation (no version marker).
    version: int = 0
    delivery_count: int = 1
    traceparent: str | None = None
    tracestate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set by the ``Worker`` on a request (an event published by ``AgentCoordinator.request``)
    #: (not set otherwise: nothing is stored per ordinary event).
    _replier: Replier | None = field(init=False, repr=False)

    @property
    def type(self) -> str:
        """The event type (``data["type"]``)."""
        return str(self.data["type"])

    @property
    def session_id(self) -> Any:
        """The session id, or None when the event has none."""
        return self.data.get("session_id")

    @property
    def timestamp(self) -> float | None:
        """Producer timestamp (seconds since the epoch), when the producer wrote one."""
        value = self.data.get("timestamp")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def expects_reply(self) -> bool:
        """True for a request (published by ``AgentCoordinator.request``) a handler can
        answer with ``reply``."""
        return getattr(self, "_replier", None) is not None

    async def reply(self, fields: Mapping[str, Any] | None = None) -> str:
        """Answer this request: ``fields`` become the dict the caller's ``request()`` returns.

        Safe to call again (a redelivered request): one reply entry is written per request.
        Returns the reply's stream id. Raises ``InvalidArgumentError`` when the event is not a
        request a ``Worker`` delivered (``expects_reply`` is False).
        """
        replier: Replier | None = getattr(self, "_replier", None)
        if replier is None:
            raise InvalidArgumentError(
                f"event {self.msg_id} carries no (valid) reply metadata: only events published "
                "by AgentCoordinator.request() and delivered by a Worker can be answered "
                "(subscribe users: AgentCoordinator.reply(event, fields))")
        return await replier(fields if fields is not None else {})

    def to_dict(self, *, with_delivery_count: bool = False) -> dict[str, Any]:
        """The reference-compatible dict: the fields plus ``_msg_id`` (and ``_event_id``)."""
        out = dict(self.data)
        out[KEY_MSG_ID] = self.msg_id
        if self.event_id is not None:
            out[KEY_EVENT_ID] = self.event_id
        if with_delivery_count:
            out[KEY_DELIVERY_COUNT] = self.delivery_count
        return out

    def __repr__(self) -> str:
        return (f"Event(type={self.data.get('type')!r}, msg_id={self.msg_id!r}, "
                f"stream={self.stream!r}, deliveries={self.delivery_count})")

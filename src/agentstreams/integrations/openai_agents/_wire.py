"""Keys, message shapes and the (versioned) wire format of the distributed-agents protocol.

Every key lives under one namespace (default ``agents``)::

    agents:inbox:<agent>       stream, one per agent; group "workers" load-balances replicas
    agents:events              stream, shared lifecycle events for observers
    agents:replies:<client>    stream, one per AgentClient: final results (request/reply)
    agents:run:<run_id>        hash, the run's lifecycle status (per hop and overall)
    agents:session:<session>   string, the id of the session's latest run

An inbox entry (type ``agent_task``) is one hop of a run: the conversation so far, addressed to
one agent. A reply entry (type ``run_result``) carries the final output or the failure.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from agentstreams._events import Event
from agentstreams.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_NAMESPACE",
    "REPLY_EVENT",
    "TASK_EVENT",
    "WIRE_VERSION",
    "ChainLink",
    "Keys",
    "MalformedTaskError",
    "RunReply",
    "TaskEnvelope",
    "add_usage",
    "to_jsonable",
    "usage_dict",
]

#: Version of the task and reply shapes (field ``wire``). Readers reject versions they do not
#: know, so a rolling upgrade never misreads a message (it is dead-lettered with the reason).
WIRE_VERSION: Final = 1
DEFAULT_NAMESPACE: Final = "agents"
#: Consumer group of every inbox: replicas of an agent share it and so share the work.
DEFAULT_GROUP: Final = "workers"
TASK_EVENT: Final = "agent_task"
REPLY_EVENT: Final = "run_result"

#: Lifecycle states of a hop; a run's status is the state of its latest hop.
OFFERED: Final = "offered"
CLAIMED: Final = "claimed"
COMPLETED: Final = "completed"
FAILED: Final = "failed"

#: How long run status and reply streams are kept after their last change.
DEFAULT_STATUS_TTL_S: Final = 7 * 24 * 3600
REPLY_STREAM_TTL_S: Final = 24 * 3600
#: Approximate cap of the shared event stream (observers' view; tasks are never capped).
DEFAULT_EVENTS_MAXLEN: Final = 100_000

_USAGE_FIELDS: Final = ("requests", "input_tokens", "output_tokens", "total_tokens")


class MalformedTaskError(InvalidArgumentError):
    """An inbox or reply entry does not have the shape this version understands."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key of one deployment, derived from its namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace or ":" in self.namespace:
            raise InvalidArgumentError("namespace must be a non-empty string without ':'")

    def inbox(self, agent: str) -> str:
        """The stream of tasks addressed to ``agent``."""
        return f"{self.namespace}:inbox:{agent}"

    @property
    def events(self) -> str:
        """The shared lifecycle event stream."""
        return f"{self.namespace}:events"

    def replies(self, client_id: str) -> str:
        """The reply stream of one client."""
        return f"{self.namespace}:replies:{client_id}"

    def is_reply_stream(self, key: str) -> bool:
        """True for a reply stream of this namespace: the only keys a task may name as
        ``reply_to`` (a forged task must not make a worker write to, or expire, another key)."""
        prefix = self.replies("")
        return key.startswith(prefix) and len(key) > len(prefix) and "{" not in key

    def run(self, run_id: str) -> str:
        """The status hash of one run."""
        return f"{self.namespace}:run:{run_id}"

    def session(self, session_id: str) -> str:
        """The pointer from a session to its latest run."""
        return f"{self.namespace}:session:{session_id}"


def usage_dict(usage: Any) -> dict[str, int]:
    """The token counters of an SDK ``Usage`` (or a mapping) as a plain dict."""
    if isinstance(usage, Mapping):
        return {name: int(usage.get(name, 0) or 0) for name in _USAGE_FIELDS}
    return {name: int(getattr(usage, name, 0) or 0) for name in _USAGE_FIELDS}


def add_usage(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, int]:
    """Sum of two usage dicts."""
    return {name: int(a.get(name, 0) or 0) + int(b.get(name, 0) or 0) for name in _USAGE_FIELDS}


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: pydantic models and dataclasses are dumped, anything else
    that JSON cannot hold becomes its ``str()``."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError:
        return str(value)


def new_run_id() -> str:
    """A fresh run id (also the correlation id of the request/reply)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One hop of a run: which agent(s) ran it, on which worker, and what it cost."""

    hop: int
    agent: str
    worker: str
    #: every agent that ran in this hop, in order (local SDK handoffs add more than one)
    agents: tuple[str, ...] = ()
    delivery_count: int = 1
    duration_ms: float = 0.0
    usage: Mapping[str, int] = field(default_factory=dict)
    #: the remote agent this hop handed the conversation to, if any
    handed_off_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"hop": self.hop, "agent": self.agent, "worker": self.worker,
                "agents": list(self.agents), "delivery_count": self.delivery_count,
                "duration_ms": self.duration_ms, "usage": dict(self.usage),
                "handed_off_to": self.handed_off_to}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainLink:
        """Inverse of ``to_dict``."""
        return cls(hop=int(data["hop"]), agent=str(data["agent"]), worker=str(data["worker"]),
                   agents=tuple(str(a) for a in data.get("agents") or ()),
                   delivery_count=int(data.get("delivery_count", 1)),
                   duration_ms=float(data.get("duration_ms", 0.0)),
                   usage=usage_dict(data.get("usage") or {}),
                   handed_off_to=data.get("handed_off_to"))


def _require(event: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in event:
        raise MalformedTaskError(f"missing field {name!r}")
    value = event[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MalformedTaskError(f"field {name!r} has the wrong type {type(value).__name__}")
    return value


def _check_version(event: Mapping[str, Any]) -> None:
    version = event.get("wire")
    if version != WIRE_VERSION:
        raise MalformedTaskError(f"unsupported wire version {version!r} (this worker speaks "
                                 f"{WIRE_VERSION}); upgrade the workers")


@dataclass(frozen=True, slots=True)
class TaskEnvelope:
    """One hop of a run, addressed to one agent's inbox."""

    run_id: str
    session_id: str
    hop: int
    agent: str
    #: the agent that handed off (None for the caller's request)
    from_agent: str | None
    #: reply stream of the caller
    reply_to: str
    #: the conversation: the caller's text, or the SDK input items the target agent sees
    input: str | list[dict[str, Any]]
    context: dict[str, Any] | None = None
    #: tokens spent by the earlier hops
    usage: Mapping[str, int] = field(default_factory=dict)
    chain: tuple[ChainLink, ...] = ()
    #: SDK trace id shared by every hop, so one run is one trace across processes
    trace_id: str | None = None
    #: epoch seconds after which nobody waits for the result
    deadline: float | None = None
    max_turns: int | None = None

    @property
    def task_id(self) -> str:
        """Stable id of this hop (the same on every redelivery)."""
        return f"{self.run_id}:{self.hop}"

    def to_fields(self) -> dict[str, Any]:
        """The event fields to publish."""
        return {
            "wire": WIRE_VERSION, "run_id": self.run_id, "session_id": self.session_id,
            "hop": self.hop, "agent": self.agent, "from_agent": self.from_agent,
            "reply_to": self.reply_to, "input": self.input, "context": self.context,
            "usage": dict(self.usage), "chain": [link.to_dict() for link in self.chain],
            "trace_id": self.trace_id, "deadline": self.deadline, "max_turns": self.max_turns,
            "timestamp": time.time(),
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> TaskEnvelope:
        """Decode an inbox entry; raises MalformedTaskError when it is not a task we know."""
        _check_version(event)
        try:
            raw_input = _require(event, "input", (str, list))
            if isinstance(raw_input, list) and not all(isinstance(i, dict) for i in raw_input):
                raise MalformedTaskError("field 'input' must be a string or a list of items")
            deadline = event.get("deadline")
            max_turns = event.get("max_turns")
            context = event.get("context")
            if context is not None and not isinstance(context, dict):
                raise MalformedTaskError("field 'context' must be an object or null")
            return cls(
                run_id=_require(event, "run_id", str),
                session_id=str(_require(event, "session_id", (str, int))),
                hop=_require(event, "hop", int),
                agent=_require(event, "agent", str),
                from_agent=event.get("from_agent"),
                reply_to=_require(event, "reply_to", str),
                input=raw_input,
                context=context,
                usage=usage_dict(event.get("usage") or {}),
                chain=tuple(ChainLink.from_dict(c) for c in event.get("chain") or ()),
                trace_id=event.get("trace_id"),
                deadline=float(deadline) if deadline is not None else None,
                max_turns=int(max_turns) if max_turns is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, MalformedTaskError):
                raise
            raise MalformedTaskError(f"bad task: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RunReply:
    """The final word on a run, sent to the caller's reply stream."""

    run_id: str
    session_id: str
    status: Literal["completed", "failed"]
    final_output: Any = None
    last_agent: str | None = None
    chain: tuple[ChainLink, ...] = ()
    usage: Mapping[str, int] = field(default_factory=dict)
    #: on failure: {"agent", "error_type", "error_message"}
    error: Mapping[str, Any] | None = None

    def to_fields(self) -> dict[str, Any]:
        """The event fields to publish."""
        return {
            "wire": WIRE_VERSION, "run_id": self.run_id, "session_id": self.session_id,
            "status": self.status, "final_output": self.final_output,
            "last_agent": self.last_agent, "chain": [link.to_dict() for link in self.chain],
            "usage": dict(self.usage), "error": dict(self.error) if self.error else None,
            "timestamp": time.time(),
        }

    def to_json(self) -> str:
        """Compact JSON (stored in the run's status hash)."""
        return orjson.dumps(self.to_fields()).decode()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | Event) -> RunReply:
        """Decode a reply entry (or the stored JSON, parsed)."""
        _check_version(data)
        try:
            status = _require(data, "status", str)
            if status not in (COMPLETED, FAILED):
                raise MalformedTaskError(f"unknown reply status {status!r}")
            error = data.get("error")
            return cls(
                run_id=_require(data, "run_id", str),
                session_id=str(_require(data, "session_id", (str, int))),
                status=status,
                final_output=data.get("final_output"),
                last_agent=data.get("last_agent"),
                chain=tuple(ChainLink.from_dict(c) for c in data.get("chain") or ()),
                usage=usage_dict(data.get("usage") or {}),
                error=dict(error) if isinstance(error, Mapping) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, MalformedTaskError):
                raise
            raise MalformedTaskError(f"bad reply: {type(exc).__name__}: {exc}") from exc

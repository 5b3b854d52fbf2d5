"""What a tool can learn about the distributed run it is part of, and a stable call key."""

from __future__ import annotations

import hashlib
import json
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaskInfo", "current_task", "tool_call_key"]


@dataclass(slots=True)
class TaskInfo:
    """The hop an ``AgentWorker`` is running in this task (visible to tools and hooks)."""

    run_id: str
    session_id: str
    hop: int
    agent: str
    worker: str
    #: 1 on the first delivery; more after a crash or a retry (the hop is being re-run)
    delivery_count: int = 1
    _occurrences: dict[str, int] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)


_current: ContextVar[TaskInfo | None] = ContextVar("agentstreams_task", default=None)


def current_task() -> TaskInfo | None:
    """The hop being run, when called inside an ``AgentWorker`` (None elsewhere)."""
    return _current.get()


def set_current_task(task: TaskInfo | None) -> Token[TaskInfo | None]:
    """Install ``task`` for the current context (the worker does this around each run)."""
    return _current.set(task)


def reset_current_task(token: Token[TaskInfo | None]) -> None:
    """Undo ``set_current_task``."""
    _current.reset(token)


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return arguments


def tool_call_key(ctx: Any) -> str:
    """A key for one tool call that stays the same when a crashed hop is re-run elsewhere.

    Pass the ``ToolContext`` your function tool receives. The model's own ``tool_call_id`` is
    new on every LLM call, so after a redelivery it no longer matches; this key is built from
    the run, the hop, the tool name, its canonical arguments and how many identical calls came
    before it in the hop. Use it to make side effects idempotent (``SET key NX``, a unique
    index, an idempotency header). Outside an ``AgentWorker`` it is the model's call id.
    """
    call_id = str(getattr(ctx, "tool_call_id", "") or "")
    task = current_task()
    if task is None:
        return call_id
    if call_id and call_id in task._keys:
        return task._keys[call_id]
    name = str(getattr(ctx, "tool_name", "") or "tool")
    digest = hashlib.sha256(
        f"{name}\0{_canonical(str(getattr(ctx, 'tool_arguments', '') or ''))}".encode()
    ).hexdigest()[:16]
    seen = task._occurrences.get(digest, 0)
    task._occurrences[digest] = seen + 1
    key = f"{task.run_id}:{task.hop}:{name}:{digest}:{seen}"
    if call_id:
        task._keys[call_id] = key
    return key

"""OpenAI Agents SDK integration (extra ``agents``).

* ``CoordinatorHooks`` — ``RunHooks`` that publish ``agent_started``, ``agent_completed``,
  ``tool_result``, ``handoff_ready`` and (with ``track_errors``) ``error`` from any run, and
  never break it.
* ``AgentWorker`` / ``AgentClient`` / ``remote_handoff`` — agents in many processes: a handoff
  goes to the inbox of the target agent, is claimed by one of its replicas, survives worker
  crashes, and the final result comes back to the caller.
"""

from __future__ import annotations

try:
    import agents as _agents  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "agentstreams.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'agentstreams[agents]'"
    ) from exc

from agentstreams.integrations.openai_agents._client import (
    AgentClient,
    AgentRunResult,
    ClientStats,
)
from agentstreams.integrations.openai_agents._context import (
    TaskInfo,
    current_task,
    tool_call_key,
)
from agentstreams.integrations.openai_agents._errors import AgentRunError, AgentRunTimeoutError
from agentstreams.integrations.openai_agents._handoff import (
    RemoteHandoffRequest,
    is_remote_stand_in,
    pending_remote_handoff,
    remote_handoff,
)
from agentstreams.integrations.openai_agents._hooks import (
    CoordinatorHooks,
    ErrorTracker,
    HookStats,
    compose_hooks,
)
from agentstreams.integrations.openai_agents._status import HopStatus, RunStatus
from agentstreams.integrations.openai_agents._wire import ChainLink, Keys, TaskEnvelope
from agentstreams.integrations.openai_agents._worker import AgentWorker, AgentWorkerStats

__all__ = [
    "AgentClient",
    "AgentRunError",
    "AgentRunResult",
    "AgentRunTimeoutError",
    "AgentWorker",
    "AgentWorkerStats",
    "ChainLink",
    "ClientStats",
    "CoordinatorHooks",
    "ErrorTracker",
    "HookStats",
    "HopStatus",
    "Keys",
    "RemoteHandoffRequest",
    "RunStatus",
    "TaskEnvelope",
    "TaskInfo",
    "compose_hooks",
    "current_task",
    "is_remote_stand_in",
    "pending_remote_handoff",
    "remote_handoff",
    "tool_call_key",
]

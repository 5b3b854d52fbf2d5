"""Errors of the distributed-agents integration (all derive from ``AgentStreamsError``).

* AgentStreamsError
  * AgentRunError — a run ended ``failed``: ``agent``, ``error_type``, ``error_message``.
  * AgentRunTimeoutError (also TimeoutError) — no result within ``timeout_s``; the run may
    still finish: check ``AgentClient.status(session_id)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentstreams.errors import AgentStreamsError

if TYPE_CHECKING:
    from agentstreams.integrations.openai_agents._status import RunStatus

__all__ = ["AgentRunError", "AgentRunTimeoutError"]


class AgentRunError(AgentStreamsError):
    """An agent of the run raised; the run ended with status ``failed``."""

    def __init__(self, *, agent: str | None, error_type: str, error_message: str,
                 session_id: str, run_id: str) -> None:
        super().__init__(f"agent {agent!r} failed in session {session_id!r} "
                         f"({error_type}: {error_message})")
        self.agent = agent
        self.error_type = error_type
        self.error_message = error_message
        self.session_id = session_id
        self.run_id = run_id


class AgentRunTimeoutError(AgentStreamsError, TimeoutError):
    """No result arrived within the timeout. ``status`` is the last known lifecycle state."""

    def __init__(self, *, session_id: str, run_id: str, timeout_s: float,
                 status: RunStatus | None) -> None:
        where = (f"; last status: {status.status} at agent {status.agent!r}"
                 if status is not None else "")
        super().__init__(f"no result for session {session_id!r} within {timeout_s}s{where}. "
                         "The run may still complete: check AgentClient.status(session_id)")
        self.session_id = session_id
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.status = status

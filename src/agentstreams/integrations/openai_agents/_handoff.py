"""``remote_handoff``: a normal SDK handoff whose target agent runs in another process.

The LLM sees the usual ``transfer_to_<name>`` tool. Invoking it returns a local stand-in agent
that makes no LLM call: its scripted model records the exact conversation the target would see
(after input filters and history nesting) and answers with one line, which ends the local run
cleanly. Whoever drives the run (``AgentWorker``, or your own code via ``pending_remote_handoff``)
then publishes that conversation to the target's inbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from agents import Agent, Handoff, RunContextWrapper
from agents.handoffs import HandoffInputFilter
from agents.strict_schema import ensure_strict_json_schema
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message

from agentstreams.errors import InvalidArgumentError
from agentstreams.integrations.openai_agents._wire import to_jsonable

__all__ = ["RemoteHandoffRequest", "is_remote_stand_in", "pending_remote_handoff",
           "remote_handoff"]

_REQUEST_ATTR: Final = "_agentstreams_remote_handoff"


@dataclass(slots=True)
class RemoteHandoffRequest:
    """What a remote handoff captured: target, the LLM's arguments, and the conversation."""

    target: str
    #: JSON arguments the LLM passed to the transfer tool ("" when the tool takes none)
    arguments: str = ""
    #: the input items the target agent should see; None until the stand-in ran
    input: list[dict[str, Any]] | None = None


def _stand_in(target: str, arguments: str) -> Agent[Any]:
    request = RemoteHandoffRequest(target=target, arguments=arguments)

    def capture(call: ModelCall) -> list[Any]:
        items = call.input if isinstance(call.input, list) else [
            {"role": "user", "content": call.input}]
        request.input = [to_jsonable(item) for item in items]
        return [assistant_message(f"Handed off to remote agent {target!r}.",
                                  item_id="agentstreams-remote-handoff")]

    # The SDK's scripted model is the one sanctioned way to answer a turn without an LLM; a
    # fresh stand-in per invocation keeps concurrent runs apart.
    agent: Agent[Any] = Agent(name=target, model=ScriptedModel([ModelStep.respond(capture)]),
                              instructions=None)
    setattr(agent, _REQUEST_ATTR, request)
    return agent


def is_remote_stand_in(agent: object) -> bool:
    """True for the local stand-in of a remote agent (hooks skip it: it does no work)."""
    return isinstance(getattr(agent, _REQUEST_ATTR, None), RemoteHandoffRequest)


def pending_remote_handoff(result: Any) -> RemoteHandoffRequest | None:
    """The remote handoff a finished ``RunResult`` ended with, or None if it ended normally."""
    request = getattr(getattr(result, "last_agent", None), _REQUEST_ATTR, None)
    return request if isinstance(request, RemoteHandoffRequest) else None


def remote_handoff(
    agent_name: str,
    *,
    tool_name_override: str | None = None,
    tool_description_override: str | None = None,
    handoff_description: str | None = None,
    input_filter: HandoffInputFilter | None = None,
    nest_handoff_history: bool | None = None,
) -> Handoff[Any, Agent[Any]]:
    """A handoff to ``agent_name``, hosted by some ``AgentWorker`` anywhere.

    Use it like ``handoff(agent)``: ``Agent(name="triage", handoffs=[remote_handoff("research")])``.
    Do not set ``RunConfig.model`` in runs that use it: that would replace the stand-in's
    scripted model with a real one.
    """
    if not isinstance(agent_name, str) or not agent_name.strip():
        raise InvalidArgumentError("remote_handoff needs the target agent's name")
    tool_name = tool_name_override or Handoff.default_tool_name(Agent(name=agent_name))
    description = tool_description_override or (
        f"Handoff to the {agent_name} agent to handle the request. {handoff_description or ''}"
    ).strip()

    async def invoke(_ctx: RunContextWrapper[Any], arguments: str) -> Agent[Any]:
        if arguments:
            try:
                json.loads(arguments)
            except ValueError as exc:  # the SDK reports this back to the model
                raise InvalidArgumentError(f"invalid handoff arguments: {exc}") from exc
        return _stand_in(agent_name, arguments or "")

    return Handoff(
        tool_name=tool_name,
        tool_description=description,
        input_json_schema=ensure_strict_json_schema({}),
        on_invoke_handoff=invoke,
        agent_name=agent_name,
        input_filter=input_filter,
        nest_handoff_history=nest_handoff_history,
    )

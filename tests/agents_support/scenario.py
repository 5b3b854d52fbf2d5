"""The three-agent chain used by the tests: triage -> research -> writer.

``build_agents`` makes the same agents for one process (SDK handoffs) and for many (remote
handoffs): only the handoff factory differs, so their final outputs must match.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from agents import Agent, FunctionTool, Handoff, RunContextWrapper, function_tool
from agents.items import TResponseOutputItem
from agents.testing import assistant_message, function_call

from agents_support.models import RuleModel
from agentstreams.integrations.openai_agents import remote_handoff, tool_call_key

#: Called by the lookup tool: ("start" | "done", call key, pid).
ToolProbe = Callable[[str, str, int], Awaitable[None]]
HandoffFactory = Callable[[str, dict[str, Agent[Any]]], Handoff[Any, Any] | Agent[Any]]

TOPIC_PREFIX = "Write a brief on "


def _call_id(agent: str, items: list[dict[str, Any]]) -> str:
    return f"call_{agent}_{len(items)}"


def _user_text(items: list[dict[str, Any]]) -> str:
    for item in items:
        if item.get("role") == "user" and isinstance(item.get("content"), str):
            return str(item["content"])
    return ""


def _outputs(items: list[dict[str, Any]], tool: str) -> list[str]:
    calls = {i["call_id"] for i in items if i.get("type") == "function_call"
             and i.get("name") == tool}
    return [str(i["output"]) for i in items if i.get("type") == "function_call_output"
            and i.get("call_id") in calls]


def triage_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """Always hands the request to research."""
    return [function_call("transfer_to_research", "{}", call_id=_call_id("triage", items))]


def research_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """Looks the topic up once, then hands off to the writer."""
    if not _outputs(items, "lookup"):
        topic = _user_text(items).removeprefix(TOPIC_PREFIX)
        return [function_call("lookup", {"topic": topic}, call_id=_call_id("research", items))]
    return [function_call("transfer_to_writer", "{}", call_id=_call_id("research", items))]


def writer_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """Writes the brief from everything in the conversation (so lost context would show)."""
    path = [i["name"].removeprefix("transfer_to_") for i in items
            if i.get("type") == "function_call" and i["name"].startswith("transfer_to_")]
    text = (f"BRIEF: {_user_text(items)} | facts: {'; '.join(_outputs(items, 'lookup'))} | "
            f"via: {' -> '.join(path)} | items seen: {len(items)}")
    return [assistant_message(text)]


def make_lookup(slow_s: float = 0.0, probe: ToolProbe | None = None) -> FunctionTool:
    """The research tool: optionally slow, optionally reporting its start and end."""

    @function_tool
    async def lookup(ctx: RunContextWrapper[Any], topic: str) -> str:
        """Look facts up about a topic."""
        key = tool_call_key(ctx)
        if probe is not None:
            await probe("start", key, os.getpid())
        if slow_s:
            await asyncio.sleep(slow_s)
        if probe is not None:
            await probe("done", key, os.getpid())
        return json.dumps({"topic": topic, "fact": f"{topic} are append-only logs"})

    return lookup


def build_agents(handoff_to: HandoffFactory, *, slow_s: float = 0.0,
                 probe: ToolProbe | None = None) -> dict[str, Agent[Any]]:
    """writer, research and triage; ``handoff_to(name, built)`` links them, locally (return
    ``built[name]``) or remotely (return ``remote_handoff(name)``)."""
    built: dict[str, Agent[Any]] = {}
    built["writer"] = Agent(name="writer", instructions="Write the brief.",
                            model=RuleModel(writer_rule))
    built["research"] = Agent(name="research", instructions="Research the topic.",
                              model=RuleModel(research_rule),
                              tools=[make_lookup(slow_s, probe)],
                              handoffs=[handoff_to("writer", built)])
    built["triage"] = Agent(name="triage", instructions="Route the request.",
                            model=RuleModel(triage_rule),
                            handoffs=[handoff_to("research", built)])
    return built


def local_agents(**kwargs: Any) -> dict[str, Agent[Any]]:
    """The chain with SDK handoffs, for one ``Runner.run`` in one process."""
    return build_agents(lambda name, built: built[name], **kwargs)


def remote_agents(**kwargs: Any) -> dict[str, Agent[Any]]:
    """The chain with remote handoffs, for ``AgentWorker``s."""
    return build_agents(lambda name, _built: remote_handoff(name), **kwargs)

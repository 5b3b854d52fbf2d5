"""The demo's three OpenAI Agents SDK agents: triage -> research -> writer.

Every worker process builds the same team and hosts some of it; the handoffs between them are
``remote_handoff``s, so each hop travels through Redis to whichever process hosts the target.
By default the agents run on scripted offline models (``RuleModel``: the decision comes from
the conversation, so a hop re-run on another replica after a crash decides the same); with
``live_model=True`` they use the SDK's default OpenAI model instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from agents import Agent, FunctionTool, RunContextWrapper, function_tool
from agents.items import TResponseOutputItem
from agents.testing import assistant_message, function_call
from agents.usage import Usage

from agentstreams.demo.scripted import RuleModel, tool_outputs, user_text
from agentstreams.integrations.openai_agents import remote_handoff, tool_call_key

__all__ = [
    "AGENT_NAMES",
    "PROMPT_PREFIX",
    "SCRIPTED_USAGE",
    "SEARCH_S",
    "TOPICS",
    "ToolStartHook",
    "build_team",
    "make_search",
    "notes_for",
    "prompt_for",
    "research_rule",
    "triage_rule",
    "writer_rule",
]

#: The chain, in order.
AGENT_NAMES = ("triage", "research", "writer")
#: Subjects of the demo sessions, cycled when more sessions than topics are asked for.
TOPICS = (
    "consumer groups in Redis Streams",
    "crash recovery with XAUTOCLAIM",
    "dead-letter queues for agent events",
    "idempotent publishing",
    "backpressure between agents",
)
PROMPT_PREFIX = "Write a short brief on "
#: How long one search takes by default, in seconds: long enough to kill a worker inside it.
SEARCH_S = 0.8
#: What one scripted model call reports (the numbers of a small real call, for the summary).
SCRIPTED_USAGE = Usage(requests=1, input_tokens=180, output_tokens=40, total_tokens=220)

#: The knowledge base behind the search tool (deterministic: every replica finds the same).
_NOTES: dict[str, tuple[str, ...]] = {
    TOPICS[0]: ("each group sees every entry once",
                "consumers of one group share the entries",
                "an entry stays pending until XACK"),
    TOPICS[1]: ("a dead consumer's entries stay pending",
                "XAUTOCLAIM hands idle entries to a live consumer",
                "the delivery count tells a re-run apart"),
    TOPICS[2]: ("a delivery limit stops poison events",
                "the dead letter keeps the reason and the original id",
                "replay after the fix"),
    TOPICS[3]: ("a retry after a lost reply may write twice",
                "an idempotency key makes the retry safe",
                "consumers dedupe by event id"),
    TOPICS[4]: ("bounded in-flight work per worker",
                "no prefetch keeps replicas balanced",
                "a slow agent holds its lease, not the queue"),
}

#: Called by the search tool as it starts: (topic, stable call key).
ToolStartHook = Callable[[str, str], Awaitable[None]]


def prompt_for(index: int) -> str:
    """The request of demo session ``index`` (1-based)."""
    return PROMPT_PREFIX + TOPICS[(index - 1) % len(TOPICS)]


def notes_for(topic: str) -> list[str]:
    """What the search finds about ``topic``."""
    key = topic.strip().rstrip(".").lower()
    for known, notes in _NOTES.items():
        if known.lower() == key:
            return list(notes)
    return [f"{topic} is covered in the agentstreams docs"]


def make_search(seconds: float = SEARCH_S, on_start: ToolStartHook | None = None
                ) -> FunctionTool:
    """The research agent's tool: a deterministic lookup that takes ``seconds``.

    ``on_start`` is awaited first (the demo announces the search, so the kill can land in it).
    """

    @function_tool
    async def search(ctx: RunContextWrapper[Any], topic: str) -> str:
        """Search the team's knowledge base for notes about a topic."""
        if on_start is not None:
            # Stable across a re-run on another replica: the key for any side effect.
            await on_start(topic, tool_call_key(ctx))
        if seconds > 0:
            await asyncio.sleep(seconds)
        return json.dumps({"topic": topic, "notes": notes_for(topic)})

    return search


def _topic(items: list[dict[str, Any]]) -> str:
    return user_text(items).removeprefix(PROMPT_PREFIX).strip()


def _call_id(agent: str, items: list[dict[str, Any]]) -> str:
    # Derived from the conversation, so a re-run makes the same call.
    return f"call_{agent}_{len(items)}"


def triage_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """Every request needs research first."""
    return [function_call("transfer_to_research", "{}", call_id=_call_id("triage", items))]


def research_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """Search once, then hand the notes to the writer."""
    if not tool_outputs(items, "search"):
        return [function_call("search", {"topic": _topic(items)},
                              call_id=_call_id("research", items))]
    return [function_call("transfer_to_writer", "{}", call_id=_call_id("research", items))]


def writer_rule(items: list[dict[str, Any]]) -> list[TResponseOutputItem]:
    """A brief made only of what the conversation carries (lost context would show)."""
    notes: list[str] = []
    for output in tool_outputs(items, "search"):
        try:
            notes.extend(str(n) for n in json.loads(output).get("notes", []))
        except (ValueError, AttributeError):
            notes.append(output)
    body = "; ".join(notes) if notes else "no notes reached the writer"
    return [assistant_message(f"Brief on {_topic(items)}: {body}.")]


_INSTRUCTIONS = {
    "triage": "You route requests. Always hand the request to the research agent by calling "
              "transfer_to_research; do not answer yourself.",
    "research": "You research. Call the search tool exactly once with the topic of the "
                "request, then hand off to the writer agent by calling transfer_to_writer.",
    "writer": "You write. Using only the notes the search tool returned in this conversation, "
              "write a brief of two or three sentences on the requested topic.",
}


def build_team(*, live_model: bool = False, search_s: float = SEARCH_S,
               on_tool_start: ToolStartHook | None = None) -> dict[str, Agent[Any]]:
    """triage, research and writer, linked by remote handoffs.

    ``live_model``: use the SDK's default OpenAI model (needs ``OPENAI_API_KEY``) instead of
    the scripted offline ones.
    """
    def model(rule: Callable[[list[dict[str, Any]]], list[TResponseOutputItem]]
              ) -> RuleModel | None:
        return None if live_model else RuleModel(rule, SCRIPTED_USAGE)

    return {
        "triage": Agent(name="triage", instructions=_INSTRUCTIONS["triage"],
                        model=model(triage_rule), handoffs=[remote_handoff("research")]),
        "research": Agent(name="research", instructions=_INSTRUCTIONS["research"],
                          model=model(research_rule),
                          tools=[make_search(search_s, on_tool_start)],
                          handoffs=[remote_handoff("writer")]),
        "writer": Agent(name="writer", instructions=_INSTRUCTIONS["writer"],
                        model=model(writer_rule)),
    }

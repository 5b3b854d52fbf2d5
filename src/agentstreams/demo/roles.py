"""What the demo's agents do: plain async functions, one per role, that know nothing of Redis.

Each role turns the work product it was handed (a JSON-ready dict) into a bigger one. The work
is simulated, short and deterministic, so the demo runs offline; a later version swaps these
functions for real OpenAI Agents SDK agents without touching the orchestration or the display.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CHAIN",
    "FIRST_ROLE",
    "TOPICS",
    "Role",
    "RoleEnv",
    "RoleOutput",
    "plan",
    "research",
    "role_named",
    "task_context",
    "write",
]

#: Subjects of the demo tasks, cycled when more tasks than topics are asked for.
TOPICS = (
    "consumer groups in Redis Streams",
    "crash recovery with XAUTOCLAIM",
    "dead-letter queues for agent events",
    "idempotent publishing",
    "backpressure between agents",
)

#: Simulated thinking time of each role, in seconds (scaled by the demo's pace).
PLAN_THINK_S = 0.20
SEARCH_THINK_S = 0.08
WRITE_THINK_S = 0.25


class RoleEnv(Protocol):
    """What a role may do besides computing: wait (simulated work) and report tool results."""

    async def think(self, seconds: float) -> None:
        """Spend simulated work time (the host scales or skips it)."""

    async def tool_result(self, tool_name: str, result: Any, execution_time_ms: float) -> None:
        """Report a tool call's result so every other agent can see it."""


@dataclass(frozen=True, slots=True)
class RoleOutput:
    """A role's finished work: the work product for the next role and what to announce."""

    context: dict[str, Any]
    summary: str
    tokens_used: int


RoleFunction = Callable[[dict[str, Any], RoleEnv], Awaitable[RoleOutput]]


@dataclass(frozen=True, slots=True)
class Role:
    """One link of the chain: a name, what it does, and who gets the work next (None = last)."""

    name: str
    run: RoleFunction
    next: str | None = None
    description: str = field(default="", compare=False)


def _tokens(*texts: str) -> int:
    """A deterministic stand-in for token use: about 4/3 tokens a word."""
    words = sum(len(text.split()) for text in texts)
    return (words * 4 + 2) // 3


def task_context(index: int) -> dict[str, Any]:
    """The initial work product of demo task ``index`` (1-based)."""
    topic = TOPICS[(index - 1) % len(TOPICS)]
    return {"task": f"Write a short brief on {topic}", "topic": topic}


async def plan(context: dict[str, Any], env: RoleEnv) -> RoleOutput:
    """Planner: break the task into research questions."""
    topic = str(context["topic"])
    await env.think(PLAN_THINK_S)
    steps = [f"what {topic} are", f"how {topic} fail", f"when to use {topic}"]
    out = {**context, "plan": steps}
    return RoleOutput(out, f"{len(steps)}-step plan", _tokens(str(context["task"]), *steps))


async def research(context: dict[str, Any], env: RoleEnv) -> RoleOutput:
    """Researcher: answer each planned question with the (simulated) search tool."""
    notes: list[str] = []
    for step in context["plan"]:
        started = time.perf_counter()
        await env.think(SEARCH_THINK_S)
        finding = f"{step}: explained with one example"
        await env.tool_result("search", {"query": step, "finding": finding},
                              (time.perf_counter() - started) * 1000)
        notes.append(finding)
    out = {**context, "notes": notes}
    return RoleOutput(out, f"{len(notes)} findings", _tokens(*context["plan"], *notes))


async def write(context: dict[str, Any], env: RoleEnv) -> RoleOutput:
    """Writer: turn the findings into the final brief."""
    await env.think(WRITE_THINK_S)
    notes = [str(note) for note in context["notes"]]
    draft = f"Brief: {context['topic']}. " + " ".join(f"({i}) {n}." for i, n in
                                                     enumerate(notes, 1))
    out = {**context, "draft": draft}
    return RoleOutput(out, f"brief of {len(draft.split())} words", _tokens(*notes, draft))


#: The demo's agents in hand-off order.
CHAIN: tuple[Role, ...] = (
    Role("planner", plan, "researcher", "breaks the task into questions"),
    Role("researcher", research, "writer", "answers them with a search tool"),
    Role("writer", write, None, "writes the brief"),
)
FIRST_ROLE = CHAIN[0].name


def role_named(name: str) -> Role:
    """The role called ``name`` (ValueError for an unknown name)."""
    for role in CHAIN:
        if role.name == name:
            return role
    raise ValueError(f"unknown demo role {name!r}; expected one of "
                     f"{', '.join(r.name for r in CHAIN)}")

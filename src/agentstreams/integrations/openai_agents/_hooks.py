"""``CoordinatorHooks``: publish an SDK run's lifecycle to a stream, without ever breaking it.

Events (all carry ``session_id`` and ``timestamp``, plus any ``extra_fields``):

    agent_started    agent_name, input_summary
    agent_completed  agent_name, output_summary, duration_ms, tokens_used (this agent),
                     usage (run totals so far), handed_off_to (None unless it handed off)
    tool_result      agent_name, tool_name, tool_call_id, result, execution_time_ms
    handoff_ready    from_agent, to_agent, context (usage so far), remote
    error            agent_name, error_type, error_message   (via ``track_errors``)

A hook that raises aborts the SDK run, so every publish is bounded by ``publish_timeout_s`` and
its failure is logged and counted. After a failure, publishing pauses for ``suspend_s`` (events
are counted as ``skipped``), so a Redis outage costs the agent at most one timeout per pause.
``strict=True`` raises instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from agents import Agent, RunContextWrapper, RunHooks, Runner, Tool
from agents.items import ModelResponse, TResponseInputItem
from agents.run_context import AgentHookContext

from agentstreams._coordinator import AgentCoordinator
from agentstreams._events import EventType
from agentstreams.errors import InvalidArgumentError
from agentstreams.integrations.openai_agents._handoff import is_remote_stand_in
from agentstreams.integrations.openai_agents._wire import to_jsonable, usage_dict

__all__ = ["CoordinatorHooks", "ErrorTracker", "HookStats", "compose_hooks"]

logger = logging.getLogger("agentstreams.agents.hooks")

#: Default bound on one publish from a hook; an agent never waits longer for Redis.
DEFAULT_PUBLISH_TIMEOUT_S = 1.0
#: After a failed publish, hooks stop trying for this long (one timeout per pause, not per hook).
DEFAULT_SUSPEND_S = 5.0
SUMMARY_CHARS = 200
DEFAULT_MAX_RESULT_CHARS = 4000

HandoffContextFn = Callable[[RunContextWrapper[Any], Agent[Any], Agent[Any]], Mapping[str, Any]]


@dataclass(slots=True)
class HookStats:
    """Publish counters of one ``CoordinatorHooks``."""

    published: int = 0
    #: publishes that raised or timed out
    failed: int = 0
    #: events not sent because publishing was paused after a failure
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _summarize_input(items: list[TResponseInputItem]) -> str:
    for item in reversed(items):
        if isinstance(item, Mapping) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return _truncate(content, SUMMARY_CHARS)
    return f"{len(items)} input items"


def _summarize_output(output: Any) -> str:
    value = output if isinstance(output, str) else to_jsonable(output)
    return _truncate(value if isinstance(value, str) else str(value), SUMMARY_CHARS)


class CoordinatorHooks(RunHooks[Any]):
    """``RunHooks`` that publish agent, tool, handoff and error events through a coordinator.

    Pass to ``Runner.run`` / ``run_streamed`` / ``run_sync`` as ``hooks=``; combine with your own
    hooks with ``compose_hooks``. Use one instance per run (it tracks timings).

    Args:
        coordinator: where events go (its stream); shared, not closed by the hooks.
        session_id: written into every event (a fresh id when omitted).
        strict: raise publish errors (aborting the run) instead of logging and counting them.
        publish_timeout_s: bound on one publish.
        suspend_s: pause after a failed publish.
        extra_fields: added to every event (e.g. ``{"run_id": ...}``).
        handoff_context: builds the ``context`` of ``handoff_ready`` (default: usage so far).
        max_result_chars: longer string tool results are truncated.
    """

    def __init__(
        self,
        coordinator: AgentCoordinator,
        *,
        session_id: str | None = None,
        strict: bool = False,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
        suspend_s: float = DEFAULT_SUSPEND_S,
        extra_fields: Mapping[str, Any] | None = None,
        handoff_context: HandoffContextFn | None = None,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> None:
        if not isinstance(coordinator, AgentCoordinator):
            raise InvalidArgumentError("CoordinatorHooks needs an AgentCoordinator")
        if publish_timeout_s <= 0 or suspend_s < 0 or max_result_chars < 1:
            raise InvalidArgumentError("publish_timeout_s must be > 0, suspend_s >= 0 and "
                                       "max_result_chars >= 1")
        for name in extra_fields or {}:
            if name.startswith("_") or name == "type":
                raise InvalidArgumentError(f"extra field {name!r} is reserved")
        self.coordinator = coordinator
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        self.strict = strict
        self.publish_timeout_s = publish_timeout_s
        self.suspend_s = suspend_s
        self.extra_fields = dict(extra_fields or {})
        self.handoff_context = handoff_context
        self.max_result_chars = max_result_chars
        self.stats = HookStats()
        #: names of the agents that started, in order (stand-ins of remote agents excluded)
        self.agents_started: list[str] = []
        self._agent_clock: dict[str, tuple[float, int]] = {}
        self._tool_clock: dict[Any, float] = {}
        self._suspended_until = 0.0

    @property
    def current_agent(self) -> str | None:
        """The agent that started last (the one to blame when the run raises)."""
        return self.agents_started[-1] if self.agents_started else None

    # ---------------------------------------------------------------- publishing

    async def publish(self, event_type: str | EventType, fields: Mapping[str, Any]) -> bool:
        """Publish one event under the timeout; True if it was written.

        Never raises unless ``strict``: hooks must not break the run they observe.
        """
        if time.monotonic() < self._suspended_until and not self.strict:
            self.stats.skipped += 1
            return False
        payload = {"session_id": self.session_id, **fields, **self.extra_fields,
                   "timestamp": time.time()}
        try:
            await asyncio.wait_for(self.coordinator.publish(event_type, payload),
                                   self.publish_timeout_s)
        except Exception as exc:
            self.stats.failed += 1
            self._suspended_until = time.monotonic() + self.suspend_s
            if self.strict:
                raise
            logger.warning("could not publish %s for session %r (%s: %s); the run goes on, "
                           "events are skipped for %.1fs", getattr(event_type, "value",
                                                                   event_type),
                           self.session_id, type(exc).__name__, exc, self.suspend_s,
                           extra={"stream": self.coordinator.stream_name})
            return False
        self.stats.published += 1
        return True

    # ---------------------------------------------------------------- SDK hooks

    async def on_agent_start(self, context: AgentHookContext[Any], agent: Agent[Any]) -> None:
        """Publish ``agent_started``."""
        if is_remote_stand_in(agent):
            return
        self.agents_started.append(agent.name)
        self._agent_clock[agent.name] = (time.perf_counter(), context.usage.total_tokens)
        await self.publish(EventType.AGENT_STARTED, {
            "agent_name": agent.name,
            "input_summary": _summarize_input(list(context.turn_input or [])),
        })

    async def _completed(self, context: RunContextWrapper[Any], agent: Agent[Any],
                         output_summary: str, handed_off_to: str | None) -> None:
        started, tokens0 = self._agent_clock.pop(agent.name, (time.perf_counter(),
                                                              context.usage.total_tokens))
        await self.publish(EventType.AGENT_COMPLETED, {
            "agent_name": agent.name,
            "output_summary": output_summary,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "tokens_used": context.usage.total_tokens - tokens0,
            "usage": usage_dict(context.usage),
            "handed_off_to": handed_off_to,
        })

    async def on_agent_end(self, context: AgentHookContext[Any], agent: Agent[Any],
                           output: Any) -> None:
        """Publish ``agent_completed`` for the agent that produced the final output."""
        if is_remote_stand_in(agent):
            return
        await self._completed(context, agent, _summarize_output(output), None)

    async def on_handoff(self, context: RunContextWrapper[Any], from_agent: Agent[Any],
                         to_agent: Agent[Any]) -> None:
        """Publish ``agent_completed`` for the agent handing off, then ``handoff_ready``."""
        await self._completed(context, from_agent, f"handed off to {to_agent.name}",
                              to_agent.name)
        if self.handoff_context is not None:
            handoff_context = dict(self.handoff_context(context, from_agent, to_agent))
        else:
            handoff_context = {"usage": usage_dict(context.usage)}
        await self.publish(EventType.HANDOFF_READY, {
            "from_agent": from_agent.name,
            "to_agent": to_agent.name,
            "context": handoff_context,
            "remote": is_remote_stand_in(to_agent),
        })

    @staticmethod
    def _tool_key(context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool) -> Any:
        call_id = getattr(context, "tool_call_id", None)
        return call_id or (agent.name, tool.name)

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any],
                            tool: Tool) -> None:
        """Start the tool's clock (nothing is published yet)."""
        self._tool_clock[self._tool_key(context, agent, tool)] = time.perf_counter()

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool,
                          result: object) -> None:
        """Publish ``tool_result`` with the time between tool start and end."""
        started = self._tool_clock.pop(self._tool_key(context, agent, tool), None)
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3) if started else None
        value = to_jsonable(result)
        if isinstance(value, str):
            value = _truncate(value, self.max_result_chars)
        await self.publish(EventType.TOOL_RESULT, {
            "agent_name": agent.name,
            "tool_name": tool.name,
            "tool_call_id": getattr(context, "tool_call_id", None),
            "result": value,
            "execution_time_ms": elapsed_ms,
        })

    async def on_llm_start(self, context: RunContextWrapper[Any], agent: Agent[Any],
                           system_prompt: str | None,
                           input_items: list[TResponseInputItem]) -> None:
        """Not published (LLM calls are summarised by agent_completed)."""

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any],
                         response: ModelResponse) -> None:
        """Not published."""

    # ---------------------------------------------------------------- errors

    async def publish_error(self, exc: BaseException, agent_name: str | None = None) -> bool:
        """Publish an ``error`` event for ``exc`` (agent: the one that started last)."""
        return await self.publish(EventType.ERROR, {
            "agent_name": agent_name or self.current_agent,
            "error_type": type(exc).__name__,
            "error_message": _truncate(str(exc), self.max_result_chars),
        })

    def track_errors(self, agent_name: str | None = None) -> ErrorTracker:
        """Context manager (``async with`` or ``with``) that publishes ``error`` if the run
        raises, then lets the exception go on. The SDK has no error hook, so wrap the run::

            async with hooks.track_errors():
                result = await Runner.run(agent, "hi", hooks=hooks)
        """
        return ErrorTracker(self, agent_name)

    async def run(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> Any:
        """``Runner.run`` with these hooks (composed with ``hooks=`` if given) and
        ``error`` on failure."""
        kwargs["hooks"] = compose_hooks(self, kwargs["hooks"]) if kwargs.get("hooks") else self
        async with self.track_errors():
            return await Runner.run(starting_agent, input, **kwargs)

    def run_sync(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> Any:
        """``Runner.run_sync`` with these hooks and ``error`` on failure."""
        kwargs["hooks"] = compose_hooks(self, kwargs["hooks"]) if kwargs.get("hooks") else self
        with self.track_errors():
            return Runner.run_sync(starting_agent, input, **kwargs)


class ErrorTracker:
    """Publishes an ``error`` event when the block raises (see ``track_errors``)."""

    def __init__(self, hooks: CoordinatorHooks, agent_name: str | None) -> None:
        self._hooks = hooks
        self._agent_name = agent_name

    async def __aenter__(self) -> ErrorTracker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if isinstance(exc, Exception):
            await self._hooks.publish_error(exc, self._agent_name)

    def __enter__(self) -> ErrorTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not isinstance(exc, Exception):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # inside a running loop a sync publish would deadlock; use ``async with``
            logger.warning("track_errors() used with 'with' inside a running event loop; the "
                           "error event was not published (use 'async with')")
            return
        # Runner.run_sync runs on the thread's default loop and leaves it open: the
        # coordinator's connections belong to that loop, so publish there too.
        policy = asyncio.get_event_loop_policy()
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            loop = policy.new_event_loop()
            policy.set_event_loop(loop)
        loop.run_until_complete(self._hooks.publish_error(exc, self._agent_name))


class _ComposedHooks(RunHooks[Any]):
    """Calls several ``RunHooks`` in order for every hook."""

    def __init__(self, hooks: tuple[RunHooks[Any], ...]) -> None:
        self.hooks = hooks

    async def _each(self, call: Callable[[RunHooks[Any]], Awaitable[None]]) -> None:
        for hook in self.hooks:
            await call(hook)

    async def on_agent_start(self, context: AgentHookContext[Any], agent: Agent[Any]) -> None:
        await self._each(lambda h: h.on_agent_start(context, agent))

    async def on_agent_end(self, context: AgentHookContext[Any], agent: Agent[Any],
                           output: Any) -> None:
        await self._each(lambda h: h.on_agent_end(context, agent, output))

    async def on_handoff(self, context: RunContextWrapper[Any], from_agent: Agent[Any],
                         to_agent: Agent[Any]) -> None:
        await self._each(lambda h: h.on_handoff(context, from_agent, to_agent))

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any],
                            tool: Tool) -> None:
        await self._each(lambda h: h.on_tool_start(context, agent, tool))

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool,
                          result: object) -> None:
        await self._each(lambda h: h.on_tool_end(context, agent, tool, result))

    async def on_llm_start(self, context: RunContextWrapper[Any], agent: Agent[Any],
                           system_prompt: str | None,
                           input_items: list[TResponseInputItem]) -> None:
        await self._each(lambda h: h.on_llm_start(context, agent, system_prompt, input_items))

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any],
                         response: ModelResponse) -> None:
        await self._each(lambda h: h.on_llm_end(context, agent, response))


def compose_hooks(*hooks: RunHooks[Any] | None) -> RunHooks[Any]:
    """One ``RunHooks`` that calls each of ``hooks`` in order (None entries are dropped).

    Exceptions of your own hooks still abort the run, as they would without composition.
    """
    present = tuple(h for h in hooks if h is not None)
    if not present:
        return RunHooks()
    if len(present) == 1:
        return present[0]
    return _ComposedHooks(present)

"""CoordinatorHooks on real servers with offline scripted models: what gets published, in
which order, and that a failing or hanging Redis never breaks (or stalls) the run."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from agents import Agent, RunContextWrapper, RunHooks, Runner, Tool, set_tracing_disabled
from agents.run_context import AgentHookContext

from agents_support.models import RuleModel
from agents_support.scenario import local_agents
from agentstreams import AgentCoordinator, ConnectionLostError, InvalidArgumentError
from agentstreams._codec import decode_entry
from agentstreams._events import Event
from agentstreams.integrations.openai_agents import CoordinatorHooks, compose_hooks
from agentstreams.server import find_free_port
from conftest import stream_entries

set_tracing_disabled(True)

PROMPT = "Write a brief on Redis Streams"

#: (type, agent) of every event a plain run of the three-agent chain publishes, in order.
EXPECTED_CHAIN = [
    ("agent_started", "triage"),
    ("agent_completed", "triage"),
    ("handoff_ready", "triage"),
    ("agent_started", "research"),
    ("tool_result", "research"),
    ("agent_completed", "research"),
    ("handoff_ready", "research"),
    ("agent_started", "writer"),
    ("agent_completed", "writer"),
]


async def read_events(raw: aioredis.Redis, stream: str) -> list[Event]:
    return [decode_entry(msg_id, fields, stream=stream)
            for msg_id, fields in await stream_entries(raw, stream)]


def summary(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.type, e.get("agent_name") or e.get("from_agent")) for e in events]


@pytest.fixture
async def coordinator(redis_url: str, stream_name: str) -> AsyncIterator[AgentCoordinator]:
    async with AgentCoordinator(redis_url, stream_name) as coord:
        yield coord


def check_chain_fields(events: list[Event], session_id: str) -> None:
    assert all(e["session_id"] == session_id for e in events)
    by_type: dict[str, list[Event]] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    tool = by_type["tool_result"][0]
    assert tool["tool_name"] == "lookup"
    assert tool["result"] == '{"topic": "Redis Streams", "fact": "Redis Streams are ' \
                             'append-only logs"}'
    assert tool["execution_time_ms"] >= 50  # the tool sleeps 0.05 s
    assert tool["tool_call_id"] == "call_research_3"
    completed = {e["agent_name"]: e for e in by_type["agent_completed"]}
    # tokens per agent come from the run's usage: 15 per scripted model call
    assert completed["triage"]["tokens_used"] == 15
    assert completed["research"]["tokens_used"] == 30
    assert completed["writer"]["tokens_used"] == 15
    assert completed["writer"]["usage"]["total_tokens"] == 60
    assert completed["triage"]["handed_off_to"] == "research"
    assert completed["writer"]["handed_off_to"] is None
    assert completed["writer"]["output_summary"].startswith("BRIEF: Write a brief")
    assert completed["research"]["duration_ms"] >= 50
    handoffs = by_type["handoff_ready"]
    assert [(h["from_agent"], h["to_agent"], h["remote"]) for h in handoffs] == [
        ("triage", "research", False), ("research", "writer", False)]
    assert handoffs[1]["context"]["usage"]["total_tokens"] == 45
    assert by_type["agent_started"][0]["input_summary"] == PROMPT


async def test_plain_run_publishes_lifecycle_in_order(
        coordinator: AgentCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    hooks = CoordinatorHooks(coordinator, session_id="s-plain")
    agents = local_agents(slow_s=0.05)
    result = await Runner.run(agents["triage"], PROMPT, hooks=hooks)
    assert result.last_agent.name == "writer"
    events = await read_events(raw, stream_name)
    assert summary(events) == EXPECTED_CHAIN
    check_chain_fields(events, "s-plain")
    assert hooks.stats.as_dict() == {"published": 9, "failed": 0, "skipped": 0}


async def test_streamed_run_publishes_the_same_events(
        coordinator: AgentCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    hooks = CoordinatorHooks(coordinator, session_id="s-stream")
    streamed = Runner.run_streamed(local_agents(slow_s=0.05)["triage"], PROMPT, hooks=hooks)
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output.startswith("BRIEF:")
    events = await read_events(raw, stream_name)
    assert summary(events) == EXPECTED_CHAIN
    check_chain_fields(events, "s-stream")


def test_run_sync_publishes_and_tracks_errors(redis_url: str, stream_name: str) -> None:
    """run_sync drives its own loop; the hooks publish on it (in a thread with no loop yet)."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        coordinator = AgentCoordinator(redis_url, stream_name)
        hooks = CoordinatorHooks(coordinator, session_id="s-sync")
        try:
            outcome["output"] = hooks.run_sync(local_agents(slow_s=0.05)["triage"], PROMPT)
            broken = Agent(name="broken", model=RuleModel(_explode))
            with pytest.raises(RuntimeError, match="model exploded"):
                hooks.run_sync(broken, "hi")
            loop = asyncio.get_event_loop_policy().get_event_loop()
            outcome["events"] = loop.run_until_complete(_read_with_new_client(
                redis_url, stream_name))
            loop.run_until_complete(coordinator.close())
            loop.close()
        except BaseException as exc:  # reported to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    events: list[Event] = outcome["events"]
    assert summary(events) == [*EXPECTED_CHAIN, ("agent_started", "broken"),
                               ("error", "broken")]
    check_chain_fields(events[:9], "s-sync")
    assert events[-1]["error_type"] == "RuntimeError"
    assert events[-1]["error_message"] == "model exploded"


async def _read_with_new_client(url: str, stream: str) -> list[Event]:
    client = aioredis.Redis.from_url(url)
    try:
        events = await read_events(client, stream)
        await client.delete(stream)
        return events
    finally:
        await client.aclose()


def _explode(items: list[dict[str, Any]]) -> list[Any]:
    raise RuntimeError("model exploded")


async def test_track_errors_publishes_error_and_reraises(
        coordinator: AgentCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    hooks = CoordinatorHooks(coordinator, session_id="s-err")
    broken = Agent(name="broken", model=RuleModel(_explode))
    with pytest.raises(RuntimeError, match="model exploded"):
        async with hooks.track_errors():
            await Runner.run(broken, "hi", hooks=hooks)
    with pytest.raises(RuntimeError, match="model exploded"):
        await hooks.run(broken, "again")
    events = await read_events(raw, stream_name)
    assert summary(events) == [("agent_started", "broken"), ("error", "broken")] * 2
    assert events[1]["error_type"] == "RuntimeError"
    assert events[1]["error_message"] == "model exploded"


class Recorder(RunHooks[Any]):
    """A user's own hooks: records what it saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def on_agent_start(self, context: AgentHookContext[Any], agent: Agent[Any]) -> None:
        self.calls.append(f"start:{agent.name}")

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool,
                          result: object) -> None:
        self.calls.append(f"tool:{tool.name}")

    async def on_handoff(self, context: RunContextWrapper[Any], from_agent: Agent[Any],
                         to_agent: Agent[Any]) -> None:
        self.calls.append(f"handoff:{from_agent.name}->{to_agent.name}")


async def test_composes_with_user_hooks(
        coordinator: AgentCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    mine = Recorder()
    hooks = CoordinatorHooks(coordinator, session_id="s-compose")
    await hooks.run(local_agents()["triage"], PROMPT, hooks=mine)
    assert mine.calls == ["start:triage", "handoff:triage->research", "start:research",
                          "tool:lookup", "handoff:research->writer", "start:writer"]
    assert summary(await read_events(raw, stream_name)) == EXPECTED_CHAIN
    assert compose_hooks(None, mine) is mine


@contextlib.contextmanager
def blackhole_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: Redis hung, not down."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


async def test_hung_redis_does_not_break_or_stall_the_run() -> None:
    with blackhole_server() as url:
        coordinator = AgentCoordinator(url, "never-written")
        hooks = CoordinatorHooks(coordinator, session_id="s-hung", publish_timeout_s=0.2,
                                 suspend_s=60)
        started = time.monotonic()
        result = await Runner.run(local_agents()["triage"], PROMPT, hooks=hooks)
        elapsed = time.monotonic() - started
        await coordinator.close()
    assert result.final_output.startswith("BRIEF:")
    # one publish timed out, then publishing paused: the run paid one timeout, not nine
    assert hooks.stats.as_dict() == {"published": 0, "failed": 1, "skipped": 8}
    assert elapsed < 1.5


async def test_redis_down_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{find_free_port()}"  # nothing listens there
    coordinator = AgentCoordinator(url, "never-written")
    hooks = CoordinatorHooks(coordinator, session_id="s-down", suspend_s=0)
    result = await Runner.run(local_agents()["triage"], PROMPT, hooks=hooks)
    await coordinator.close()
    assert result.final_output.startswith("BRIEF:")
    assert hooks.stats.as_dict() == {"published": 0, "failed": 9, "skipped": 0}
    assert "could not publish agent_started for session 's-down'" in caplog.text


async def test_strict_hooks_raise_on_publish_failure() -> None:
    coordinator = AgentCoordinator(f"redis://127.0.0.1:{find_free_port()}", "never-written")
    hooks = CoordinatorHooks(coordinator, strict=True)
    with pytest.raises(ConnectionLostError):
        await Runner.run(local_agents()["triage"], PROMPT, hooks=hooks)
    await coordinator.close()
    assert hooks.stats.failed == 1


async def test_rejects_bad_arguments(coordinator: AgentCoordinator) -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        CoordinatorHooks(coordinator, extra_fields={"_secret": 1})
    with pytest.raises(InvalidArgumentError):
        CoordinatorHooks(coordinator, publish_timeout_s=0)
    with pytest.raises(InvalidArgumentError):
        CoordinatorHooks("not a coordinator")  # type: ignore[arg-type]

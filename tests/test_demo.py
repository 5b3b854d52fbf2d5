"""``agentstreams demo``: the real command in a subprocess, and the role chain in-process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams.coordinator import AgentCoordinator
from agentstreams.demo.agent import STOP_EVENT, handle_handoff, run_agent
from agentstreams.demo.roles import (
    CHAIN,
    FIRST_ROLE,
    Role,
    RoleEnv,
    RoleOutput,
    role_named,
    task_context,
)
from agentstreams.server import LocalServer

#: A demo run in these tests must end well within this (it normally takes 1-3 s).
DEMO_TIMEOUT_S = 60


def _demo_command(*args: str) -> list[str]:
    """The installed console script next to this interpreter (``python -m`` without one)."""
    script = Path(sys.executable).with_name("agentstreams")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "agentstreams.cli.main"]
    return [*base, "demo", *args]


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(_demo_command(*args), capture_output=True, text=True, env=env,
                          timeout=DEMO_TIMEOUT_S, check=False)


def _summary_value(output: str, label: str) -> str:
    match = re.search(rf"^\|\s*{re.escape(label)}\s*\|\s*(\S+)", output, re.MULTILINE)
    assert match, f"no {label!r} row in the summary:\n{output}"
    return match.group(1)


def test_demo_on_embedded_valkey_completes_every_session() -> None:
    result = _run_demo("--tasks", "2", "--plain", "--pace", "0.2")
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert _summary_value(output, "sessions completed") == "2/2"
    assert _summary_value(output, "lost") == "0"
    assert _summary_value(output, "handoffs") == "6"
    assert _summary_value(output, "dead letters") == "0"
    assert "OK: every task completed, nothing lost" in output
    assert "(embedded)" in output
    # Plain output is for logs: no escape sequences.
    assert "\x1b[" not in output
    # The timeline shows the whole chain for each task.
    rows = [line for line in output.splitlines() if " handoff_ready " in line]
    for step in ("user → planner", "planner → researcher", "researcher → writer"):
        assert sum(step in row for row in rows) == 2, output


async def test_demo_on_given_server_reports_json_and_cleans_up(
        valkey_server: LocalServer) -> None:
    result = await asyncio.to_thread(_run_demo, "--redis-url", valkey_server.url, "--tasks",
                                     "2", "--json", "--pace", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]["summary"]
    assert summary["ok"] is True
    assert summary["sessions_started"] == summary["sessions_completed"] == 2
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["events_by_type"] == {
        "demo_agent_ready": 3, "handoff_ready": 6, "agent_started": 6, "tool_result": 6,
        "agent_completed": 6, "state_changed": 2,
    }
    assert summary["agent_exit_codes"] == {"planner": 0, "researcher": 0, "writer": 0}
    events = [line["event"] for line in lines if "event" in line]
    assert len(events) == sum(summary["events_by_type"].values())
    # A generated stream on the user's server is removed with its side keys.
    client = aioredis.Redis.from_url(valkey_server.url)
    try:
        assert await client.exists(summary["stream"]) == 0
        assert [k async for k in client.scan_iter(match=f"{{{summary['stream']}}}*")] == []
    finally:
        await client.aclose()


async def test_demo_that_cannot_finish_exits_non_zero(valkey_server: LocalServer) -> None:
    # Simulated work 100x slower than normal cannot finish before a 2 s deadline.
    result = await asyncio.to_thread(_run_demo, "--redis-url", valkey_server.url, "--tasks",
                                     "1", "--plain", "--pace", "100", "--timeout", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: timed out after 2s with 0 of 1 tasks completed" in result.stdout
    assert _summary_value(result.stdout, "lost") == "1"


async def _collect(observer: AgentCoordinator, until_type: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async for event in observer.subscribe(timeout_ms=200):
        seen.append(event)
        if event["type"] == until_type:
            break
    return seen


async def test_role_chain_hands_a_task_through_every_role_and_acks_everything(
        valkey_server: LocalServer) -> None:
    url, stream = valkey_server.url, f"test-demo-{uuid.uuid4().hex[:12]}"
    run_id = "r1"
    async with AgentCoordinator(url, stream, consumer_group="observer",
                                consumer_name="observer-1") as observer:
        agents = [asyncio.create_task(run_agent(url, stream, role, run_id, pace=0))
                  for role in CHAIN]
        await observer.publish_handoff_ready("user", FIRST_ROLE, "s1", task_context(1))
        seen = await asyncio.wait_for(_collect(observer, "state_changed"), 15)
        await observer.publish(STOP_EVENT, {"run_id": run_id})
        handled = await asyncio.wait_for(asyncio.gather(*agents), 15)
        assert handled == [1, 1, 1]

        chain = [(e["type"], e.get("agent_name") or e.get("to_agent") or e.get("tool_name"))
                 for e in seen if e.get("session_id") == "s1"]
        assert chain == [
            ("handoff_ready", "planner"), ("agent_started", "planner"),
            ("agent_completed", "planner"), ("handoff_ready", "researcher"),
            ("agent_started", "researcher"), ("tool_result", "search"),
            ("tool_result", "search"), ("tool_result", "search"),
            ("agent_completed", "researcher"), ("handoff_ready", "writer"),
            ("agent_started", "writer"), ("agent_completed", "writer"),
            ("state_changed", None),
        ]
        final = seen[-1]["changes"]
        assert final["status"] == "completed"
        assert final["completed_by"] == "writer"
        assert final["result"].startswith("Brief: consumer groups in Redis Streams.")
        # Every role acknowledged everything it read (the stop event included).
        info = await observer.get_stream_info()
        pending = {g["name"]: g["pending"] for g in info["groups"]}
        assert {name: pending[name] for name in ("planner", "researcher", "writer")} == {
            "planner": 0, "researcher": 0, "writer": 0}
        client = aioredis.Redis.from_url(url)
        await client.delete(stream)
        await client.aclose()


async def test_redelivered_handoff_publishes_nothing_twice(valkey_server: LocalServer) -> None:
    url, stream = valkey_server.url, f"test-demo-{uuid.uuid4().hex[:12]}"
    async with AgentCoordinator(url, stream) as coordinator:
        event = {"type": "handoff_ready", "from_agent": "planner", "to_agent": "researcher",
                 "session_id": "s1", "context": {**task_context(2), "plan": ["a", "b"]}}
        researcher = role_named("researcher")
        await handle_handoff(coordinator, researcher, event, pace=0)
        length = (await coordinator.get_stream_info())["length"]
        assert length == 5  # started, 2 tool results, completed, handoff to the writer
        await handle_handoff(coordinator, researcher, event, pace=0)
        assert (await coordinator.get_stream_info())["length"] == length
        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=f"{{{stream}}}*")]
        await client.delete(stream, *keys)
        await client.aclose()


async def test_failing_role_publishes_an_error_and_raises(valkey_server: LocalServer) -> None:
    async def broken(context: dict[str, Any], env: RoleEnv) -> RoleOutput:
        raise RuntimeError("model unavailable")

    url, stream = valkey_server.url, f"test-demo-{uuid.uuid4().hex[:12]}"
    async with AgentCoordinator(url, stream, consumer_group="observer") as coordinator:
        event = {"type": "handoff_ready", "from_agent": "user", "to_agent": "planner",
                 "session_id": "s1", "context": task_context(1)}
        with pytest.raises(RuntimeError, match="model unavailable"):
            await handle_handoff(coordinator, Role("planner", broken, "researcher"), event)
        seen = [e async for e in coordinator.subscribe(timeout_ms=200, max_events=2)]
        assert [e["type"] for e in seen] == ["agent_started", "error"]
        assert seen[1]["agent_name"] == "planner"
        assert seen[1]["error_type"] == "RuntimeError"
        assert seen[1]["error_message"] == "model unavailable"
        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=f"{{{stream}}}*")]
        await client.delete(stream, *keys)
        await client.aclose()

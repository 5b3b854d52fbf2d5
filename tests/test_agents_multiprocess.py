"""Distributed agents across real OS processes (tests/agents_support/worker_proc.py), with
the SDK's scripted model: the same answer as one process, and a kill -9 of the worker in the
middle of the chain that the caller never notices."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis.asyncio as aioredis
from agents import Runner, set_tracing_disabled

from agents_support.scenario import TOPIC_PREFIX, local_agents
from agentstreams.integrations.openai_agents import AgentClient, Keys
from agentstreams.server import LocalServer

set_tracing_disabled(True)

TESTS_DIR = Path(__file__).parent
PROMPT = TOPIC_PREFIX + "Redis Streams"
STARTUP_TIMEOUT_S = 30.0


class Fleet:
    """Worker processes of one test; every one is killed at teardown."""

    def __init__(self, url: str, namespace: str, log_dir: Path) -> None:
        self.url = url
        self.namespace = namespace
        self.log_dir = log_dir
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.logs: list[IO[bytes]] = []
        self.redis = aioredis.Redis.from_url(url)

    async def spawn(self, name: str, agents: str, *, visibility_ms: int = 30_000,
                    slow_s: float = 0.0) -> None:
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR),
                                                         os.environ.get("PYTHONPATH")) if p),
               "OPENAI_API_KEY": "sk-test-offline", "OPENAI_AGENTS_DISABLE_TRACING": "1"}
        log = (self.log_dir / f"{name}.log").open("wb")
        self.logs.append(log)
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents_support.worker_proc", self.url, self.namespace, agents,
            "--name", name, "--visibility-ms", str(visibility_ms), "--slow-s", str(slow_s),
            stdout=log, stderr=log, env=env, cwd=str(TESTS_DIR.parent))

    def log_of(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]

    async def wait_ready(self) -> None:
        """Until every process is consuming; fails fast (with its log) if one died."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(self.procs)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.returncode is not None:
                    pytest.fail(f"worker {name} exited with {proc.returncode}:\n"
                                f"{self.log_of(name)}")
                if await self.redis.exists(f"{self.namespace}:ready:{name}"):
                    pending.discard(name)
            if time.monotonic() > deadline:
                pytest.fail(f"workers {sorted(pending)} not ready in {STARTUP_TIMEOUT_S}s")
            await asyncio.sleep(0.05)

    async def probes(self) -> list[dict[str, Any]]:
        raw: Any = await self.redis.lrange(f"{self.namespace}:probe", 0, -1)
        return [json.loads(item) for item in raw]

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        for log in self.logs:
            log.close()
        keys = [k async for k in self.redis.scan_iter(match=f"*{self.namespace}:*")]
        if keys:
            await self.redis.delete(*keys)
        await self.redis.aclose()


@pytest.fixture
async def fleet(valkey_server: LocalServer, tmp_path: Path) -> AsyncIterator[Fleet]:
    fleet = Fleet(valkey_server.url, f"mp{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        yield fleet
    finally:
        await fleet.close()


async def expected_output() -> str:
    result = await Runner.run(local_agents()["triage"], PROMPT)
    return str(result.final_output)


async def test_three_processes_give_the_same_output_as_one(fleet: Fleet) -> None:
    for agent in ("triage", "research", "writer"):
        await fleet.spawn(f"proc-{agent}", agent)
    await fleet.wait_ready()
    async with AgentClient(fleet.url, namespace=fleet.namespace) as client:
        result = await client.run("triage", PROMPT, session_id="s-mp", timeout_s=30)
        status = await client.status("s-mp")
    assert result.final_output == await expected_output()
    assert result.last_agent == "writer"
    assert result.agents == ["triage", "research", "writer"]
    assert result.workers == ["proc-triage", "proc-research", "proc-writer"]
    assert result.usage["total_tokens"] == 60
    assert status is not None
    assert [h.state for h in status.hops] == ["completed"] * 3
    pids = {p["pid"] for p in await fleet.probes()}
    assert pids == {fleet.procs["proc-research"].pid}  # the tool ran in the research process


async def _pending_owner(redis: aioredis.Redis, stream: str) -> tuple[str, int] | None:
    rows: Any = await redis.xpending_range(stream, "workers", min="-", max="+", count=10)
    if not rows:
        return None
    return rows[0]["consumer"].decode(), int(rows[0]["times_delivered"])


@pytest.mark.slow
async def test_kill_9_of_the_middle_worker_during_a_slow_tool(fleet: Fleet) -> None:
    visibility_ms, slow_s = 1000, 2.5
    await fleet.spawn("proc-triage", "triage")
    for replica in ("a", "b"):
        await fleet.spawn(f"proc-research-{replica}", "research", visibility_ms=visibility_ms,
                          slow_s=slow_s)
    await fleet.spawn("proc-writer", "writer")
    await fleet.wait_ready()
    keys = Keys(fleet.namespace)
    expected = await expected_output()
    async with AgentClient(fleet.url, namespace=fleet.namespace) as client:
        started = time.monotonic()
        run_id = await client.submit("triage", PROMPT, session_id="s-kill", timeout_s=40)

        deadline = time.monotonic() + 20
        while not (probes := await fleet.probes()):
            assert time.monotonic() < deadline, "the slow tool never started"
            await asyncio.sleep(0.02)
        first = probes[0]
        tool_started = time.monotonic()
        victim = next(n for n, p in fleet.procs.items() if p.pid == first["pid"])
        survivor = ({"proc-research-a", "proc-research-b"} - {victim}).pop()

        # Let the tool outlive the visibility timeout by half: lease renewal must keep the hop
        # with its worker (no second start, still one delivery).
        await asyncio.sleep(max(0.0, tool_started + visibility_ms * 1.5 / 1000
                                - time.monotonic()))
        assert len(await fleet.probes()) == 1
        assert await _pending_owner(fleet.redis, keys.inbox("research")) == (victim, 1)

        os.kill(first["pid"], signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        result = await client.wait(run_id, timeout_s=30)
        done_at = time.monotonic()
        status = await client.status("s-kill")
        stats = client.stats

    probes = await fleet.probes()
    starts = [p for p in probes if p["event"] == "start"]
    dones = [p for p in probes if p["event"] == "done"]
    # the caller got the same answer, once
    assert result.final_output == expected
    assert stats.replies == 1
    assert stats.late_or_duplicate_replies == 0
    # the middle hop ran again on the other replica; the earlier hop was not redone
    assert result.workers == ["proc-triage", survivor, "proc-writer"]
    assert [link.delivery_count for link in result.chain] == [1, 2, 1]
    assert [p["pid"] for p in starts] == [first["pid"], fleet.procs[survivor].pid], probes
    assert [p["pid"] for p in dones] == [fleet.procs[survivor].pid]
    # the tool saw the same stable call key both times, so its effect happened once
    assert starts[0]["key"] == starts[1]["key"] == dones[0]["key"]
    assert int(await fleet.redis.get(f"{fleet.namespace}:effects") or 0) == 1
    # one entry per hop: nothing was offered twice
    for agent in ("triage", "research", "writer"):
        assert await fleet.redis.xlen(keys.inbox(agent)) == 1
    assert status is not None
    assert status.status == "completed"
    assert [(h.agent, h.state, h.worker) for h in status.hops] == [
        ("triage", "completed", "proc-triage"), ("research", "completed", survivor),
        ("writer", "completed", "proc-writer")]
    reclaimed_after_s = starts[1]["t"] - killed_wall
    recovery_s = done_at - killed_at
    print(f"\nkill -9 figures: tool started {tool_started - started:.2f}s after submit; "
          f"killed {killed_at - tool_started:.2f}s into a {slow_s}s tool (visibility "
          f"{visibility_ms} ms, no steal before the kill); re-run started on {survivor} "
          f"{reclaimed_after_s:.2f}s after the kill; result {recovery_s:.2f}s after the kill; "
          f"total {done_at - started:.2f}s; tool starts {len(starts)}, completions "
          f"{len(dones)}, effects 1, replies {stats.replies}")
    # recovery bound: idle time + reclaim interval + block time, plus slack for a busy box
    assert reclaimed_after_s < visibility_ms / 1000 * 1.5 + 0.2 + 2.0
    assert recovery_s < reclaimed_after_s + slow_s + 5

"""Orchestration of ``agentstreams demo``: server, agent processes, tasks, observer, shutdown.

The runner starts one OS process per role, waits until each announced itself, hands the tasks
to the first role, and watches the stream through its own consumer group until every task is
finished or the deadline passes. It never sleeps for a fixed time: it waits on conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from agentstreams.connection import ConnectionSettings, call, create_client
from agentstreams.coordinator import AgentCoordinator
from agentstreams.demo.agent import IDEMPOTENCY_WINDOW_S, STOP_EVENT, URL_ENV
from agentstreams.demo.roles import CHAIN, FIRST_ROLE, task_context
from agentstreams.demo.timeline import DemoSummary, RunTracker, TimelineEntry, session_id_for
from agentstreams.errors import AgentStreamsError, InvalidArgumentError
from agentstreams.runtime.streams import side_key
from agentstreams.server import LocalServer

__all__ = [
    "OBSERVER_GROUP",
    "DemoConfig",
    "DemoDisplay",
    "new_stream_name",
    "redact",
    "run",
    "run_demo",
]

#: The consumer group the runner watches the stream through.
OBSERVER_GROUP = "demo-observer"
#: How long agents get to exit after the stop event before they are terminated (they finish
#: the hand-off in hand first).
AGENT_STOP_TIMEOUT_S = 10.0
#: The same after a failed run: an agent may be stuck, so do not wait long.
AGENT_STOP_AFTER_FAILURE_S = 2.0
#: Block time of one observer read (the loop is cancelled from outside at the deadline).
OBSERVER_BLOCK_MS = 500
#: Lines of an agent's stderr shown when it failed.
AGENT_LOG_TAIL_LINES = 15


def new_stream_name() -> str:
    """A fresh stream name for one demo run."""
    return f"demo:{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What to run; rejects impossible values when built."""

    tasks: int = 3
    stream: str | None = None
    #: Multiplier of the agents' simulated work time (0 = no simulated work).
    pace: float = 1.0
    #: Deadline for the whole run, agent start-up included.
    timeout_s: float = 60.0
    #: Keep a generated stream afterwards (a named stream is always kept).
    keep: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, int) or not 1 <= self.tasks <= 10_000:
            raise InvalidArgumentError(f"tasks must be between 1 and 10000, got {self.tasks!r}")
        if self.pace < 0:
            raise InvalidArgumentError(f"pace must be >= 0, got {self.pace!r}")
        if self.timeout_s <= 0:
            raise InvalidArgumentError(f"timeout_s must be positive, got {self.timeout_s!r}")


class DemoDisplay(Protocol):
    """Where the run is shown: a header, timeline rows, progress notes and the summary."""

    def header(self, info: dict[str, Any]) -> None:
        """The run is about to start (stream, server, tasks, chain)."""

    def event(self, entry: TimelineEntry) -> None:
        """One observed event."""

    def progress(self, text: str) -> None:
        """What the run is waiting for now (may be ignored)."""

    def summary(self, summary: DemoSummary, agent_logs: dict[str, str]) -> None:
        """The closing numbers; ``agent_logs`` holds the stderr tail of agents that failed."""

    def close(self) -> None:
        """Release the terminal (stop any animation); called even after an error."""


def redact(url: str) -> str:
    """``url`` without its password, for display."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(slots=True)
class _Agent:
    role: str
    process: asyncio.subprocess.Process
    log_path: Path


async def _start_agents(url: str, stream: str, run_id: str, pace: float,
                        log_dir: Path) -> list[_Agent]:
    env = {**os.environ, URL_ENV: url}
    agents: list[_Agent] = []
    for role in CHAIN:
        log_path = log_dir / f"{role.name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agentstreams.demo.agent", "--stream", stream,
                "--role", role.name, "--run-id", run_id, "--pace", repr(pace),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log)
        agents.append(_Agent(role.name, process, log_path))
    return agents


async def _first_exit(agents: list[_Agent]) -> _Agent:
    """Returns the first agent process that exits (they should only exit when told)."""
    waits = {asyncio.ensure_future(agent.process.wait()): agent for agent in agents}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return waits[next(iter(done))]
    finally:
        for task in waits:
            task.cancel()


async def _observe(observer: AgentCoordinator, tracker: RunTracker, tasks: int,
                   display: DemoDisplay) -> None:
    """Render every event of the run; publish the tasks once all agents are ready; return
    when every task is finished."""
    display.progress(f"waiting for {len(CHAIN)} agents to start")
    events = observer.subscribe(timeout_ms=OBSERVER_BLOCK_MS)
    try:
        async for event in events:
            entry = tracker.record(event, time.time())
            if entry is not None:
                display.event(entry)
            if tracker.tasks_published_at is None and tracker.all_ready:
                for index in range(1, tasks + 1):
                    session_id = session_id_for(tracker.run_id, index)
                    await observer.publish_handoff_ready(
                        "user", FIRST_ROLE, session_id, task_context(index),
                        idempotency_key=f"{session_id}:user:handoff")
                tracker.tasks_published(time.time())
            if tracker.tasks_published_at is not None:
                display.progress(f"{tracker.completed}/{tasks} tasks completed")
            if tracker.done:
                await observer.ack(event["_msg_id"])  # leaving the loop skips its ack
                return
    finally:
        await events.aclose()


async def _stop_agents(agents: list[_Agent], grace_s: float) -> dict[str, int | None]:
    """Wait up to ``grace_s`` for the agents to exit after the stop event; terminate, then
    kill, stragglers (their exit code is reported as None)."""
    async def stop(agent: _Agent) -> int | None:
        process = agent.process
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(process.wait(), grace_s)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), AGENT_STOP_TIMEOUT_S)
            return None  # it had to be terminated: not a clean exit
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return None

    codes = await asyncio.gather(*(stop(agent) for agent in agents))
    return {agent.role: code for agent, code in zip(agents, codes, strict=True)}


async def _server_label(url: str, embedded: bool) -> str:
    client = create_client(ConnectionSettings(url=url))
    try:
        info = await call(lambda: client.info("server"))
    finally:
        await client.aclose()
    if "valkey_version" in info:
        name = f"Valkey {info['valkey_version']!s}"
    else:
        name = f"Redis {info.get('redis_version', '?')!s}"
    return f"{name}{' (embedded)' if embedded else ''} at {redact(url)}"


async def _delete_stream(url: str, stream: str) -> None:
    """Remove the stream and its side keys (dead letters, idempotency keys)."""
    client = create_client(ConnectionSettings(url=url))
    try:
        async def delete() -> None:
            keys: list[Any] = [stream]
            async for key in client.scan_iter(match=side_key(stream, "*"), count=1000):
                keys.append(key)
            await client.delete(*keys)

        await call(delete, stream=stream)
    finally:
        await client.aclose()


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-AGENT_LOG_TAIL_LINES:])


async def run_demo(url: str, config: DemoConfig, display: DemoDisplay, *,
                   embedded: bool = False) -> DemoSummary:
    """Run the demo against the server at ``url`` and return its summary (never raises for a
    run that merely failed: the summary says what went wrong)."""
    stream = config.stream or new_stream_name()
    run_id = uuid.uuid4().hex[:6]
    started_at = time.time()
    server = await _server_label(url, embedded)
    tracker = RunTracker(run_id, stream, server, config.tasks,
                         tuple(role.name for role in CHAIN), started_at)
    summary = tracker.summary
    display.header({"stream": stream, "server": server, "tasks": config.tasks,
                    "run_id": run_id, "chain": [role.name for role in CHAIN],
                    "roles": {role.name: role.description for role in CHAIN}})
    observer = AgentCoordinator(url, stream, consumer_group=OBSERVER_GROUP,
                                consumer_name=f"observer-{os.getpid()}",
                                idempotency_window_s=IDEMPOTENCY_WINDOW_S)
    agent_logs: dict[str, str] = {}
    agents: list[_Agent] = []
    with tempfile.TemporaryDirectory(prefix="agentstreams-demo-") as log_dir:
        try:
            async with observer:  # creates the observer group before anything is published
                agents = await _start_agents(url, stream, run_id, config.pace, Path(log_dir))
                summary.failure = await _supervise(observer, tracker, agents, config, display)
                display.progress("stopping the agents")
                grace_s = AGENT_STOP_TIMEOUT_S if summary.failure is None \
                    else AGENT_STOP_AFTER_FAILURE_S
                try:
                    await observer.publish(STOP_EVENT, {"run_id": run_id,
                                                        "timestamp": time.time()})
                except AgentStreamsError as exc:  # the agents cannot hear it: do not wait long
                    summary.failure = summary.failure or f"could not publish the stop: {exc}"
                    grace_s = AGENT_STOP_AFTER_FAILURE_S
                summary.agent_exit_codes = await _stop_agents(agents, grace_s)
                with contextlib.suppress(AgentStreamsError):
                    summary.dead_letters = await observer.dead_letters.length()
        finally:
            for agent in agents:  # only after an exception: _stop_agents already reaped them
                if agent.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        agent.process.kill()
                    await agent.process.wait()
            if not embedded and config.stream is None and not config.keep:
                with contextlib.suppress(AgentStreamsError):
                    await _delete_stream(url, stream)
        for agent in agents:
            tail = _log_tail(agent.log_path)
            if tail and summary.agent_exit_codes.get(agent.role) != 0:
                agent_logs[agent.role] = tail
    display.summary(summary, agent_logs)
    return summary


async def _supervise(observer: AgentCoordinator, tracker: RunTracker, agents: list[_Agent],
                     config: DemoConfig, display: DemoDisplay) -> str | None:
    """Observe until done, an agent dies or the deadline passes; returns what failed."""
    observing = asyncio.create_task(_observe(observer, tracker, config.tasks, display))
    watching = asyncio.create_task(_first_exit(agents))
    done, pending = await asyncio.wait({observing, watching}, timeout=config.timeout_s,
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if observing in done:
        observing.result()  # an exception here is a bug or a dead server: let it surface
        return None
    if watching in done:
        agent = watching.result()
        return f"agent {agent.role} exited early with code {agent.process.returncode}"
    if not tracker.all_ready:
        missing = [name for name in tracker.agents if name not in tracker.ready]
        return f"timed out after {config.timeout_s:g}s waiting for agents {', '.join(missing)}"
    return (f"timed out after {config.timeout_s:g}s with {tracker.completed} of "
            f"{config.tasks} tasks completed")


def run(config: DemoConfig, display: DemoDisplay, url: str | None = None) -> DemoSummary:
    """Run the demo; without ``url``, on an embedded Valkey started and stopped here."""
    if url is not None:
        return asyncio.run(run_demo(url, config, display))
    display.progress("starting the embedded Valkey")
    with LocalServer("valkey") as server:
        return asyncio.run(run_demo(server.url, config, display, embedded=True))

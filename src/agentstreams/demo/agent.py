"""One demo agent on the stream: hosts a role from ``roles`` behind an ``AgentCoordinator``.

Runs as its own OS process (``python -m agentstreams.demo.agent --role planner ...``, the URL in
``$AGENTSTREAMS_DEMO_URL`` so it stays out of ``ps``). Each role has its own consumer group,
so every role sees every event and takes only the hand-offs addressed to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from agentstreams.coordinator import AgentCoordinator
from agentstreams.demo.roles import Role, role_named
from agentstreams.events import EventType

__all__ = [
    "READY_EVENT",
    "STOP_EVENT",
    "URL_ENV",
    "handle_handoff",
    "run_agent",
]

#: Published by an agent once its consumer group exists: the parent waits for all of them.
READY_EVENT = "demo_agent_ready"
#: Published by the parent to end every agent of one run.
STOP_EVENT = "demo_stop"
#: Environment variable carrying the server URL to the agent process.
URL_ENV = "AGENTSTREAMS_DEMO_URL"
#: Idempotency keys only need to outlive a redelivery within one demo run.
IDEMPOTENCY_WINDOW_S = 600.0
#: Block time of one read; bounds how long a stop takes to be noticed on a quiet stream.
READ_BLOCK_MS = 1000


class _CoordinatorEnv:
    """``RoleEnv`` for one hand-off: simulated work time and tool results on the stream."""

    def __init__(self, coordinator: AgentCoordinator, session_id: str, key_prefix: str,
                 pace: float) -> None:
        self._coordinator = coordinator
        self._session_id = session_id
        self._key_prefix = key_prefix
        self._pace = pace
        self._tool_calls = 0

    async def think(self, seconds: float) -> None:
        if self._pace > 0:
            await asyncio.sleep(seconds * self._pace)

    async def tool_result(self, tool_name: str, result: Any, execution_time_ms: float) -> None:
        self._tool_calls += 1
        await self._coordinator.publish_tool_result(
            tool_name, self._session_id, result, round(execution_time_ms, 2),
            idempotency_key=f"{self._key_prefix}:tool:{self._tool_calls}")


async def handle_handoff(coordinator: AgentCoordinator, role: Role, event: dict[str, Any],
                         pace: float = 1.0) -> None:
    """Do ``role``'s work on one ``handoff_ready`` event and pass the result on.

    Every publish has an idempotency key derived from the session and role, so a redelivered
    hand-off (after a crash before the ack) republishes nothing twice.
    """
    session_id = str(event["session_id"])
    context = dict(event.get("context") or {})
    key = f"{session_id}:{role.name}"
    await coordinator.publish_agent_started(role.name, session_id,
                                            str(context.get("task", ""))[:200],
                                            idempotency_key=f"{key}:started")
    started = time.perf_counter()
    try:
        output = await role.run(context, _CoordinatorEnv(coordinator, session_id, key, pace))
    except Exception as exc:
        # Tell everyone, then fail: the hand-off stays pending (unacknowledged) for a retry.
        await coordinator.publish_error(session_id, type(exc).__name__, str(exc), role.name,
                                        idempotency_key=f"{key}:error")
        raise
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    await coordinator.publish_agent_completed(role.name, session_id, output.summary,
                                              duration_ms, output.tokens_used,
                                              idempotency_key=f"{key}:completed")
    if role.next is not None:
        await coordinator.publish_handoff_ready(role.name, role.next, session_id,
                                                output.context, idempotency_key=f"{key}:handoff")
    else:
        await coordinator.publish_state_changed(session_id, {
            "status": "completed", "completed_by": role.name,
            "result": output.context.get("draft", ""),
        }, idempotency_key=f"{key}:final")


async def run_agent(url: str, stream: str, role: Role, run_id: str, *, pace: float = 1.0) -> int:
    """Serve ``role`` on ``stream`` until the run's stop event; returns hand-offs handled."""
    handled = 0
    coordinator = AgentCoordinator(url, stream, consumer_group=role.name,
                                   consumer_name=f"{role.name}-{os.getpid()}",
                                   idempotency_window_s=IDEMPOTENCY_WINDOW_S)
    async with coordinator:
        await coordinator.publish(READY_EVENT, {"agent_name": role.name, "pid": os.getpid(),
                                                "run_id": run_id, "timestamp": time.time()})
        events = coordinator.subscribe(timeout_ms=READ_BLOCK_MS)
        try:
            async for event in events:
                if event["type"] == STOP_EVENT and event.get("run_id") == run_id:
                    # Leaving the loop skips the implicit ack of this last event.
                    await coordinator.ack(event["_msg_id"])
                    break
                if (event["type"] == EventType.HANDOFF_READY.value
                        and event.get("to_agent") == role.name):
                    await handle_handoff(coordinator, role, event, pace)
                    handled += 1
        finally:
            await events.aclose()
    return handled


def main(argv: list[str] | None = None) -> int:
    """Command line of one agent process (started by the demo runner)."""
    parser = argparse.ArgumentParser(prog="python -m agentstreams.demo.agent")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--role", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--pace", type=float, default=1.0)
    args = parser.parse_args(argv)
    url = os.environ.get(URL_ENV)
    if not url:
        parser.error(f"set {URL_ENV} to the server URL")
    try:
        asyncio.run(run_agent(url, args.stream, role_named(args.role), args.run_id,
                              pace=args.pace))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reference-compatible AgentCoordinator: publish, subscribe, ack, claim, inspect, trim.

Run: python examples/coordinator_basics.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import uuid

from _server import server_url

from agentstreams import AgentCoordinator, EventType


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    async with AgentCoordinator(url, stream, consumer_group="analysts",
                                consumer_name="analyst-1") as coordinator:
        await coordinator.publish_handoff_ready(
            from_agent="research", to_agent="analysis", session_id="123",
            context={"findings": ["streams", "groups"], "confidence": 0.9})
        await coordinator.publish_tool_result("search", "123", {"hits": 3}, 12.5)
        await coordinator.publish_many([
            {"type": EventType.STATE_CHANGED, "session_id": "123", "changes": {"step": 2}},
            {"type": "custom_event", "session_id": "123", "flag": "true"},
        ])
        # Values keep their types: "123" and "true" stay strings, 0.9 stays a float.
        async for event in coordinator.subscribe(timeout_ms=500, max_events=10):
            print(f"{event['type']:<15} session={event['session_id']!r} id={event['_msg_id']}")
        info = await coordinator.get_stream_info()
        print(f"stream length {info['length']}, pending "
              f"{info['groups'][0]['pending']}, dead letters {info['dead_letters']}")
        # Trimming keeps everything a group has not acknowledged; here all is acknowledged.
        print(f"trimmed {await coordinator.trim_stream(0, approximate=False)} entries")


if __name__ == "__main__":
    with server_url() as url:
        asyncio.run(main(url))

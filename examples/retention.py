"""Safe retention: trimming never removes what a consumer group has not acknowledged.

Run: python examples/retention.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import uuid

from _server import server_url

from agentstreams import AgentCoordinator, StreamCap


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    # A hard memory guard far above the normal backlog: approximate MAXLEN on every publish.
    cap = StreamCap("maxlen", 100_000)
    async with AgentCoordinator(url, stream, consumer_group="slow-readers", cap=cap) as c:
        await c.publish_many([{"type": "tick", "n": n} for n in range(100)])
        async for _event in c.subscribe(timeout_ms=200, max_events=30):
            pass  # acknowledges 30 of the 100
        removed = await c.trim_stream(10, approximate=False)
        info = await c.get_stream_info()
        print(f"safe trim to 10: removed {removed}, {info['length']} left "
              "(the 70 unacknowledged entries are kept)")
        removed = await c.trim_stream(10, approximate=False, force=True)
        print(f"forced trim to 10: removed {removed} (a hard cap drops unacknowledged ones)")


if __name__ == "__main__":
    with server_url() as url:
        asyncio.run(main(url))

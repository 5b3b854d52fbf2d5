"""Idempotent publish: retrying after a timeout never writes the event twice.

Run: python examples/idempotent_publish.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import uuid

from _server import server_url

from agentstreams import AgentCoordinator, ConnectionLostError


async def publish_with_retry(coordinator: AgentCoordinator, session_id: str) -> str:
    """Retry a publish on connection loss; the idempotency key makes it happen once."""
    for attempt in range(5):
        try:
            return await coordinator.publish_state_changed(
                session_id, {"status": "approved"}, idempotency_key=f"approve:{session_id}")
        except ConnectionLostError:  # PublishTimeoutError included: it may have landed
            await asyncio.sleep(0.1 * 2**attempt)
    raise RuntimeError("server unreachable")


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    async with AgentCoordinator(url, stream) as coordinator:
        first = await publish_with_retry(coordinator, "s1")
        again = await publish_with_retry(coordinator, "s1")  # e.g. a retry after a timeout
        info = await coordinator.get_stream_info()
        print(f"first id {first}, retry id {again}, same: {first == again}, "
              f"entries in the stream: {info['length']}")


if __name__ == "__main__":
    with server_url() as url:
        asyncio.run(main(url))

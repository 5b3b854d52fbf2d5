"""A Worker: concurrent handlers, retries with backoff, dead letters, graceful shutdown.

Run: python examples/worker.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from _server import server_url, wait_until

from agentstreams import AgentCoordinator, Event, Reject, Worker


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    worker = Worker(url, stream, consumer_group="analysts", concurrency=8,
                    visibility_timeout_ms=5_000, max_deliveries=3, retry_delay_s=0.1)
    done = asyncio.Event()
    handled: list[str] = []

    @worker.handler("handoff_ready")
    async def on_handoff(event: Event) -> None:
        # Handlers may run more than once for the same event (at-least-once): make the
        # effect idempotent, e.g. keyed by event.event_id.
        if event["context"].get("poison"):
            raise ValueError("this task can never succeed")  # retried, then dead-lettered
        if event["context"].get("invalid"):
            raise Reject("missing input")  # dead-lettered at once
        handled.append(event.session_id)
        if len(handled) == 3:
            done.set()

    async with AgentCoordinator(url, stream) as producer:
        for n in range(3):
            await producer.publish_handoff_ready("triage", "analyst", f"s{n}", {"n": n})
        await producer.publish_handoff_ready("triage", "analyst", "bad", {"poison": True})
        await producer.publish_handoff_ready("triage", "analyst", "worse", {"invalid": True})

        await worker.start()
        await asyncio.wait_for(done.wait(), timeout=10)
        await wait_until(lambda: worker.stats.dead_lettered == 2)
        await worker.stop()

        print(f"handled {sorted(handled)}; stats {worker.stats.as_dict()}")
        for letter in await producer.dead_letters.list():
            print(f"dead letter {letter.original_id}: {letter.reason} ({letter.error}) after "
                  f"{letter.deliveries} deliveries")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    with server_url() as url:
        asyncio.run(main(url))

"""Request/reply: ask another agent a question and wait for its answer.

A Worker handler answers with ``await event.reply(...)``; a ``subscribe`` loop answers with
``await coordinator.reply(event, ...)``. No answer within ``timeout_s``: RequestTimeoutError.

Run: python examples/request_reply.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from _server import server_url

from agentstreams import AgentCoordinator, Event, RequestTimeoutError, Worker


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    worker = Worker(url, stream, consumer_group="calculators", block_ms=500)

    @worker.handler("add")
    async def add(event: Event) -> None:
        # Safe if the request is redelivered: one reply is written per request.
        await event.reply({"sum": sum(event["numbers"])})

    async with worker, AgentCoordinator(url, stream) as caller:
        reply = await caller.request("add", {"numbers": [1, 2, 3]}, timeout_s=10,
                                     session_id="s1")
        print(f"sum: {reply['sum']}")

        # Many requests at once from one coordinator: each gets its own reply.
        replies = await asyncio.gather(*(caller.request("add", {"numbers": [n, n]},
                                                        timeout_s=10) for n in range(5)))
        print(f"sums: {[r['sum'] for r in replies]}")

        # Nobody handles "divide": the request times out.
        try:
            await caller.request("divide", {"a": 1, "b": 0}, timeout_s=0.5)
        except RequestTimeoutError as exc:
            print(f"timed out after {exc.timeout_s}s")

    # The same with a subscribe loop answering (its own group on its own stream).
    stream = f"example:{uuid.uuid4().hex[:8]}"
    async with AgentCoordinator(url, stream, consumer_group="echo") as replier, \
            AgentCoordinator(url, stream) as caller:

        async def serve() -> None:
            async for event in replier.subscribe(max_events=1, timeout_ms=10_000):
                await replier.reply(event, {"text": event["text"].upper()})

        server = asyncio.create_task(serve())
        reply = await caller.request("echo", {"text": "hello"}, timeout_s=10)
        await server
        print(f"echo: {reply['text']}; stats {caller.request_stats.as_dict()}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    with server_url() as url:
        asyncio.run(main(url))

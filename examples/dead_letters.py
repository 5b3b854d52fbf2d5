"""Dead letters: inspect why events failed, fix the cause, replay them.

Run: python examples/dead_letters.py   (uses $REDIS_URL or an embedded Valkey)
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from _server import server_url, wait_until

from agentstreams import AgentCoordinator, Event, Worker


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    fixed = False
    succeeded: list[int] = []

    async def handle(event: Event) -> None:
        if not fixed:
            raise ConnectionError("downstream API unavailable")
        succeeded.append(event["n"])

    async with AgentCoordinator(url, stream) as producer:
        await producer.publish_many([{"type": "task", "n": n} for n in range(3)])
        worker = Worker(url, stream, "tasks", max_deliveries=2, retry_delay_s=0.05)
        worker.add_handler(handle)
        async with worker:
            await wait_until(lambda: worker.stats.dead_lettered == 3)
            dlq = producer.dead_letters
            for letter in await dlq.list():
                print(f"{letter.dlq_id}: n={letter.event()['n']} {letter.reason}: "
                      f"{letter.error}")
            fixed = True  # the downstream API is back: replay everything
            replayed = await dlq.replay(where=lambda letter: letter.reason == "max_deliveries")
            print(f"replayed {len(replayed)} dead letters")
            await wait_until(lambda: len(succeeded) == 3)
        print(f"succeeded after replay: {sorted(succeeded)}; dead letters left: "
              f"{await dlq.length()}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    with server_url() as url:
        asyncio.run(main(url))

"""Prometheus metrics of a worker, scraped from its own endpoint.

Run: python examples/metrics.py   (uses $REDIS_URL or an embedded Valkey; extra ``metrics``)
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
import uuid

from _server import server_url, wait_until

from agentstreams import AgentCoordinator, Event, Worker
from agentstreams.metrics import attach_worker_metrics


async def main(url: str) -> None:
    stream = f"example:{uuid.uuid4().hex[:8]}"
    worker = Worker(url, stream, "planners", max_deliveries=2, retry_delay_s=0.05)

    @worker.handler()
    async def handle(event: Event) -> None:
        if event["n"] == 3:
            raise RuntimeError("tool timed out")

    # Port 0: any free port. In production a fixed one:
    #     with attach_worker_metrics(worker, 9100, redis_url=url):
    #         await worker.run()
    with attach_worker_metrics(worker, 0, redis_url=url) as metrics:
        async with AgentCoordinator(url, stream) as producer, worker:
            await producer.publish_many([{"type": "task", "n": n} for n in range(5)])
            await wait_until(lambda: worker.stats.acked == 4 and worker.stats.dead_lettered == 1)
            endpoint = f"http://127.0.0.1:{metrics.port}/metrics"
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(endpoint).read().decode())
    print(f"scraped {endpoint}:")
    for line in body.splitlines():
        if line.startswith("agentstreams_") and stream in line and "_created" not in line \
                and "bucket" not in line:
            print(" ", line)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    with server_url() as url:
        asyncio.run(main(url))

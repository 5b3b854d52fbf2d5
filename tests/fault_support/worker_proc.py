"""A worker process for fault-injection tests: records every handled event in Redis.

Each handled event appends ``<n>:<consumer>:<delivery count>`` to the list ``--record-key``
(on the same server) after the simulated work and before the handler returns, so a kill
between the record and the acknowledgement shows up as a duplicate, as it would for a user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import redis.asyncio as aioredis

from agentstreams import Event, Worker


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", default="g")
    parser.add_argument("--name", required=True)
    parser.add_argument("--record-key", required=True)
    parser.add_argument("--handler-ms", type=float, default=10.0)
    parser.add_argument("--visibility-ms", type=int, default=1000)
    parser.add_argument("--reclaim-ms", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--shutdown-s", type=float, default=10.0)
    parser.add_argument("--ready-file", default="")
    return parser.parse_args()


async def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format=f"[{args.name}] %(levelname)s %(message)s")
    recorder = aioredis.Redis.from_url(args.url)
    worker = Worker(
        args.url, args.stream, args.group, args.name,
        concurrency=args.concurrency, prefetch=args.prefetch,
        visibility_timeout_ms=args.visibility_ms, reclaim_interval_ms=args.reclaim_ms,
        block_ms=200, retry_delay_s=0.05, shutdown_timeout_s=args.shutdown_s,
        probe_server=False,
    )

    @worker.handler()
    async def handle(event: Event) -> None:
        await recorder.rpush(f"{args.record_key}:started", f"{event['n']}:{args.name}")
        await asyncio.sleep(args.handler_ms / 1000)
        await recorder.rpush(args.record_key,
                             f"{event['n']}:{args.name}:{event.delivery_count}")

    await worker.start()
    if args.ready_file:
        Path(args.ready_file).write_text(str(os.getpid()))  # noqa: ASYNC240 - tiny, once
    await worker.run()
    await recorder.aclose()


if __name__ == "__main__":
    asyncio.run(main())

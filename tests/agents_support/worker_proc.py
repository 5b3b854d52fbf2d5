"""An ``AgentWorker`` in its own OS process, for the multi-process tests.

usage: python -m agents_support.worker_proc REDIS_URL NAMESPACE AGENTS [options]

AGENTS is a comma-separated subset of triage,research,writer. Once consuming, the process sets
``<NAMESPACE>:ready:<worker name>`` to its pid. The lookup tool reports to the list
``<NAMESPACE>:probe`` ({"event", "key", "pid", "t"} as JSON) and records its effect once per stable
call key in ``<NAMESPACE>:effects`` (SET NX), like an idempotent side effect would.
Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time

import redis.asyncio as aioredis
from agents import set_tracing_disabled

from agents_support.scenario import remote_agents
from agentstreams.integrations.openai_agents import AgentWorker


async def main(args: argparse.Namespace) -> None:
    set_tracing_disabled(True)
    probe_client = aioredis.Redis.from_url(args.url)

    async def probe(event: str, key: str, pid: int) -> None:
        await probe_client.rpush(f"{args.namespace}:probe",
                                 json.dumps({"event": event, "key": key, "pid": pid,
                                             "t": time.time()}))
        if event == "done" and await probe_client.set(f"{args.namespace}:effect:{key}", pid,
                                                      nx=True):
            await probe_client.incr(f"{args.namespace}:effects")

    agents = remote_agents(slow_s=args.slow_s, probe=probe)
    name = args.name or f"proc-{args.agents.replace(',', '+')}-{os.getpid()}"
    worker = AgentWorker([agents[a] for a in args.agents.split(",")], args.url,
                         namespace=args.namespace, worker_name=name,
                         visibility_timeout_ms=args.visibility_ms, block_ms=200)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    await probe_client.set(f"{args.namespace}:ready:{name}", os.getpid())
    await stop.wait()
    await worker.stop(timeout_s=5)
    await probe_client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("agents")
    parser.add_argument("--visibility-ms", type=int, default=30_000)
    parser.add_argument("--slow-s", type=float, default=0.0)
    parser.add_argument("--name", default=None)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(main(parser.parse_args()))

"""One demo worker process: hosts one agent of the team behind an ``AgentWorker``.

Started by the demo runner as ``python -m agentstreams.demo.worker --namespace NS --agent
research --name research-1`` with the server URL in ``$AGENTSTREAMS_DEMO_URL`` (kept out of
``ps``). Besides the lifecycle events the ``AgentWorker`` publishes, it announces itself, every
search it starts, and its stop on the shared event stream, so the runner can draw the timeline
and aim its ``kill -9``. Runs until SIGTERM/SIGINT, then finishes the hops in hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

from agentstreams._coordinator import AgentCoordinator
from agentstreams.demo.team import AGENT_NAMES, SEARCH_S, build_team
from agentstreams.integrations.openai_agents import AgentWorker, Keys, current_task

__all__ = [
    "READY_EVENT",
    "STOPPED_EVENT",
    "TOOL_STARTED_EVENT",
    "URL_ENV",
    "serve",
]

#: A worker is consuming its agent's inbox.
READY_EVENT = "demo_worker_ready"
#: The search tool started (session, hop, delivery, worker, pid): where a kill hurts.
TOOL_STARTED_EVENT = "demo_tool_started"
#: A worker stopped after SIGTERM (with its counters).
STOPPED_EVENT = "demo_worker_stopped"
#: Environment variable carrying the server URL to the worker process.
URL_ENV = "AGENTSTREAMS_DEMO_URL"
#: Block time of the inbox reads: bounds how long a stop takes on an idle worker.
BLOCK_MS = 500
#: Hops in hand get this long to finish after SIGTERM.
STOP_TIMEOUT_S = 5.0
#: A demo announcement never holds up the agent longer than this.
ANNOUNCE_TIMEOUT_S = 1.0

logger = logging.getLogger("agentstreams.demo.worker")


async def serve(url: str, namespace: str, agent: str, name: str, *, visibility_ms: int,
                search_s: float = SEARCH_S, live_model: bool = False) -> None:
    """Host ``agent`` as worker ``name`` until SIGTERM/SIGINT."""
    keys = Keys(namespace)
    pid = os.getpid()
    async with AgentCoordinator(url, keys.events) as events:

        async def announce(event_type: str, fields: dict[str, Any]) -> None:
            # The demo's own events are decoration: never let them break an agent's run.
            try:
                await asyncio.wait_for(events.publish(event_type, {
                    **fields, "worker": name, "pid": pid, "timestamp": time.time()}),
                    ANNOUNCE_TIMEOUT_S)
            except Exception as exc:
                logger.warning("could not publish %s: %s", event_type, exc)

        async def tool_started(topic: str, call_key: str) -> None:
            task = current_task()
            await announce(TOOL_STARTED_EVENT, {
                "tool": "search", "topic": topic, "call_key": call_key,
                "session_id": task.session_id if task else None,
                "run_id": task.run_id if task else None,
                "hop": task.hop if task else None,
                "delivery_count": task.delivery_count if task else None})

        team = build_team(live_model=live_model, search_s=search_s, on_tool_start=tool_started)
        worker = AgentWorker([team[agent]], url, namespace=namespace, worker_name=name,
                             visibility_timeout_ms=visibility_ms, block_ms=BLOCK_MS,
                             shutdown_timeout_s=STOP_TIMEOUT_S)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        try:
            await announce(READY_EVENT, {"agent_name": agent})
            await stop.wait()
        finally:
            await worker.stop(timeout_s=STOP_TIMEOUT_S)
        await announce(STOPPED_EVENT, {"agent_name": agent, "stats": worker.stats.as_dict()})


def process_main(url: str, namespace: str, agent: str, name: str, *, visibility_ms: int,
                 search_s: float, live_model: bool, log_path: str) -> None:
    """Body of one worker process forked by the demo runner (``multiprocessing`` forkserver,
    which imported this module, and with it the SDK, once for all the workers).

    The process leaves the terminal's process group, so Ctrl-C reaches only the runner, which
    stops the workers with SIGTERM; a SIGTERM before the worker is serving exits quietly.
    """
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
    with contextlib.suppress(OSError):
        os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log, 2)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not live_model:
        os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
        from agents import set_tracing_disabled

        set_tracing_disabled(True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(url, namespace, agent, name, visibility_ms=visibility_ms,
                          search_s=search_s, live_model=live_model))


def main(argv: list[str] | None = None) -> int:
    """Command line of one worker process (started by the demo runner)."""
    parser = argparse.ArgumentParser(prog="python -m agentstreams.demo.worker")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--agent", required=True, choices=AGENT_NAMES)
    parser.add_argument("--name", required=True)
    parser.add_argument("--visibility-ms", type=int, required=True)
    parser.add_argument("--search-s", type=float, default=SEARCH_S)
    parser.add_argument("--live-model", action="store_true")
    args = parser.parse_args(argv)
    url = os.environ.get(URL_ENV)
    if not url:
        parser.error(f"set {URL_ENV} to the server URL")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.live_model:
        from agents import set_tracing_disabled

        set_tracing_disabled(True)  # offline: nothing may reach for the network
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(url, args.namespace, args.agent, args.name,
                          visibility_ms=args.visibility_ms, search_s=args.search_s,
                          live_model=args.live_model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

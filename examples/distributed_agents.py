"""Distributed agents: triage, research and writer in three worker processes, and a client.

Run: python examples/distributed_agents.py
         all in one: starts three worker processes, asks one question, prints the result
     python examples/distributed_agents.py worker research [--namespace NS]
         host agents in this process (run as many replicas as you like, anywhere)
     python examples/distributed_agents.py ask "Write a brief on Redis Streams" [--namespace NS]
         send one request to the deployment and print the answer

Uses $REDIS_URL (or an embedded Valkey in all-in-one mode). No API key needed: the models are
the SDK's scripted ones. For real ones, give each Agent model="gpt-4.1" and set OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio
from _server import server_url
from agents import Agent, RunContextWrapper, function_tool, set_tracing_disabled
from agents.items import ModelResponse, TResponseOutputItem, TResponseStreamEvent
from agents.models.interface import Model
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agentstreams import AgentCoordinator
from agentstreams.integrations.openai_agents import (
    AgentClient,
    AgentWorker,
    remote_handoff,
    tool_call_key,
)

AGENTS = ("triage", "research", "writer")


# --------------------------------------------------------------------------- offline models


class Scripted(Model):
    """An offline model that decides from the conversation (so any replica answers the same)."""

    def __init__(self, rule: Callable[[list[dict[str, Any]]], list[TResponseOutputItem]]) -> None:
        self.rule = rule

    def _one_step(self) -> ScriptedModel:
        def respond(call: ModelCall) -> ModelStep:
            items = call.input if isinstance(call.input, list) else [
                {"role": "user", "content": call.input}]
            return ModelStep(output=self.rule([dict(i) for i in items]),
                             usage=Usage(requests=1, input_tokens=200, output_tokens=40,
                                         total_tokens=240))

        return ScriptedModel([ModelStep.respond(respond)])

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return await self._one_step().get_response(*args, **kwargs)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        return self._one_step().stream_response(*args, **kwargs)


def tool_outputs(items: list[dict[str, Any]]) -> list[str]:
    return [str(i["output"]) for i in items if i.get("type") == "function_call_output"
            and not str(i.get("call_id", "")).startswith("handoff")]


def question(items: list[dict[str, Any]]) -> str:
    return next(str(i["content"]) for i in items if i.get("role") == "user")


# --------------------------------------------------------------------------- the agents


@function_tool
async def search_notes(ctx: RunContextWrapper[Any], topic: str) -> str:
    """Search the team's notes about a topic."""
    # tool_call_key(ctx) is the same if this hop is re-run on another replica after a crash:
    # use it to make side effects (payments, emails, writes) happen once.
    key = tool_call_key(ctx)
    await asyncio.sleep(0.2)  # a slow lookup
    return json.dumps({"topic": topic, "notes": [
        "append-only log with consumer groups", "XAUTOCLAIM recovers abandoned entries"],
        "key": key[-6:]})


def build_agents() -> dict[str, Agent[Any]]:
    """Every process builds the same agents; only the ones it hosts run there."""
    triage = Agent(
        name="triage", instructions="Route the request to research.",
        handoffs=[remote_handoff("research")],
        model=Scripted(lambda items: [function_call("transfer_to_research", "{}",
                                                    call_id="handoff-1")]))
    research = Agent(
        name="research", instructions="Collect notes, then hand off to the writer.",
        tools=[search_notes], handoffs=[remote_handoff("writer")],
        model=Scripted(lambda items: [
            function_call("transfer_to_writer", "{}", call_id="handoff-2")
            if tool_outputs(items) else
            function_call("search_notes", {"topic": question(items).split(" on ")[-1]},
                          call_id="search-1")]))
    writer = Agent(
        name="writer", instructions="Write the brief.",
        model=Scripted(lambda items: [assistant_message(
            f"Brief: {question(items).split(' on ')[-1]} — "
            + "; ".join(json.loads(tool_outputs(items)[0])["notes"]) + ".")]))
    return {"triage": triage, "research": research, "writer": writer}


# --------------------------------------------------------------------------- roles


async def serve(url: str, namespace: str, names: list[str]) -> None:
    """Host ``names`` in this process until SIGTERM/SIGINT."""
    agents = build_agents()
    worker = AgentWorker([agents[n] for n in names], url, namespace=namespace,
                         worker_name=f"{'+'.join(names)}@{os.getpid()}")
    await worker.run()


async def ask(url: str, namespace: str, text: str) -> None:
    """Send one request and print the result, the chain that produced it and its status."""
    async with AgentClient(url, namespace=namespace) as client:
        result = await client.run("triage", text, session_id="s1", timeout_s=60)
        print(f"final output: {result.final_output}")
        print(f"last agent:   {result.last_agent}")
        for link in result.chain:
            print(f"  hop {link.hop}: {link.agent:<8} on {link.worker.split('@')[0]:<14}"
                  f"{link.duration_ms:7.1f} ms  {link.usage['total_tokens']} tokens"
                  + (f"  -> {link.handed_off_to}" if link.handed_off_to else ""))
        print(f"usage:        {dict(result.usage)}")
        status = await client.status("s1")
        assert status is not None
        print(f"status:       {status.status} "
              f"({', '.join(f'{h.agent}={h.state}' for h in status.hops)})")
    async with AgentCoordinator(url, f"{namespace}:events") as events:
        info = await events.get_stream_info()
        print(f"events for observers on {namespace}:events: {info['length']}")


async def all_in_one(url: str) -> None:
    namespace = f"example{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": url}
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "worker", name, "--namespace", namespace, env=env)
        for name in AGENTS]
    try:
        # No need to wait for the workers: the request waits in the triage inbox.
        await ask(url, namespace, "Write a brief on Redis Streams")
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)  # graceful: in-flight hops finish first
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in workers)), timeout=30)
        client = redis.asyncio.Redis.from_url(url)
        keys = [key async for key in client.scan_iter(match=f"*{namespace}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=["worker", "ask"], default=None)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--namespace", default="agents")
    options = parser.parse_args()
    set_tracing_disabled(True)
    logging.basicConfig(level=logging.WARNING)
    if options.role is None:
        with server_url() as url:
            asyncio.run(all_in_one(url))
        return
    url = os.environ.get("REDIS_URL", "redis://localhost:6379")
    if options.role == "worker":
        asyncio.run(serve(url, options.namespace, options.args or list(AGENTS)))
    else:
        asyncio.run(ask(url, options.namespace, " ".join(options.args)))


if __name__ == "__main__":
    main()

"""CoordinatorHooks: publish an ordinary SDK run's lifecycle to a stream, nothing else changed.

Run: python examples/hooks_only.py   (uses $REDIS_URL or an embedded Valkey; no API key: the
models are the SDK's scripted ones; use model="gpt-4.1" and set OPENAI_API_KEY for real ones)
"""

from __future__ import annotations

import asyncio
import uuid

from _server import server_url
from agents import Agent, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from agentstreams import AgentCoordinator
from agentstreams.integrations.openai_agents import CoordinatorHooks

USAGE = Usage(requests=1, input_tokens=120, output_tokens=30, total_tokens=150)


@function_tool
async def order_status(order_id: str) -> str:
    """Look an order up."""
    await asyncio.sleep(0.05)
    return f"order {order_id}: shipped yesterday"


def build_agents() -> Agent[None]:
    support = Agent(name="support", instructions="Answer order questions.",
                    tools=[order_status],
                    model=ScriptedModel([
                        {"output": [function_call("order_status", {"order_id": "A17"},
                                                  call_id="c1")], "usage": USAGE},
                        {"output": [assistant_message("Your order A17 shipped yesterday.")],
                         "usage": USAGE}]))
    return Agent(name="triage", instructions="Route the customer.", handoffs=[support],
                 model=ScriptedModel([{"output": [function_call("transfer_to_support", "{}",
                                                                call_id="c0")],
                                       "usage": USAGE}]))


async def main(url: str) -> None:
    set_tracing_disabled(True)
    stream = f"example:agents:{uuid.uuid4().hex[:8]}"
    async with AgentCoordinator(url, stream) as coordinator:
        hooks = CoordinatorHooks(coordinator, session_id="order-42")
        # hooks.run = Runner.run(..., hooks=hooks) plus an `error` event if the run raises
        result = await hooks.run(build_agents(), "Where is my order A17?")
        print(f"final output: {result.final_output!r} (by {result.last_agent.name})")
        print(f"hook stats: {hooks.stats.as_dict()}")

    # Any other process can follow the session: here, a consumer group reads it back.
    async with AgentCoordinator(url, stream, consumer_group="observers") as observer:
        async for event in observer.subscribe(max_events=100, timeout_ms=500):
            detail = {k: event[k] for k in ("agent_name", "to_agent", "tool_name",
                                            "execution_time_ms", "tokens_used", "result")
                      if event.get(k) is not None}
            print(f"{event['type']:<16} {detail}")


if __name__ == "__main__":
    with server_url() as redis_url:
        asyncio.run(main(redis_url))

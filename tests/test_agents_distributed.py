"""Distributed agents in one test process (several AgentWorkers as tasks) on real servers:
addressed delivery, the acknowledged lifecycle, request/reply, failures, dedup of finished hops.
The multi-process and crash tests are in test_agents_multiprocess.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import redis.asyncio as aioredis
from agents import (
    Agent,
    RunConfig,
    Runner,
    TracingProcessor,
    set_trace_processors,
    set_tracing_disabled,
)
from agents.tool_context import ToolContext
from agents.tracing import Span, Trace

from agents_support.models import RuleModel
from agents_support.scenario import TOPIC_PREFIX, local_agents, remote_agents, triage_rule
from agentstreams import (
    AgentCoordinator,
    DeadLetterQueue,
    InvalidArgumentError,
    PermissionDeniedError,
)
from agentstreams._codec import decode_entry
from agentstreams._events import Event
from agentstreams.integrations.openai_agents import (
    AgentClient,
    AgentRunError,
    AgentRunTimeoutError,
    AgentWorker,
    CoordinatorHooks,
    Keys,
    TaskEnvelope,
    TaskInfo,
    pending_remote_handoff,
    remote_handoff,
    tool_call_key,
)
from agentstreams.integrations.openai_agents._context import reset_current_task, set_current_task
from agentstreams.integrations.openai_agents._wire import MalformedTaskError
from agentstreams.server import LocalServer
from conftest import stream_entries, wait_for, xadd_raw

set_tracing_disabled(True)

PROMPT = TOPIC_PREFIX + "Redis Streams"
Probe = Callable[[str, str, int], Awaitable[None]]


@pytest.fixture
async def namespace(redis_url: str) -> AsyncIterator[str]:
    """A key namespace no other test uses; its keys are deleted afterwards."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    client = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"*{ns}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def valkey_url(valkey_server: LocalServer) -> str:
    """The embedded Valkey only (for tests whose behaviour does not depend on the server)."""
    return valkey_server.url


class Deployment:
    """Workers and clients started by a test, all stopped at the end."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.stack = AsyncExitStack()

    async def worker(self, agents: list[Agent[Any]], **kwargs: Any) -> AgentWorker:
        kwargs.setdefault("block_ms", 200)
        kwargs.setdefault("visibility_timeout_ms", 5000)
        worker = AgentWorker(agents, self.url, namespace=self.namespace, **kwargs)
        await self.stack.enter_async_context(worker)
        return worker

    async def client(self) -> AgentClient:
        return await self.stack.enter_async_context(AgentClient(self.url,
                                                                namespace=self.namespace))


@pytest.fixture
async def deploy(redis_url: str, namespace: str) -> AsyncIterator[Deployment]:
    deployment = Deployment(redis_url, namespace)
    async with deployment.stack:
        yield deployment


@pytest.fixture
async def deploy_valkey(valkey_url: str) -> AsyncIterator[Deployment]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    deployment = Deployment(valkey_url, ns)
    async with deployment.stack:
        yield deployment
    client = aioredis.Redis.from_url(valkey_url)
    keys = [k async for k in client.scan_iter(match=f"*{ns}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def events_of(client: aioredis.Redis, stream: str) -> list[Event]:
    return [decode_entry(msg_id, fields, stream=stream)
            for msg_id, fields in await stream_entries(client, stream)]


def recording_probe() -> tuple[Probe, list[tuple[str, str, int]]]:
    seen: list[tuple[str, str, int]] = []

    async def probe(event: str, key: str, pid: int) -> None:
        seen.append((event, key, pid))

    return probe, seen


# ------------------------------------------------------------------------------------- chain


async def test_chain_matches_a_plain_single_process_run(deploy: Deployment) -> None:
    local = await Runner.run(local_agents()["triage"], PROMPT)
    worker = await deploy.worker(list(remote_agents().values()), worker_name="w-all")
    client = await deploy.client()
    result = await client.run("triage", PROMPT, session_id="s1", timeout_s=20)
    assert result.final_output == local.final_output
    assert result.last_agent == local.last_agent.name == "writer"
    assert result.agents == ["triage", "research", "writer"]
    assert result.workers == ["w-all"] * 3
    assert [link.handed_off_to for link in result.chain] == ["research", "writer", None]
    assert [link.delivery_count for link in result.chain] == [1, 1, 1]
    # usage is carried across hops: the same as one in-process run (4 model calls)
    assert dict(result.usage) == {"requests": 4, "input_tokens": 40, "output_tokens": 20,
                                  "total_tokens": 60}
    assert local.context_wrapper.usage.total_tokens == 60
    status = await client.status("s1")
    assert status is not None
    assert status.done
    assert status.status == "completed"
    assert status.final_output == local.final_output
    assert [(h.hop, h.agent, h.state, h.worker, h.handed_off_to) for h in status.hops] == [
        (0, "triage", "completed", "w-all", "research"),
        (1, "research", "completed", "w-all", "writer"),
        (2, "writer", "completed", "w-all", None)]
    assert worker.stats.as_dict() == {"hops_run": 3, "completed": 1, "handed_off": 2,
                                      "failed": 0, "already_done": 0, "expired": 0,
                                      "reruns": 0}
    assert all(w.stats.failed == w.stats.retried == 0 for w in worker.workers.values())


async def test_lifecycle_events_reach_the_shared_stream(deploy_valkey: Deployment,
                                                        valkey_url: str) -> None:
    await deploy_valkey.worker(list(remote_agents().values()))
    client = await deploy_valkey.client()
    result = await client.run("triage", PROMPT, session_id="s-ev", timeout_s=20)
    raw = aioredis.Redis.from_url(valkey_url)
    events = await events_of(raw, Keys(deploy_valkey.namespace).events)
    await raw.aclose()
    assert all(e["session_id"] == "s-ev" for e in events)
    assert {e["run_id"] for e in events} == {result.run_id}
    agent_events = [(e.type, e.get("agent_name") or e.get("from_agent")) for e in events
                    if e.type != "state_changed"]
    assert agent_events == [
        ("agent_started", "triage"), ("agent_completed", "triage"), ("handoff_ready", "triage"),
        ("agent_started", "research"), ("tool_result", "research"),
        ("agent_completed", "research"), ("handoff_ready", "research"),
        ("agent_started", "writer"), ("agent_completed", "writer")]
    handoffs = [e for e in events if e.type == "handoff_ready"]
    assert all(h["remote"] for h in handoffs)
    lifecycle = [(e["changes"]["hop"], e["changes"]["status"]) for e in events
                 if e.type == "state_changed"]
    for hop in range(3):
        states = [s for h, s in lifecycle if h == hop]
        assert states == ["offered", "claimed", "completed"], (hop, lifecycle)


class TraceCollector(TracingProcessor):
    """Keeps traces in memory (replaces the SDK's exporter: nothing leaves the process)."""

    def __init__(self) -> None:
        self.traces: list[Trace] = []
        self.spans: list[Span[Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        self.traces.append(trace)

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


async def test_every_hop_joins_the_runs_sdk_trace(deploy_valkey: Deployment) -> None:
    collector = TraceCollector()
    set_trace_processors([collector])
    set_tracing_disabled(False)
    try:
        await deploy_valkey.worker(list(remote_agents().values()))
        client = await deploy_valkey.client()
        await client.run("triage", PROMPT, session_id="s-trace", timeout_s=20)
    finally:
        set_tracing_disabled(True)
        set_trace_processors([])
    # three hops, three Runner.run calls: one trace id, grouped by the session
    assert len(collector.traces) == 3
    assert len({t.trace_id for t in collector.traces}) == 1
    assert collector.traces[0].trace_id.startswith("trace_")
    assert {t.export()["group_id"] for t in collector.traces  # type: ignore[index]
            } == {"s-trace"}
    agent_spans = {s.span_data.export().get("name") for s in collector.spans
                   if s.span_data.type == "agent"}
    assert {"triage", "research", "writer"} <= agent_spans


# ------------------------------------------------------------------- addressed delivery


async def test_handoffs_reach_only_hosts_of_their_agent_and_balance_across_replicas(
        deploy_valkey: Deployment, valkey_url: str) -> None:
    probe, seen = recording_probe()
    agents = remote_agents()
    front = await deploy_valkey.worker([agents["triage"], agents["writer"]], worker_name="front")
    replicas = [
        await deploy_valkey.worker([remote_agents(slow_s=0.2, probe=probe)["research"]],
                                   worker_name=f"research-{i}", concurrency=1)
        for i in range(2)]
    client = await deploy_valkey.client()
    results = await asyncio.gather(*(
        client.run("triage", f"{TOPIC_PREFIX}topic {i}", session_id=f"lb-{i}", timeout_s=20)
        for i in range(6)))
    research_workers = [r.chain[1].worker for r in results]
    assert {r.chain[0].worker for r in results} == {r.chain[2].worker for r in results} == {
        "front"}
    assert set(research_workers) == {"research-0", "research-1"}, research_workers
    assert sum(r.stats.hops_run for r in replicas) == 6
    assert front.stats.hops_run == 12
    assert len([s for s in seen if s[0] == "done"]) == 6
    # One inbox per agent, read only by the workers that host it.
    keys = Keys(deploy_valkey.namespace)
    raw = aioredis.Redis.from_url(valkey_url)
    inboxes = sorted([k.decode() async for k in raw.scan_iter(match=keys.inbox("*"))])
    consumers = {}
    for agent in ("triage", "research", "writer"):
        rows = await raw.xinfo_consumers(keys.inbox(agent), "workers")
        consumers[agent] = sorted(r["name"].decode() for r in rows)
        assert await raw.xlen(keys.inbox(agent)) == 6
    await raw.aclose()
    assert inboxes == [keys.inbox("research"), keys.inbox("triage"), keys.inbox("writer")]
    assert consumers == {"triage": ["front"], "research": ["research-0", "research-1"],
                         "writer": ["front"]}


# ----------------------------------------------------------------------------- lifecycle


async def test_status_goes_offered_claimed_completed(deploy_valkey: Deployment) -> None:
    client = await deploy_valkey.client()
    run_id = await client.submit("triage", PROMPT, session_id="s-life", timeout_s=30)
    status = await client.status("s-life")
    assert status is not None
    assert (status.run_id, status.status, status.agent, status.worker) == (
        run_id, "offered", "triage", None)
    probe_started = asyncio.Event()
    release = asyncio.Event()

    async def probe(event: str, key: str, pid: int) -> None:
        if event == "start":
            probe_started.set()
            await release.wait()

    agents = remote_agents(probe=probe)
    await deploy_valkey.worker(list(agents.values()), worker_name="w-life")
    await asyncio.wait_for(probe_started.wait(), 10)
    status = await client.status("s-life")
    assert status is not None
    assert (status.status, status.agent, status.worker, status.hop) == (
        "claimed", "research", "w-life", 1)
    assert [h.state for h in status.hops] == ["completed", "claimed"]
    release.set()
    result = await client.wait(run_id, timeout_s=20)
    status = await client.status("s-life")
    assert status is not None
    assert status.status == "completed"
    assert status.reply is not None
    assert status.reply.final_output == result.final_output
    assert await client.status("no-such-session") is None


def explode(items: list[dict[str, Any]]) -> list[Any]:
    raise ValueError("the writer's model is down")


async def test_failure_in_an_agent_fails_the_session_with_a_typed_error(
        deploy: Deployment, redis_url: str) -> None:
    agents = remote_agents()
    agents["writer"].model = RuleModel(explode)
    worker = await deploy.worker(list(agents.values()))
    client = await deploy.client()
    with pytest.raises(AgentRunError) as caught:
        await client.run("triage", PROMPT, session_id="s-fail", timeout_s=20)
    error = caught.value
    assert (error.agent, error.error_type, error.error_message) == (
        "writer", "ValueError", "the writer's model is down")
    assert error.session_id == "s-fail"
    status = await client.status("s-fail")
    assert status is not None
    assert status.status == "failed"
    assert status.error == {"agent": "writer", "error_type": "ValueError",
                            "error_message": "the writer's model is down"}
    assert status.hops[-1].state == "failed"
    keys = Keys(deploy.namespace)
    raw = aioredis.Redis.from_url(redis_url)
    errors = [e for e in await events_of(raw, keys.events) if e.type == "error"]
    assert [(e["agent_name"], e["error_type"], e["error_message"]) for e in errors] == [
        ("writer", "ValueError", "the writer's model is down")]
    # the failure is final: acknowledged, not retried, nothing dead-lettered
    await wait_for(lambda: _no_pending(raw, keys.inbox("writer")), message="ack of the hop")
    assert await DeadLetterQueue(raw, keys.inbox("writer")).length() == 0
    await raw.aclose()
    assert worker.stats.failed == 1
    assert worker.workers["writer"].stats.retried == 0  # handled on the first delivery


async def _no_pending(raw: aioredis.Redis, stream: str) -> bool:
    info: Any = await raw.xpending(stream, "workers")
    return int(info["pending"]) == 0


async def test_timeout_raises_typed_error_and_the_late_hop_is_dropped(
        deploy_valkey: Deployment) -> None:
    client = await deploy_valkey.client()
    with pytest.raises(AgentRunTimeoutError) as caught:
        await client.run("triage", PROMPT, session_id="s-late", timeout_s=0.3)
    assert caught.value.status is not None
    assert caught.value.status.status == "offered"
    worker = await deploy_valkey.worker(list(remote_agents().values()))
    await wait_for(lambda: _status_is(client, "s-late", "failed"), message="expired hop")
    status = await client.status("s-late")
    assert status is not None
    assert status.error is not None
    assert status.error["error_type"] == "DeadlineExceeded"
    assert worker.stats.expired == 1
    assert worker.stats.hops_run == 0


async def _status_is(client: AgentClient, session_id: str, wanted: str) -> bool:
    status = await client.status(session_id)
    return status is not None and status.status == wanted


# ------------------------------------------------------------------ duplicates and garbage


async def test_redelivery_of_a_finished_hop_runs_nothing_again(
        deploy_valkey: Deployment, valkey_url: str) -> None:
    probe, seen = recording_probe()
    worker = await deploy_valkey.worker(list(remote_agents(probe=probe).values()))
    client = await deploy_valkey.client()
    await client.run("triage", PROMPT, session_id="s-dup", timeout_s=20)
    assert len(seen) == 2
    keys = Keys(deploy_valkey.namespace)
    raw = aioredis.Redis.from_url(valkey_url)
    (_, research_task), = await stream_entries(raw, keys.inbox("research"))
    (_, final_task), = await stream_entries(raw, keys.inbox("writer"))
    # the same hops delivered again (a crash after the work, before the ack, looks like this)
    await xadd_raw(raw, keys.inbox("research"), research_task)
    await xadd_raw(raw, keys.inbox("writer"), final_task)
    await wait_for(lambda: _eq(lambda: worker.stats.already_done, 2), message="dedup")
    await raw.aclose()
    assert len(seen) == 2  # the tool did not run again
    assert worker.stats.hops_run == 3
    assert client.stats.replies == 1
    assert client.stats.late_or_duplicate_replies == 0


async def _eq(value: Callable[[], int], wanted: int) -> bool:
    return value() == wanted


async def test_malformed_tasks_are_dead_lettered_and_the_worker_goes_on(
        deploy_valkey: Deployment, valkey_url: str) -> None:
    agents = remote_agents()
    await deploy_valkey.worker(list(agents.values()))
    keys = Keys(deploy_valkey.namespace)
    coordinator = AgentCoordinator(valkey_url, keys.inbox("triage"))
    await coordinator.publish("agent_task", {"wire": 99, "run_id": "x"})
    good = TaskEnvelope(run_id="y", session_id="s", hop=0, agent="triage", from_agent=None,
                        reply_to=keys.replies("nowhere"), input="hi").to_fields()
    await coordinator.publish("agent_task", {**good, "hop": "zero"})
    await coordinator.close()
    client = await deploy_valkey.client()
    result = await client.run("triage", PROMPT, timeout_s=20)
    assert result.last_agent == "writer"
    raw = aioredis.Redis.from_url(valkey_url)
    dead = sorted(await DeadLetterQueue(raw, keys.inbox("triage")).list(),
                  key=lambda d: d.original_id)
    await raw.aclose()
    assert [d.reason for d in dead] == ["rejected", "rejected"]
    assert "unsupported wire version 99" in dead[0].error
    assert "field 'hop' has the wrong type str" in dead[1].error


async def test_a_task_naming_a_foreign_reply_stream_is_rejected_untouched(
        deploy_valkey: Deployment, valkey_url: str) -> None:
    """``reply_to`` is data: a forged task must not make a worker write to (or set a TTL on)
    a key outside the namespace's reply streams."""
    agents = remote_agents()
    await deploy_valkey.worker(list(agents.values()))
    keys = Keys(deploy_valkey.namespace)
    raw = aioredis.Redis.from_url(valkey_url)
    victim = f"{deploy_valkey.namespace}:victim"
    await raw.xadd(victim, {"keep": "me"})
    forged = TaskEnvelope(run_id="forged", session_id="s", hop=0, agent="triage",
                          from_agent=None, reply_to=victim, input="hi").to_fields()
    coordinator = AgentCoordinator(valkey_url, keys.inbox("triage"))
    await coordinator.publish("agent_task", forged)
    await coordinator.close()
    queue = DeadLetterQueue(raw, keys.inbox("triage"))
    try:
        await wait_for(lambda: _has_dead_letters(queue, 1), message="the forged task rejected")
        [dead] = await queue.list()
        assert dead.reason == "rejected"
        assert "is not a reply stream of namespace" in dead.error
        assert await raw.xlen(victim) == 1
        assert await raw.ttl(victim) == -1
    finally:
        await raw.delete(victim)
        await raw.aclose()


async def _has_dead_letters(queue: DeadLetterQueue, count: int) -> bool:
    return await queue.length() >= count


async def test_a_hosted_agents_worker_failing_stops_the_agent_worker_loudly(
        valkey_url: str, namespace: str) -> None:
    """An AgentWorker hosts one Worker per agent; when one of them stops on its own (here a
    permanent error of its task), run() ends and raises it instead of idling."""
    agents = remote_agents()
    worker = AgentWorker(list(agents.values()), valkey_url, namespace=namespace, block_ms=200)
    run = asyncio.create_task(worker.run(install_signal_handlers=False))
    inner = worker.workers["research"]
    await wait_for(lambda: _is_true(inner.running), message="the agent worker running")
    denied = PermissionDeniedError("denied for the test", command="XREADGROUP")
    inner._fail(denied)  # what the supervisor does with a permanent error
    with pytest.raises(PermissionDeniedError):
        await asyncio.wait_for(run, 10)
    assert worker.failure is denied
    assert not any(w.running for w in worker.workers.values())


async def _is_true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------------- pieces


async def test_remote_handoff_ends_a_plain_run_and_captures_the_conversation(
        redis_url: str, namespace: str) -> None:
    triage = Agent(name="triage", model=RuleModel(triage_rule),
                   handoffs=[remote_handoff("research")])
    async with AgentCoordinator(redis_url, f"{namespace}:events") as coordinator:
        hooks = CoordinatorHooks(coordinator, session_id="s-plain-remote")
        result = await Runner.run(triage, PROMPT, hooks=hooks)
        raw = aioredis.Redis.from_url(redis_url)
        events = await events_of(raw, f"{namespace}:events")
        await raw.aclose()
    request = pending_remote_handoff(result)
    assert request is not None
    assert request.target == "research"
    assert request.input == [
        {"role": "user", "content": PROMPT},
        {"arguments": "{}", "call_id": "call_triage_1", "name": "transfer_to_research",
         "type": "function_call", "id": "call_triage_1"},
        {"call_id": "call_triage_1", "output": '{"assistant": "research"}',
         "type": "function_call_output"}]
    assert result.final_output == "Handed off to remote agent 'research'."
    # the local stand-in does no work: no agent_started/completed for it
    assert [(e.type, e.get("agent_name")) for e in events] == [
        ("agent_started", "triage"), ("agent_completed", "triage"), ("handoff_ready", None)]
    assert events[2]["to_agent"] == "research"
    assert events[2]["remote"] is True
    assert pending_remote_handoff(await Runner.run(local_agents()["writer"], "x")) is None


def test_tool_call_key_is_stable_across_reruns() -> None:
    def ctx(call_id: str, args: str) -> ToolContext[Any]:
        return ToolContext(context=None, tool_name="charge", tool_call_id=call_id,
                           tool_arguments=args)

    def keys_of_one_run(call_ids: list[str]) -> list[str]:
        token = set_current_task(TaskInfo(run_id="r1", session_id="s", hop=2, agent="a",
                                          worker="w"))
        try:
            first = tool_call_key(ctx(call_ids[0], '{"amount": 5, "to": "x"}'))
            again = tool_call_key(ctx(call_ids[0], '{"amount": 5, "to": "x"}'))
            assert again == first  # same call asked twice: same key
            second = tool_call_key(ctx(call_ids[1], '{"to": "x", "amount": 5}'))
            other = tool_call_key(ctx(call_ids[2], '{"amount": 6, "to": "x"}'))
            return [first, second, other]
        finally:
            reset_current_task(token)

    original = keys_of_one_run(["c1", "c2", "c3"])
    rerun = keys_of_one_run(["new-1", "new-2", "new-3"])  # a re-run: the LLM makes new ids
    assert original == rerun
    assert len(set(original)) == 3
    assert original[0].startswith("r1:2:charge:")
    assert tool_call_key(ctx("plain", "{}")) == "plain"  # outside a worker: the model's id


async def test_task_envelope_round_trip_and_version_check(redis_url: str,
                                                          namespace: str) -> None:
    task = TaskEnvelope(run_id="r", session_id="123", hop=1, agent="a", from_agent="b",
                        reply_to="rs", input=[{"role": "user", "content": "true"}],
                        context={"n": 1}, usage={"requests": 1, "input_tokens": 2,
                                                 "output_tokens": 3, "total_tokens": 5},
                        trace_id="trace_x", deadline=12.5, max_turns=3)
    async with AgentCoordinator(redis_url, f"{namespace}:wire") as coordinator:
        await coordinator.publish("agent_task", task.to_fields())
        raw = aioredis.Redis.from_url(redis_url)
        (event,) = await events_of(raw, f"{namespace}:wire")
        await raw.aclose()
    assert TaskEnvelope.from_event(event) == task
    with pytest.raises(MalformedTaskError, match="wire version"):
        TaskEnvelope.from_event({**event, "wire": 2})
    with pytest.raises(MalformedTaskError, match="input"):
        TaskEnvelope.from_event({**event, "input": [1, 2]})
    assert json.loads(json.dumps(task.to_fields()))["session_id"] == "123"


def test_worker_rejects_impossible_configuration() -> None:
    agents = remote_agents()
    with pytest.raises(InvalidArgumentError, match=r"run_config\.model"):
        AgentWorker([agents["triage"]], run_config=RunConfig(model=RuleModel(triage_rule)))
    with pytest.raises(InvalidArgumentError, match="two hosted agents"):
        AgentWorker([agents["triage"], Agent(name="triage")])
    with pytest.raises(InvalidArgumentError):
        AgentWorker([])

"""Every method of the reference ``AgentCoordinator``: same names, arguments, defaults and
return shapes, so a program written against it runs after changing only its import."""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    ConnectionLostError,
    EventType,
    PermissionDeniedError,
    WrongTypeError,
)
from agentstreams._coordinator import AgentCoordinator as CoordinatorFromModule
from agentstreams.server import find_free_port
from conftest import assert_same, pending_rows, stream_entries, stream_ids

MakeCoordinator = Callable[..., AgentCoordinator]


async def consume(coordinator: AgentCoordinator, n: int | None, *, timeout_ms: int = 300,
                  event_types: list[str] | None = None) -> list[dict[str, Any]]:
    """Everything ``subscribe`` yields (it ends after ``timeout_ms`` without events)."""
    return [event async for event in coordinator.subscribe(
        event_types=event_types, timeout_ms=timeout_ms, max_events=n)]


def without_timestamp(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("timestamp", "_msg_id", "_event_id")}


# --------------------------------------------------------------------------- signatures


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    """The parameters a reference caller can pass positionally (keyword-only additions,
    ``**tls`` included, cannot change what its calls mean)."""
    keyword_only = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind not in keyword_only and p.name != "self"]


E = inspect.Parameter.empty

REFERENCE_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "__init__": [("redis_url", "redis://localhost:6379"), ("stream_name", "agent_events"),
                 ("consumer_group", None), ("consumer_name", None)],
    "initialize": [],
    "publish_handoff_ready": [("from_agent", E), ("to_agent", E), ("session_id", E),
                              ("context", E)],
    "publish_tool_result": [("tool_name", E), ("session_id", E), ("result", E),
                            ("execution_time_ms", E)],
    "publish_state_changed": [("session_id", E), ("changes", E)],
    "publish_agent_started": [("agent_name", E), ("session_id", E), ("input_summary", E)],
    "publish_agent_completed": [("agent_name", E), ("session_id", E), ("output_summary", E),
                                ("duration_ms", E), ("tokens_used", E)],
    "publish_error": [("session_id", E), ("error_type", E), ("error_message", E),
                      ("agent_name", None)],
    "subscribe": [("event_types", None), ("timeout_ms", 5000), ("max_events", None)],
    "claim_abandoned_messages": [("min_idle_ms", 300000)],
    "get_stream_info": [],
    "trim_stream": [("max_length", E), ("approximate", True)],
    "close": [],
}


@pytest.mark.parametrize("method", sorted(REFERENCE_SIGNATURES))
def test_reference_signatures_are_kept(method: str) -> None:
    fn = getattr(AgentCoordinator, method)
    assert _params(fn) == REFERENCE_SIGNATURES[method]
    if method != "__init__":
        assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def test_event_type_values_match_the_reference() -> None:
    assert {t.name: t.value for t in EventType} == {
        "HANDOFF_READY": "handoff_ready", "TOOL_RESULT": "tool_result",
        "STATE_CHANGED": "state_changed", "AGENT_STARTED": "agent_started",
        "AGENT_COMPLETED": "agent_completed", "ERROR": "error",
    }
    assert isinstance(EventType.ERROR, str)
    assert EventType.ERROR.value == "error"
    assert AgentCoordinator is CoordinatorFromModule


def test_constructor_defaults() -> None:
    publisher = AgentCoordinator()
    assert publisher.stream_name == "agent_events"
    assert publisher.consumer_group is None
    assert publisher.consumer_name is None
    consumer = AgentCoordinator("redis://localhost:6379", "s", "workers")
    assert consumer.consumer_group == "workers"
    assert re.fullmatch(r"consumer_[0-9a-f]{8}", consumer.consumer_name or "")
    assert AgentCoordinator(consumer_group="g").consumer_name != consumer.consumer_name
    assert AgentCoordinator(consumer_group="g", consumer_name="me").consumer_name == "me"


# --------------------------------------------------------------------------- lifecycle


async def test_initialize_creates_group_and_stream_and_is_idempotent(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="workers")
    await coordinator.initialize()
    await coordinator.initialize()
    assert await raw.type(stream_name) == b"stream"
    groups = await raw.xinfo_groups(stream_name)
    assert [g["name"] for g in groups] in ([b"workers"], ["workers"])
    # A second coordinator on the same group meets BUSYGROUP: that is success.
    await make_coordinator(consumer_group="workers").initialize()
    assert len(await raw.xinfo_groups(stream_name)) == 1


async def test_publish_only_coordinator_creates_no_group(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator()
    await coordinator.initialize()
    assert await raw.exists(stream_name) == 0
    await coordinator.publish_agent_started("a", "s1", "hi")
    assert await raw.xinfo_groups(stream_name) == []


async def test_close_is_idempotent_and_methods_reinitialize(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="g")
    await coordinator.publish_agent_started("a", "s", "x")  # initializes implicitly
    await coordinator.close()
    await coordinator.close()
    await coordinator.publish_agent_started("a", "s", "y")  # the reference re-initializes
    assert await raw.xlen(stream_name) == 2


# --------------------------------------------------------------------------- publishing


async def test_every_publish_method_writes_its_event_and_returns_the_id(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    ids = [
        await producer.publish_handoff_ready("research", "analysis", "sess_1",
                                             {"data": "value", "n": [1, 2]}),
        await producer.publish_tool_result("search", "sess_1", {"hits": 3}, 12.5),
        await producer.publish_state_changed("sess_1", {"step": 2, "done": False}),
        await producer.publish_agent_started("research", "sess_1", "find things"),
        await producer.publish_agent_completed("research", "sess_1", "found", 1500.0, 321),
        await producer.publish_error("sess_1", "ValueError", "bad input", "research"),
        await producer.publish_error("sess_1", "Timeout", "too slow"),
    ]
    assert all(isinstance(i, str) and re.fullmatch(r"\d+-\d+", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert await stream_ids(raw, stream_name) == ids

    events = await consume(consumer, len(ids))
    assert [e["_msg_id"] for e in events] == ids
    assert all(isinstance(e["timestamp"], float) for e in events)
    received = [without_timestamp(e) for e in events]
    expected: list[dict[str, Any]] = [
        {"type": "handoff_ready", "from_agent": "research", "to_agent": "analysis",
         "session_id": "sess_1", "context": {"data": "value", "n": [1, 2]}},
        {"type": "tool_result", "tool_name": "search", "session_id": "sess_1",
         "result": {"hits": 3}, "execution_time_ms": 12.5},
        {"type": "state_changed", "session_id": "sess_1", "changes": {"step": 2, "done": False}},
        {"type": "agent_started", "agent_name": "research", "session_id": "sess_1",
         "input_summary": "find things"},
        {"type": "agent_completed", "agent_name": "research", "session_id": "sess_1",
         "output_summary": "found", "duration_ms": 1500.0, "tokens_used": 321},
        {"type": "error", "session_id": "sess_1", "error_type": "ValueError",
         "error_message": "bad input", "agent_name": "research"},
        # agent_name=None is left out, as the reference does
        {"type": "error", "session_id": "sess_1", "error_type": "Timeout",
         "error_message": "too slow"},
    ]
    for got, want in zip(received, expected, strict=True):
        assert_same(got, want)


async def test_entries_stay_readable_with_xrange(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator()
    await coordinator.publish_handoff_ready("a", "b", "sess_9", {"k": "v"})
    [(_, fields)] = await stream_entries(raw, stream_name)
    assert fields[b"type"] == b"handoff_ready"
    assert fields[b"session_id"] == b"sess_9"
    assert fields[b"from_agent"] == b"a"
    assert fields[b"context"] == b'{"k":"v"}'


# --------------------------------------------------------------------------- subscribe


async def test_subscribe_yields_dicts_with_msg_id_and_acks_after_each(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    first = await producer.publish_agent_started("a", "s", "one")
    second = await producer.publish_agent_started("a", "s", "two")

    async def pending_ids() -> list[str]:
        return [r["message_id"] for r in await pending_rows(raw, stream_name, "g")]

    async with aclosing(consumer.subscribe(timeout_ms=300, max_events=2)) as events:
        event = await anext(events)
        assert isinstance(event, dict)
        assert event["_msg_id"] == first
        # The event is acknowledged when the next one is asked for, not before.
        assert first in await pending_ids()
        event = await anext(events)
        assert event["_msg_id"] == second
        assert await pending_ids() == [second]
        with pytest.raises(StopAsyncIteration):
            await anext(events)
    assert await pending_ids() == []


async def test_subscribe_with_a_limit_ends_after_timeout_without_events(
        make_coordinator: MakeCoordinator) -> None:
    consumer = make_coordinator(consumer_group="g")
    assert await consume(consumer, 5, timeout_ms=100) == []


async def test_subscribe_filters_by_event_type(make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    await producer.publish_agent_started("a", "s", "x")
    wanted = await producer.publish_error("s", "E", "boom")
    events = await consume(consumer, 1, event_types=["error"])
    assert [e["_msg_id"] for e in events] == [wanted]
    assert [e["_msg_id"] for e in await consume(consumer, 1,
                                                event_types=[EventType.ERROR])] == []


async def test_subscribe_and_claim_need_a_group(make_coordinator: MakeCoordinator) -> None:
    publisher = make_coordinator()
    with pytest.raises(ValueError, match="Consumer group required"):
        await consume(publisher, 1)
    with pytest.raises(ValueError, match="Consumer group required"):
        await publisher.claim_abandoned_messages()


async def test_consumers_of_one_group_share_the_work(make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    one = make_coordinator(consumer_group="g", consumer_name="one")
    two = make_coordinator(consumer_group="g", consumer_name="two")
    await one.initialize()
    ids = {await producer.publish_agent_started("a", "s", str(i)) for i in range(6)}
    got_one = {e["_msg_id"] for e in await consume(one, 3)}
    got_two = {e["_msg_id"] for e in await consume(two, 10)}
    assert got_one | got_two == ids
    assert not got_one & got_two


async def test_every_group_gets_every_event(make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    one = make_coordinator(consumer_group="audit")
    two = make_coordinator(consumer_group="workers")
    await one.initialize()
    await two.initialize()
    ids = [await producer.publish_agent_started("a", "s", str(i)) for i in range(3)]
    assert [e["_msg_id"] for e in await consume(one, 3)] == ids
    assert [e["_msg_id"] for e in await consume(two, 3)] == ids


# --------------------------------------------------------------------------- claiming


async def test_claim_abandoned_messages_takes_over_idle_entries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    crashed = make_coordinator(consumer_group="g", consumer_name="crashed")
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await crashed.initialize()
    ids = [await producer.publish_tool_result("t", "s", i, 1.0) for i in range(3)]
    # Read, never acknowledged: the consumer "crashed" with all three in flight.
    await raw.xreadgroup("g", "crashed", {stream_name: ">"}, count=10)

    # The reference default (5 minutes) claims nothing this fresh.
    assert await rescuer.claim_abandoned_messages() == []
    claimed = await rescuer.claim_abandoned_messages(min_idle_ms=0)
    assert [e["_msg_id"] for e in claimed] == ids
    assert [e["result"] for e in claimed] == [0, 1, 2]
    assert all(e["type"] == "tool_result" for e in claimed)
    rows = await pending_rows(raw, stream_name, "g")
    assert {r["consumer"] for r in rows} == {"rescuer"}


async def test_claim_respects_min_idle(make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    holder = make_coordinator(consumer_group="g", consumer_name="holder")
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await holder.initialize()
    await producer.publish_agent_started("a", "s", "x")
    async with aclosing(holder.subscribe(timeout_ms=300)) as events:
        await anext(events)
    assert await rescuer.claim_abandoned_messages(min_idle_ms=60_000) == []


# --------------------------------------------------------------------------- info and trim


async def test_get_stream_info_shape(
        make_coordinator: MakeCoordinator, stream_name: str) -> None:
    producer = make_coordinator()
    assert await producer.get_stream_info() == {"length": 0, "groups": []}
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    first = await producer.publish_agent_started("a", "s", "first")
    last = await producer.publish_agent_started("a", "s", "last")
    await consume(consumer, 1)
    info = await producer.get_stream_info()
    assert info["length"] == 2
    assert info["first_entry"][0] == first
    assert info["first_entry"][1]["input_summary"] == "first"
    assert info["last_entry"][0] == last
    [group] = info["groups"]
    assert group["name"] == "g"
    assert group["pending"] == 0
    assert group["consumers"] == 1
    assert group["last-delivered-id"] == first


async def test_get_stream_info_raises_instead_of_pretending_the_stream_is_empty(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str,
        redis_url: str) -> None:
    """Only a missing stream reads as empty (the reference's answer); a key of another type
    and a read the ACL denies are errors, not an empty stream."""
    await raw.set(stream_name, "not a stream")
    with pytest.raises(WrongTypeError):
        await make_coordinator().get_stream_info()
    await raw.delete(stream_name)
    user, password = f"as-info-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await raw.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", user, "on", f">{password}", f"~{stream_name}*", "-@all", "+ping",
        "+hello")
    try:
        parts = redis_url.split("://", 1)
        denied = make_coordinator(redis_url=f"{parts[0]}://{user}:{password}@{parts[1]}")
        with pytest.raises(PermissionDeniedError, match="XINFO"):
            await denied.get_stream_info()
    finally:
        await raw.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]


async def test_trim_stream_without_groups_trims_to_length(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator()
    assert await coordinator.trim_stream(10) == 0  # no stream yet
    ids = [await coordinator.publish_agent_started("a", "s", str(i)) for i in range(30)]
    removed = await coordinator.trim_stream(10, approximate=False)
    assert removed == 20
    assert await stream_ids(raw, stream_name) == ids[20:]
    assert isinstance(await coordinator.trim_stream(5), int)  # approximate (the default)
    assert await raw.xlen(stream_name) >= 5


async def test_an_unreachable_server_is_not_reported_as_a_lost_connection() -> None:
    coordinator = AgentCoordinator(f"redis://127.0.0.1:{find_free_port()}", "s")
    with pytest.raises(ConnectionLostError, match="cannot reach the server") as caught:
        await coordinator.get_stream_info()
    assert "lost the connection" not in str(caught.value)
    await coordinator.close()

"""One test (or more) per "Known defect of the reference" in design.md. Each would fail on the
reference implementation's behaviour, which the comment in each test spells out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import AgentCoordinator, StreamCap
from conftest import (
    assert_same,
    pending_rows,
    stream_entries,
    stream_ids,
    wait_for,
    with_query,
)

MakeCoordinator = Callable[..., AgentCoordinator]


async def consume(coordinator: AgentCoordinator, n: int | None, *, timeout_ms: int = 300,
                  event_types: list[str] | None = None) -> list[dict[str, Any]]:
    return [event async for event in coordinator.subscribe(
        event_types=event_types, timeout_ms=timeout_ms, max_events=n)]


async def pending_count(raw: aioredis.Redis, stream: str, group: str) -> int:
    return int((await raw.xpending(stream, group))["pending"])


# --------------------------------------------------------------------------- defect 1


async def test_defect1_strings_that_look_like_json_stay_strings(
        make_coordinator: MakeCoordinator) -> None:
    """The reference json.loads every value: "123" arrived as 123, "true" as True, "null" as
    None, and a bool was written as "True"."""
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    await producer.publish_handoff_ready("a", "b", "123", {"flag": True, "n": "null"})
    await producer.publish_tool_result("calc", "true", True, 3)
    await producer.publish_tool_result("calc", "null", "false", 1.0)
    await producer.publish_agent_started("agent", "1.5", "null")
    await producer.publish_state_changed("[1]", {"ok": False, "s": "True"})
    events = await consume(consumer, 5)
    values = [{k: v for k, v in e.items() if not k.startswith("_") and k != "timestamp"}
              for e in events]
    expected: list[dict[str, Any]] = [
        {"type": "handoff_ready", "from_agent": "a", "to_agent": "b", "session_id": "123",
         "context": {"flag": True, "n": "null"}},
        {"type": "tool_result", "tool_name": "calc", "session_id": "true", "result": True,
         "execution_time_ms": 3},
        {"type": "tool_result", "tool_name": "calc", "session_id": "null", "result": "false",
         "execution_time_ms": 1.0},
        {"type": "agent_started", "agent_name": "agent", "session_id": "1.5",
         "input_summary": "null"},
        {"type": "state_changed", "session_id": "[1]", "changes": {"ok": False, "s": "True"}},
    ]
    for got, want in zip(values, expected, strict=True):
        assert_same(got, want)


async def test_defect1_bools_are_not_written_as_python_reprs(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    await producer.publish_tool_result("t", "s", True, 1)
    [(_, fields)] = await stream_entries(raw, stream_name)
    assert fields[b"result"] == b"true"  # the reference wrote b"True"


# --------------------------------------------------------------------------- defect 2


async def test_defect2_restarted_consumer_rereads_its_own_pending_entries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """Kill between receive and ack: the reference only ever read '>', so the entry stayed in
    the dead consumer's pending list forever when it came back under the same name."""
    producer = make_coordinator()
    first_life = make_coordinator(consumer_group="g", consumer_name="worker-1")
    await first_life.initialize()
    msg_id = await producer.publish_handoff_ready("a", "b", "s", {"job": 1})
    later_id = await producer.publish_handoff_ready("a", "b", "s", {"job": 2})

    async with aclosing(first_life.subscribe(timeout_ms=300, max_events=1)) as events:
        event = await anext(events)
        assert event["_msg_id"] == msg_id
        # ... the process dies here, before the handler finished (no ack).
    await first_life.close()
    assert await pending_count(raw, stream_name, "g") == 1

    second_life = make_coordinator(consumer_group="g", consumer_name="worker-1")
    received = await consume(second_life, 2)
    assert [e["_msg_id"] for e in received] == [msg_id, later_id]
    assert received[0]["context"] == {"job": 1}
    assert await pending_count(raw, stream_name, "g") == 0


async def test_defect2_pending_entries_come_before_new_ones(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g", consumer_name="w")
    await consumer.initialize()
    held = [await producer.publish_agent_started("a", "s", str(i)) for i in range(3)]
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=3)  # delivered, never acked
    fresh = [await producer.publish_agent_started("a", "s", str(i)) for i in range(3, 5)]
    restarted = make_coordinator(consumer_group="g", consumer_name="w")
    assert [e["_msg_id"] for e in await consume(restarted, 5)] == held + fresh


# --------------------------------------------------------------------------- defect 3


async def test_defect3_claimed_events_carry_msg_id_and_can_be_acked(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """The reference returned claimed events without their message id: never acknowledgeable."""
    producer = make_coordinator()
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await rescuer.initialize()
    ids = [await producer.publish_tool_result("t", "s", i, 1) for i in range(2)]
    await raw.xreadgroup("g", "dead", {stream_name: ">"}, count=10)
    claimed = await rescuer.claim_abandoned_messages(min_idle_ms=0)
    assert [e["_msg_id"] for e in claimed] == ids
    assert [e["_delivery_count"] for e in claimed] == [2, 2]
    assert await rescuer.ack(*[e["_msg_id"] for e in claimed]) == 2
    assert await pending_count(raw, stream_name, "g") == 0


async def test_defect3_claim_considers_all_pending_entries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """The reference looked at the first 100 pending entries only."""
    producer = make_coordinator()
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await rescuer.initialize()
    ids = await producer.publish_many([{"type": "job", "n": i} for i in range(250)])
    await raw.xreadgroup("g", "dead", {stream_name: ">"}, count=1000)
    claimed = await rescuer.claim_abandoned_messages(min_idle_ms=0)
    assert [e["_msg_id"] for e in claimed] == ids
    assert [e["n"] for e in claimed] == list(range(250))


async def test_defect3_claim_finds_idle_entries_behind_a_hundred_fresh_ones(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """Idle entries behind many fresh ones are still found (the cursor is followed)."""
    producer = make_coordinator()
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await rescuer.initialize()
    await producer.publish_many([{"type": "job", "n": i} for i in range(150)])
    await raw.xreadgroup("g", "busy", {stream_name: ">"}, count=1000)
    # 147 are then renewed by their live holder (a JUSTID claim resets the idle time); the last
    # 3 stay idle, behind more than 100 fresh ones.
    rows = await pending_rows(raw, stream_name, "g")
    idle_ids = [r["message_id"] for r in rows[-3:]]
    fresh_ids = [r["message_id"] for r in rows[:-3]]

    async def idle_enough() -> bool:
        idle = {r["message_id"]: r["time_since_delivered"]
                for r in await pending_rows(raw, stream_name, "g")}
        return all(idle[i] >= 300 for i in idle_ids)

    await wait_for(idle_enough, timeout_s=5, message="entries idle for 300 ms")
    await raw.xclaim(stream_name, "g", "busy", 0, list(fresh_ids), justid=True)
    claimed = await rescuer.claim_abandoned_messages(min_idle_ms=300)
    assert [e["_msg_id"] for e in claimed] == idle_ids


async def test_defect3_claim_dead_letters_after_max_deliveries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """The reference had no delivery limit and no dead-letter path: a poison event was claimed
    and crashed its handler forever."""
    producer = make_coordinator()
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer", max_deliveries=3)
    await rescuer.initialize()
    poison = await producer.publish_tool_result("t", "s", "poison", 1)
    await raw.xreadgroup("g", "dead", {stream_name: ">"})  # delivery 1
    assert [e["_delivery_count"] for e in await rescuer.claim_abandoned_messages(0)] == [2]
    assert [e["_delivery_count"] for e in await rescuer.claim_abandoned_messages(0)] == [3]
    assert await rescuer.claim_abandoned_messages(0) == []  # delivery 4 > 3: dead-lettered
    assert await pending_count(raw, stream_name, "g") == 0
    [letter] = await rescuer.dead_letters.list()
    assert letter.original_id == poison
    assert letter.reason == "max_deliveries"
    assert letter.deliveries == 4
    assert letter.group == "g"
    assert letter.event()["result"] == "poison"
    # It is in the dead-letter stream and still in the stream, but nobody holds it any more.
    assert await raw.xlen(f"{{{stream_name}}}:dlq") == 1


async def test_defect3_subscribe_dead_letters_after_max_deliveries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    await make_coordinator(consumer_group="g").initialize()
    poison = await producer.publish_tool_result("t", "s", "poison", 1)
    good = await producer.publish_tool_result("t", "s", "good", 1)
    for _ in range(2):  # two deliveries that crash before the ack
        await raw.xreadgroup("g", "w", {stream_name: "0" if _ else ">"}, count=1)
    consumer = make_coordinator(consumer_group="g", consumer_name="w", max_deliveries=2)
    assert [e["_msg_id"] for e in await consume(consumer, 1)] == [good]
    [letter] = await consumer.dead_letters.list()
    assert (letter.original_id, letter.reason) == (poison, "max_deliveries")


# --------------------------------------------------------------------------- defect 4


async def test_defect4_filtered_subscribe_does_not_steal_other_types(
        make_coordinator: MakeCoordinator) -> None:
    """The reference acknowledged and dropped other types in the shared group, so the consumer
    that wanted them never saw them."""
    producer = make_coordinator()
    errors_only = make_coordinator(consumer_group="workers", consumer_name="errors")
    everything = make_coordinator(consumer_group="workers", consumer_name="all")
    await everything.initialize()
    handoff = await producer.publish_handoff_ready("a", "b", "s", {})
    error = await producer.publish_error("s", "E", "boom")
    started = await producer.publish_agent_started("a", "s", "x")

    assert [e["_msg_id"] for e in await consume(errors_only, 1,
                                                event_types=["error"])] == [error]
    got = [e["_msg_id"] for e in await consume(everything, 10)]
    assert handoff in got
    assert started in got


async def test_defect4_filtered_subscriptions_resume_where_they_stopped(
        make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    errors_only = make_coordinator(consumer_group="workers", consumer_name="errors")
    await errors_only.initialize()
    first = await producer.publish_error("s", "E", "1")
    assert [e["_msg_id"] for e in await consume(errors_only, 1,
                                                event_types=["error"])] == [first]
    await producer.publish_agent_started("a", "s", "x")
    second = await producer.publish_error("s", "E", "2")
    again = make_coordinator(consumer_group="workers", consumer_name="errors")
    assert [e["_msg_id"] for e in await consume(again, 5, event_types=["error"])] == [second]


# --------------------------------------------------------------------------- defect 5


async def test_defect5_max_events_zero_yields_nothing(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """The reference treated max_events=0 as "no limit" and read forever."""
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    await producer.publish_agent_started("a", "s", "x")
    assert await asyncio.wait_for(consume(consumer, 0, timeout_ms=0), timeout=5) == []
    # Nothing was read either: the event is still there for the next read.
    assert await pending_count(raw, stream_name, "g") == 0
    assert len(await consume(consumer, 1)) == 1


async def test_defect5_max_events_none_means_no_limit(
        make_coordinator: MakeCoordinator) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    received: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in consumer.subscribe(timeout_ms=50, max_events=None):
            received.append(event)

    task = asyncio.create_task(run())
    try:
        for i in range(3):
            await producer.publish_agent_started("a", "s", str(i))

        async def got_three() -> bool:
            return len(received) == 3

        await wait_for(got_three, timeout_s=5, message="three events")
        await asyncio.sleep(0.2)  # several empty 50 ms reads: the loop must keep going
        assert not task.done()
        await producer.publish_agent_started("a", "s", "late")

        async def got_four() -> bool:
            return len(received) == 4

        await wait_for(got_four, timeout_s=5, message="the late event")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_defect5_subscribe_survives_a_connection_loss(
        redis_url: str, make_coordinator: MakeCoordinator, raw: aioredis.Redis) -> None:
    """The reference's loop died with the connection. Kill the subscriber's connection while
    it is blocked in XREADGROUP; it must reconnect and deliver an event published later."""
    name = f"sub-{id(raw)}"
    producer = make_coordinator()
    consumer = make_coordinator(redis_url=with_query(redis_url, f"client_name={name}"),
                                consumer_group="g")
    await consumer.initialize()
    received: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in consumer.subscribe(timeout_ms=0):
            received.append(event)

    async def blocked_client_ids() -> list[int]:
        clients = await raw.client_list()
        return [int(c["id"]) for c in clients
                if c.get("name") == name and c.get("cmd") == "xreadgroup"]

    async def is_blocked() -> bool:
        return bool(await blocked_client_ids())

    task = asyncio.create_task(run())
    try:
        await wait_for(is_blocked, timeout_s=5, message="the subscriber to block")
        [old_id] = await blocked_client_ids()
        assert await raw.client_kill_filter(_id=str(old_id)) == 1

        async def reconnected() -> bool:
            ids = await blocked_client_ids()
            return bool(ids) and old_id not in ids

        await wait_for(reconnected, timeout_s=10, message="the subscriber to reconnect")
        msg_id = await producer.publish_agent_started("a", "s", "after the cut")

        async def delivered() -> bool:
            return [e["_msg_id"] for e in received] == [msg_id]

        await wait_for(delivered, timeout_s=10, message="the event published after the cut")
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_defect5_trim_keeps_unacknowledged_entries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """The reference's trim_stream removed entries that were pending or not yet delivered."""
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g", consumer_name="w")
    await consumer.initialize()
    ids = [await producer.publish_agent_started("a", "s", str(i)) for i in range(10)]
    assert len(await consume(consumer, 3)) == 3  # handled and acknowledged
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=2)  # in flight, not acked

    removed = await producer.trim_stream(0, approximate=False)
    assert removed == 3
    assert await stream_ids(raw, stream_name) == ids[3:]
    # The in-flight and undelivered entries are all still delivered.
    restarted = make_coordinator(consumer_group="g", consumer_name="w")
    assert [e["_msg_id"] for e in await consume(restarted, 10)] == ids[3:]

    # force=True is the explicit hard cap.
    await producer.publish_agent_started("a", "s", "new")
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=1)
    assert await producer.trim_stream(0, approximate=False, force=True) == 8
    assert await raw.xlen(stream_name) == 0


async def test_defect5_trim_keeps_entries_a_second_group_has_not_read(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    fast = make_coordinator(consumer_group="fast")
    slow = make_coordinator(consumer_group="slow")
    await fast.initialize()
    await slow.initialize()
    ids = [await producer.publish_agent_started("a", "s", str(i)) for i in range(5)]
    assert len(await consume(fast, 5)) == 5
    assert await producer.trim_stream(0, approximate=False) == 0
    assert [e["_msg_id"] for e in await consume(slow, 5)] == ids
    assert await producer.trim_stream(0, approximate=False) == 5


async def test_defect5_stream_cap_bounds_the_stream(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """Without a cap the stream grows forever; with one it stays bounded as events flow."""
    producer = make_coordinator(cap=StreamCap("maxlen", 20, approximate=False))
    for i in range(50):
        await producer.publish_agent_started("a", "s", str(i))
    await producer.publish_many([{"type": "t", "i": i} for i in range(30)])
    await producer.publish("t", {"i": 1}, idempotency_key="k")
    assert await raw.xlen(stream_name) == 20

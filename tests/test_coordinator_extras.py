"""What AgentCoordinator adds to the reference API: resource handling, clients and URLs, acks,
batches, clear errors for bad input, and a read loop that survives bad entries and outages."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    IdempotencyConflictError,
    InvalidArgumentError,
    PayloadTooLargeError,
    SerializationError,
)
from agentstreams.server import LocalServer
from conftest import (
    assert_same,
    clients_named,
    pending_rows,
    reference_fields,
    stream_entries,
    stream_ids,
    wait_for,
    with_query,
    xadd_raw,
)

MakeCoordinator = Callable[..., AgentCoordinator]


async def consume(coordinator: AgentCoordinator, n: int | None, *, timeout_ms: int = 300,
                  event_types: list[str] | None = None) -> list[dict[str, Any]]:
    return [event async for event in coordinator.subscribe(
        event_types=event_types, timeout_ms=timeout_ms, max_events=n)]


# --------------------------------------------------------------------------- lifecycle, clients


async def test_async_with_initializes_and_closes(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    name = f"ctx-{uuid.uuid4().hex[:8]}"
    async with AgentCoordinator(with_query(redis_url, f"client_name={name}"), stream_name,
                                "g") as coordinator:
        assert [g["name"] for g in await raw.xinfo_groups(stream_name)] == [b"g"]
        msg_id = await coordinator.publish_agent_started("a", "s", "x")
        assert await clients_named(raw, name)

    async def disconnected() -> bool:
        return not await clients_named(raw, name)

    await wait_for(disconnected, timeout_s=5, message="the coordinator's connections to close")
    async with AgentCoordinator(redis_url, stream_name, "g") as again:
        assert [e["_msg_id"] for e in await consume(again, 1)] == [msg_id]


@pytest.mark.parametrize("decode_responses", [False, True])
async def test_existing_client_instead_of_a_url(
        redis_url: str, raw: aioredis.Redis, stream_name: str, decode_responses: bool) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=decode_responses)
    try:
        async with AgentCoordinator(client, stream_name, "g") as coordinator:
            msg_id = await coordinator.publish_tool_result("t", "123", {"n": True}, 1.5)
            [event] = await consume(coordinator, 1)
            assert event["_msg_id"] == msg_id
            assert_same(event["session_id"], "123")
            assert_same(event["result"], {"n": True})
            claimed = await coordinator.claim_abandoned_messages(0)
            assert claimed == []
            info = await coordinator.get_stream_info()
            assert info["length"] == 1
            assert info["groups"][0]["name"] == "g"
        # close() leaves a client it did not create open.
        assert await client.ping()
        other = AgentCoordinator(client=client, stream_name=stream_name)
        await other.publish_agent_started("a", "s", "x")
        await other.close()
        assert await raw.xlen(stream_name) == 2
    finally:
        await client.aclose()


async def test_client_with_a_short_socket_timeout_still_blocks_quietly(
        redis_url: str, raw: aioredis.Redis, stream_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A passed-in client that gives up on replies after 0.3 s: subscribe must block in
    shorter slices (it used to time out on every read, log a warning, and with a limit never
    end)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.3)
    try:
        async with AgentCoordinator(client, stream_name, "g") as coordinator:
            with caplog.at_level("WARNING", logger="agentstreams"):
                assert await asyncio.wait_for(consume(coordinator, 1, timeout_ms=1000),
                                              timeout=10) == []
            assert not [r for r in caplog.records if r.name.startswith("agentstreams")]
            msg_id = await coordinator.publish_agent_started("a", "s", "x")
            assert [e["_msg_id"] for e in await consume(coordinator, 1)] == [msg_id]
    finally:
        await client.aclose()


@pytest.fixture
async def unix_stream(valkey_server: LocalServer) -> AsyncIterator[str]:
    name = f"test-unix-{uuid.uuid4().hex[:8]}"
    yield name
    client = aioredis.Redis.from_url(valkey_server.url)
    await client.delete(name)
    await client.aclose()


async def test_unix_socket_url(valkey_server: LocalServer, unix_stream: str) -> None:
    assert valkey_server.unix_url.startswith("unix://")
    async with AgentCoordinator(valkey_server.unix_url, unix_stream, "g") as coordinator:
        msg_id = await coordinator.publish_error("s", "E", "over a unix socket")
        assert [e["_msg_id"] for e in await consume(coordinator, 1)] == [msg_id]


# --------------------------------------------------------------------------- ack, publish


async def test_ack_takes_many_ids(make_coordinator: MakeCoordinator, raw: aioredis.Redis,
                                  stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="g")
    await coordinator.initialize()
    ids = [await coordinator.publish_agent_started("a", "s", str(i)) for i in range(3)]
    await raw.xreadgroup("g", "other", {stream_name: ">"})
    claimed = await coordinator.claim_abandoned_messages(0)
    assert await coordinator.ack() == 0
    assert await coordinator.ack(*[e["_msg_id"] for e in claimed]) == 3
    assert await coordinator.ack(ids[0]) == 0  # already acknowledged
    assert await pending_rows(raw, stream_name, "g") == []
    with pytest.raises(InvalidArgumentError, match="message ids"):
        await coordinator.ack("")
    with pytest.raises(InvalidArgumentError, match="Consumer group required"):
        await make_coordinator().ack(ids[0])


async def test_publish_many_returns_ids_in_order(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="g")
    await coordinator.initialize()
    events: list[dict[str, Any]] = [
        {"type": "handoff_ready", "session_id": "1", "context": {"i": i}} for i in range(25)
    ]
    events.append({"type": "error", "session_id": "null", "error_message": "x"})
    ids = await coordinator.publish_many(events)
    assert ids == await stream_ids(raw, stream_name)
    received = await consume(coordinator, len(events))
    assert [e["_msg_id"] for e in received] == ids
    for got, sent in zip(received, events, strict=True):
        assert_same({k: v for k, v in got.items() if not k.startswith("_")
                     and k != "timestamp"}, sent)
    assert len({e["_event_id"] for e in received}) == len(events)
    assert await coordinator.publish_many([]) == []


async def test_publish_many_validates_everything_before_sending(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator()
    with pytest.raises(SerializationError, match="'bad'"):
        await coordinator.publish_many([{"type": "t", "ok": 1}, {"type": "t", "bad": object()}])
    with pytest.raises(InvalidArgumentError, match="#1 has no 'type'"):
        await coordinator.publish_many([{"type": "t"}, {"session_id": "s"}])
    with pytest.raises(InvalidArgumentError, match="list of event mappings"):
        await coordinator.publish_many({"type": "t"})  # type: ignore[arg-type]
    assert await raw.xlen(stream_name) == 0


async def test_generic_publish_with_idempotency_key(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator()
    first = await coordinator.publish("custom_type", {"x": [1]}, idempotency_key="job-1")
    again = await coordinator.publish("custom_type", {"x": [1]}, idempotency_key="job-1")
    assert first == again
    with pytest.raises(IdempotencyConflictError):  # the key of another event
        await coordinator.publish_handoff_ready("a", "b", "s", {}, idempotency_key="job-1")
    other = await coordinator.publish_handoff_ready("a", "b", "s", {}, idempotency_key="job-2")
    assert other != first
    assert await stream_ids(raw, stream_name) == [first, other]
    assert await coordinator.publish("no_fields") != first


# --------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stream_name": ""}, "stream_name must be a non-empty string"),
    ({"stream_name": None}, "stream_name must be a non-empty string"),
    ({"stream_name": "s" * 600}, "limit is 512"),
    ({"consumer_group": ""}, "consumer_group must be a non-empty string"),
    ({"consumer_name": ""}, "consumer_name must be a non-empty string"),
    ({"redis_url": ""}, "non-empty string like 'redis://localhost:6379'"),
    ({"redis_url": "http://localhost:6379"}, "use redis://, rediss://"),
    ({"redis_url": "redis://u:secret@h:1", "socket_timeout_s": -1}, "positive number"),
    ({"max_deliveries": 0}, "max_deliveries must be an integer >= 1"),
    ({"max_event_bytes": 0}, "max_event_bytes must be an integer >= 1"),
])
def test_invalid_constructor_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        AgentCoordinator(**kwargs)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout_ms": -1}, "timeout_ms must be an integer >= 0"),
    ({"max_events": -1}, "max_events must be an integer >= 0"),
    ({"max_events": 1.5}, "max_events must be an integer"),
    ({"event_types": "error"}, "event_types must be a list"),
    ({"event_types": [""]}, "event_types must be a list"),
])
async def test_invalid_subscribe_arguments(make_coordinator: MakeCoordinator,
                                           kwargs: dict[str, Any], message: str) -> None:
    coordinator = make_coordinator(consumer_group="g")
    with pytest.raises(InvalidArgumentError, match=message):
        await anext(coordinator.subscribe(**kwargs))


async def test_invalid_arguments_of_other_methods(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="g", max_event_bytes=2000)
    with pytest.raises(InvalidArgumentError, match="min_idle_ms must be an integer >= 0"):
        await coordinator.claim_abandoned_messages(-5)
    with pytest.raises(InvalidArgumentError, match="max_length must be an integer >= 0"):
        await coordinator.trim_stream(-1)
    with pytest.raises(SerializationError, match="field 'result' cannot be encoded as JSON"):
        await coordinator.publish_tool_result("t", "s", object(), 1.0)
    with pytest.raises(SerializationError, match="NaN"):
        await coordinator.publish_state_changed("s", {"score": float("nan")})
    with pytest.raises(PayloadTooLargeError, match="over the 2000-byte limit") as info:
        await coordinator.publish_handoff_ready("a", "b", "s", {"blob": "x" * 5000})
    assert info.value.limit == 2000
    with pytest.raises(InvalidArgumentError, match="idempotency_key"):
        await coordinator.publish("t", {}, idempotency_key="")
    assert await raw.xlen(stream_name) == 0
    with pytest.raises(InvalidArgumentError, match="initialize"):
        _ = make_coordinator().dead_letters


# --------------------------------------------------------------------------- bad entries


GARBAGE: list[tuple[dict[bytes, bytes], str]] = [
    ({b"session_id": b"no type"}, "no 'type'"),
    ({b"type": b"\xff\xfe\xfd", b"x": b"y"}, "not valid UTF-8"),
    ({b"type": b"t", b"_v": b"1", b"payload": b"\xc3\x28"}, "not valid UTF-8"),
    ({b"type": b"t", b"_v": b"1", b"_json": b"payload", b"payload": b"{nope"}, "does not parse"),
    ({b"type": b"t", b"_v": b"2"}, "format version"),
    ({b"type": b"t", b"huge": b"x" * 5000}, "byte limit"),
]


async def test_undecodable_entries_are_dead_lettered_and_the_loop_goes_on(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    consumer = make_coordinator(consumer_group="g", max_event_bytes=4000)
    await consumer.initialize()
    good_ids = [await consumer.publish_agent_started("a", "s", "before")]
    bad_ids = []
    for fields, _ in GARBAGE:
        bad_ids.append(await xadd_raw(raw, stream_name, fields))
    good_ids.append(await consumer.publish_agent_started("a", "s", "after"))

    received = await consume(consumer, 2)
    assert [e["_msg_id"] for e in received] == good_ids
    assert await pending_rows(raw, stream_name, "g") == []
    letters = await consumer.dead_letters.list()
    assert [x.original_id for x in letters] == bad_ids
    for letter, (fields, reason) in zip(letters, GARBAGE, strict=True):
        assert letter.reason == "malformed"
        assert reason in letter.error
        assert letter.fields == fields  # kept byte for byte
    info = await consumer.get_stream_info()
    assert info["dead_letters"] == len(GARBAGE)


async def test_json_bomb_from_another_writer_is_dead_lettered(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    bomb = await xadd_raw(raw, stream_name, {b"type": b"t", b"x": b"[" * 100_000})
    good = await consumer.publish_agent_started("a", "s", "after the bomb")
    assert [e["_msg_id"] for e in await consume(consumer, 1)] == [good]
    [letter] = await consumer.dead_letters.list()
    assert (letter.original_id, letter.reason) == (bomb, "malformed")
    assert "nested too deeply" in letter.error


async def test_claim_dead_letters_undecodable_entries(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await rescuer.initialize()
    bad = await xadd_raw(raw, stream_name, {b"type": b"\xff"})
    good = await rescuer.publish_agent_started("a", "s", "x")
    await raw.xreadgroup("g", "dead", {stream_name: ">"})
    assert [e["_msg_id"] for e in await rescuer.claim_abandoned_messages(0)] == [good]
    [letter] = await rescuer.dead_letters.list(reason="malformed")
    assert letter.original_id == bad


async def test_reference_written_entries_are_read_as_the_reference_reads_them(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    written = reference_fields({
        "type": "tool_result", "tool_name": "calc", "session_id": "sess_1",
        "result": {"answer": 42}, "execution_time_ms": 12.5, "ok": True, "none": None,
        "timestamp": 1700000000.25,
    })
    msg_id = await xadd_raw(raw, stream_name, written)
    [event] = await consume(consumer, 1)
    assert_same(event, {
        "type": "tool_result", "tool_name": "calc", "session_id": "sess_1",
        "result": {"answer": 42}, "execution_time_ms": 12.5, "ok": "True",
        "timestamp": 1700000000.25, "_msg_id": msg_id,
    })


async def test_entries_trimmed_while_pending_do_not_break_recovery(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    """Reliability fact 2: after a forced trim, XREADGROUP 0 returns (id, {}) for them."""
    producer = make_coordinator()
    await make_coordinator(consumer_group="g").initialize()
    ids = [await producer.publish_agent_started("a", "s", str(i)) for i in range(5)]
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=5)
    assert await producer.trim_stream(2, approximate=False, force=True) == 3
    restarted = make_coordinator(consumer_group="g", consumer_name="w")
    assert [e["_msg_id"] for e in await consume(restarted, 5)] == ids[3:]
    assert await pending_rows(raw, stream_name, "g") == []


async def test_claim_reports_entries_trimmed_while_pending(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    rescuer = make_coordinator(consumer_group="g", consumer_name="rescuer")
    await rescuer.initialize()
    ids = [await rescuer.publish_agent_started("a", "s", str(i)) for i in range(5)]
    await raw.xreadgroup("g", "dead", {stream_name: ">"}, count=5)
    await rescuer.trim_stream(2, approximate=False, force=True)
    assert [e["_msg_id"] for e in await rescuer.claim_abandoned_messages(0)] == ids[3:]
    assert [r["message_id"] for r in await pending_rows(raw, stream_name, "g")] == ids[3:]


# --------------------------------------------------------------------------- outages


async def test_subscribe_recreates_a_deleted_group(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    received: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in consumer.subscribe(timeout_ms=0):
            received.append(event)

    task = asyncio.create_task(run())
    try:
        first = await consumer.publish_agent_started("a", "s", "1")

        async def got(n: int) -> bool:
            return len(received) == n

        await wait_for(lambda: got(1), timeout_s=5, message="the first event")
        await raw.xgroup_destroy(stream_name, "g")
        second = await consumer.publish_agent_started("a", "s", "2")

        async def got_second() -> bool:
            return second in [e["_msg_id"] for e in received]

        await wait_for(got_second, timeout_s=10, message="an event after NOGROUP")
        # The group is re-created from the start of the stream: nothing is skipped (the first
        # event comes again, at-least-once).
        assert [e["_msg_id"] for e in received] == [first, first, second]
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_subscribe_survives_deletion_of_the_stream(
        redis_url: str, make_coordinator: MakeCoordinator, raw: aioredis.Redis,
        stream_name: str) -> None:
    """DEL the stream under a blocked subscriber (Redis 7 answers UNBLOCKED, Valkey NOGROUP):
    the group is re-created and a later event is delivered."""
    name = f"del-{uuid.uuid4().hex[:8]}"
    consumer = make_coordinator(redis_url=with_query(redis_url, f"client_name={name}"),
                                consumer_group="g")
    await consumer.initialize()
    received: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in consumer.subscribe(timeout_ms=0):
            received.append(event)

    async def blocked() -> bool:
        return any(c.get("cmd") == "xreadgroup" for c in await clients_named(raw, name))

    task = asyncio.create_task(run())
    try:
        await wait_for(blocked, timeout_s=5, message="the subscriber to block")
        await raw.delete(stream_name)

        async def group_recreated() -> bool:
            return await raw.exists(stream_name) == 1

        await wait_for(group_recreated, timeout_s=10, message="the group to be re-created")
        msg_id = await consumer.publish_agent_started("a", "s", "after the DEL")

        async def delivered() -> bool:
            return [e["_msg_id"] for e in received] == [msg_id]

        await wait_for(delivered, timeout_s=10, message="the event published after the DEL")
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_swallowed_cancellation_still_stops_subscribe(
        make_coordinator: MakeCoordinator) -> None:
    """Python 3.11's asyncio.wait_for, which redis-py uses for every send, can drop a
    cancellation that lands as a send completes; the task then stays "cancelling" and the loop
    must stop by itself instead of reading forever. Here the drop is made to happen on
    purpose, right after the first event."""
    consumer = make_coordinator(consumer_group="g")
    await consumer.initialize()
    await consumer.publish_agent_started("a", "s", "1")
    await consumer.publish_agent_started("a", "s", "2")
    received: list[dict[str, Any]] = []

    async def run() -> None:
        me = asyncio.current_task()
        assert me is not None
        async for event in consumer.subscribe(timeout_ms=0):
            received.append(event)
            me.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # what wait_for does on 3.11
                await asyncio.sleep(0)

    task = asyncio.create_task(run())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    assert len(received) == 1


async def test_subscribe_survives_a_server_restart(tmp_path: Any) -> None:
    """Kill -9 the server under a blocked subscriber and start it again (AOF on): the
    subscriber reconnects, nothing acknowledged is lost, and new events flow."""
    with LocalServer("valkey", appendonly=True, appendfsync="always",
                     data_dir=tmp_path) as server:
        async with AgentCoordinator(server.url, "restart", "g", socket_timeout_s=2) as consumer:
            before = await consumer.publish_agent_started("a", "s", "before")
            received: list[dict[str, Any]] = []

            async def run() -> None:
                async for event in consumer.subscribe(timeout_ms=0):
                    received.append(event)

            async def count_is(n: int) -> bool:
                return len(received) == n

            task = asyncio.create_task(run())
            try:
                await wait_for(lambda: count_is(1), timeout_s=5, message="the first event")
                server.restart()
                async with AgentCoordinator(server.url, "restart") as producer:
                    after = await producer.publish_agent_started("a", "s", "after")
                    await wait_for(lambda: count_is(2), timeout_s=15,
                                   message="the event published after the restart")
                assert [e["_msg_id"] for e in received] == [before, after]
                assert not task.done()
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task


async def test_breaking_out_leaves_the_event_pending_for_a_restart(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    consumer = make_coordinator(consumer_group="g", consumer_name="w")
    await consumer.initialize()
    ids = [await consumer.publish_agent_started("a", "s", str(i)) for i in range(3)]
    async with aclosing(consumer.subscribe(timeout_ms=300)) as events:
        async for event in events:
            assert event["_msg_id"] == ids[0]
            break  # the handler failed: no ack
    assert ids[0] in [r["message_id"] for r in await pending_rows(raw, stream_name, "g")]
    again = make_coordinator(consumer_group="g", consumer_name="w")
    received = await consume(again, 3)
    assert [e["_msg_id"] for e in received] == ids
    entries = dict(await stream_entries(raw, stream_name))
    assert received[0]["_event_id"] == entries[ids[0]][b"_eid"].decode()


async def test_an_event_acknowledged_before_leaving_does_not_come_back(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The documented way to leave a subscription after finishing an event (a caller that
    found its answer): ack it, then break. Without the ack, the log says what will happen."""
    consumer = make_coordinator(consumer_group="g", consumer_name="w")
    await consumer.initialize()
    ids = [await consumer.publish_agent_started("a", "s", str(i)) for i in range(2)]
    async with aclosing(consumer.subscribe(timeout_ms=300)) as events:
        async for event in events:
            assert await consumer.ack(event["_msg_id"]) == 1
            break
    again = make_coordinator(consumer_group="g", consumer_name="w")
    with caplog.at_level("INFO", logger="agentstreams.coordinator"):
        async with aclosing(again.subscribe(timeout_ms=300)) as events:
            async for event in events:
                assert event["_msg_id"] == ids[1]  # the acknowledged one is not redelivered
                break
    [record] = [r for r in caplog.records if "stays pending" in r.getMessage()]
    assert ids[1] in record.getMessage()
    assert [r["message_id"] for r in await pending_rows(raw, stream_name, "g")] == [ids[1]]


async def test_trim_says_which_group_holds_the_stream_back(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The README's first snippet: consumer_group="workers" used only through filtered
    subscriptions leaves "workers" itself unread; safe trim then keeps everything. It must
    say so, naming the group, instead of silently removing nothing."""
    consumer = make_coordinator(consumer_group="workers", consumer_name="w")
    await consumer.initialize()
    for i in range(5):
        await consumer.publish_handoff_ready("a", "b", f"s{i}", {})
    received = [e async for e in consumer.subscribe(event_types=["handoff_ready"],
                                                    timeout_ms=300, max_events=5)]
    assert len(received) == 5
    with caplog.at_level("WARNING", logger="agentstreams.coordinator"):
        assert await consumer.trim_stream(1, approximate=False) == 0
    [record] = [r for r in caplog.records if "stopped at" in r.getMessage()]
    assert "group 'workers' has not read past 0-0" in record.getMessage()
    assert "XGROUP DESTROY" in record.getMessage()
    assert await raw.xlen(stream_name) == 5

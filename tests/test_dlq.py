"""Dead letters: atomic move, list, get, replay (same event id), purge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    DeadLetter,
    DeadLetterQueue,
    Event,
    InvalidArgumentError,
    MalformedEventError,
    Publisher,
    Reject,
    Worker,
)
from agentstreams._codec import encode_event
from agentstreams._connection import ConnectionSettings, create_client
from agentstreams._constants import DLQ_TRACEBACK_MAX_CHARS
from agentstreams._dlq import dead_letter, format_error, format_traceback
from agentstreams._streams import dlq_key
from conftest import pending_rows, stream_entries, stream_ids, wait_for, xadd_raw

MakeCoordinator = Callable[..., AgentCoordinator]


@pytest.fixture
async def client(redis_url: str, raw: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = create_client(ConnectionSettings(url=redis_url))
    yield client
    await client.aclose()


async def deliver(raw: aioredis.Redis, stream: str, entries: list[dict[bytes, bytes]],
                  consumer: str = "w") -> list[str]:
    """XADD the entries and deliver them to ``consumer`` of group ``g`` (pending, not acked)."""
    await raw.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [await xadd_raw(raw, stream, fields) for fields in entries]
    await raw.xreadgroup("g", consumer, {stream: ">"}, count=len(entries))
    return ids


async def kill(client: aioredis.Redis, stream: str, msg_id: str, fields: dict[bytes, bytes],
               reason: str = "max_deliveries", consumer: str = "w") -> str | None:
    return await dead_letter(client, stream=stream, group="g", consumer=consumer, msg_id=msg_id,
                             fields=fields, reason=reason, error="ValueError: boom",
                             deliveries=5)


def test_dlq_key_shares_the_stream_slot() -> None:
    assert dlq_key("agent_events") == "{agent_events}:dlq"
    assert dlq_key("{tenant}:events") == "{tenant}:events:dlq"


async def test_dead_letter_moves_a_pending_entry_atomically(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    fields = encode_event("tool_result", {"session_id": "1", "result": [1]})
    [msg_id] = await deliver(raw, stream_name, [fields])
    dlq_id = await kill(client, stream_name, msg_id, fields)
    assert dlq_id is not None
    assert await pending_rows(raw, stream_name, "g") == []
    [(stored_id, stored)] = await stream_entries(raw, dlq_key(stream_name))
    assert stored_id == dlq_id
    assert stored[b"original_id"] == msg_id.encode()
    assert stored[b"reason"] == b"max_deliveries"
    assert stored[b"type"] == b"tool_result"  # the original fields, readable with XRANGE

    letter = await DeadLetterQueue(client, stream_name).get(dlq_id)
    assert letter is not None
    assert (letter.original_id, letter.original_stream, letter.group, letter.consumer) == (
        msg_id, stream_name, "g", "w")
    assert (letter.reason, letter.error, letter.deliveries) == (
        "max_deliveries", "ValueError: boom", 5)
    assert letter.dead_at_ms > 0
    assert letter.fields == fields
    assert letter.event()["result"] == [1]
    assert letter.to_dict()["fields"]["session_id"] == "1"


async def test_dead_letter_is_a_no_op_when_someone_else_has_the_entry(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    fields = {b"type": b"t"}
    [msg_id] = await deliver(raw, stream_name, [fields], consumer="owner")
    assert await kill(client, stream_name, msg_id, fields, consumer="other") is None
    assert await raw.xlen(dlq_key(stream_name)) == 0
    assert len(await pending_rows(raw, stream_name, "g")) == 1
    assert await kill(client, stream_name, msg_id, fields, consumer="owner") is not None
    # Already acknowledged now: a second move does nothing (never in both places).
    assert await kill(client, stream_name, msg_id, fields, consumer="owner") is None
    assert await raw.xlen(dlq_key(stream_name)) == 1


@pytest.mark.parametrize("field_count", [10, 3_600, 5_000])
async def test_dead_letter_keeps_every_original_field(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, field_count: int) -> None:
    """Every field survives, also beyond what one script call can take (Lua holds about
    8,000 arguments): such entries move through a lease check and a transaction."""
    fields = {b"type": b"t", **{f"f{i}".encode(): str(i).encode() for i in range(field_count)}}
    [msg_id] = await deliver(raw, stream_name, [fields], consumer="owner")
    assert await kill(client, stream_name, msg_id, fields, consumer="other") is None
    assert await raw.xlen(dlq_key(stream_name)) == 0
    dlq_id = await kill(client, stream_name, msg_id, fields, consumer="owner")
    assert dlq_id is not None
    assert await pending_rows(raw, stream_name, "g") == []
    letter = await DeadLetterQueue(client, stream_name).get(dlq_id)
    assert letter is not None
    assert letter.fields == fields
    assert await kill(client, stream_name, msg_id, fields, consumer="owner") is None
    assert await raw.xlen(dlq_key(stream_name)) == 1


async def test_original_fields_named_like_metadata_survive(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    fields = {b"type": b"t", b"reason": b"user reason", b"error": b"user error",
              b"group": b"user group"}
    [msg_id] = await deliver(raw, stream_name, [fields])
    dlq_id = await kill(client, stream_name, msg_id, fields)
    assert dlq_id is not None
    queue = DeadLetterQueue(client, stream_name)
    letter = await queue.get(dlq_id)
    assert letter is not None
    assert letter.reason == "max_deliveries"
    assert letter.fields == fields
    [(_, new_id)] = await queue.replay([dlq_id])
    [(_, replayed)] = [e for e in await stream_entries(raw, stream_name) if e[0] == new_id]
    assert replayed == {**fields, b"_grp": b"g"}  # the fields, routed to the failed group


async def test_malformed_bytes_are_kept_exactly(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    fields = {b"type": b"\xff\xfe", b"\x00key": b"\x80\x81"}
    [msg_id] = await deliver(raw, stream_name, [fields])
    dlq_id = await kill(client, stream_name, msg_id, fields, reason="malformed")
    assert dlq_id is not None
    letter = await DeadLetterQueue(client, stream_name).get(dlq_id)
    assert letter is not None
    assert letter.fields == fields
    with pytest.raises(MalformedEventError):
        letter.event()
    assert letter.to_dict()["fields"]  # printable even when the bytes are not UTF-8


async def test_list_pages_filters_and_counts(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    entries = [{b"type": b"t", b"i": str(i).encode()} for i in range(250)]
    ids = await deliver(raw, stream_name, entries)
    for i, (msg_id, fields) in enumerate(zip(ids, entries, strict=True)):
        await kill(client, stream_name, msg_id, fields,
                   reason="malformed" if i % 50 == 0 else "max_deliveries")
    queue = DeadLetterQueue(client, stream_name)
    assert await queue.length() == 250
    everything = await queue.list(count=1000)
    assert [x.original_id for x in everything] == ids
    assert [x.original_id for x in await queue.list(count=10)] == ids[:10]
    malformed = await queue.list(reason="malformed")
    assert [x.original_id for x in malformed] == ids[::50]
    after = await queue.list(count=5, start="(" + everything[100].dlq_id)
    assert [x.original_id for x in after] == ids[101:106]
    assert await queue.get("0-1") is None
    with pytest.raises(ValueError, match="count must be positive"):
        await queue.list(count=0)


async def test_replay_puts_events_back_with_the_same_event_id(
        make_coordinator: MakeCoordinator, raw: aioredis.Redis, stream_name: str) -> None:
    producer = make_coordinator()
    consumer = make_coordinator(consumer_group="g", consumer_name="w", max_deliveries=1)
    await consumer.initialize()
    msg_id = await producer.publish_tool_result("t", "123", {"x": None}, 1.0)
    await raw.xreadgroup("g", "w", {stream_name: ">"})  # delivery 1 fails ...
    assert await consumer.claim_abandoned_messages(0) == []  # ... delivery 2 > 1: dead
    queue = consumer.dead_letters
    [letter] = await queue.list()
    event_id = letter.fields[b"_eid"].decode()

    [(dlq_id, new_id)] = await queue.replay(all_letters=True)
    assert dlq_id == letter.dlq_id
    assert new_id != msg_id
    assert await queue.length() == 0
    assert await stream_ids(raw, stream_name) == [msg_id, new_id]
    [event] = [e async for e in consumer.subscribe(timeout_ms=300, max_events=1)]
    assert event["_msg_id"] == new_id
    assert event["_event_id"] == event_id  # consumers can deduplicate across the replay
    assert event["session_id"] == "123"
    assert event["result"] == {"x": None}
    # Replaying the same dead letter twice does nothing the second time.
    assert await queue.replay([dlq_id]) == []


async def test_replay_selected_and_filtered(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    entries = [{b"type": b"t", b"i": str(i).encode()} for i in range(4)]
    ids = await deliver(raw, stream_name, entries)
    dlq_ids = [await kill(client, stream_name, m, f, reason=r) for m, f, r in
               zip(ids, entries, ["a", "b", "a", "b"], strict=True)]
    queue = DeadLetterQueue(client, stream_name)
    assert [d for d, _ in await queue.replay(where=lambda x: x.reason == "a")] == [
        dlq_ids[0], dlq_ids[2]]
    assert [d for d, _ in await queue.replay([str(dlq_ids[1]), "0-1"])] == [dlq_ids[1]]
    assert [x.dlq_id for x in await queue.list()] == [dlq_ids[3]]
    assert await raw.xlen(stream_name) == 4 + 3


async def test_purge(client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    entries = [{b"type": b"t", b"i": str(i).encode()} for i in range(6)]
    ids = await deliver(raw, stream_name, entries)
    dlq_ids = [str(await kill(client, stream_name, m, f, reason="ab"[i % 2]))
               for i, (m, f) in enumerate(zip(ids, entries, strict=True))]
    queue = DeadLetterQueue(client, stream_name)
    assert await queue.purge([dlq_ids[0]]) == 1
    assert await queue.purge([]) == 0
    assert await queue.purge([dlq_ids[1], dlq_ids[2]], where=lambda x: x.reason == "a") == 1
    assert await queue.purge(where=lambda x: x.reason == "b") == 3  # 1, 3 and 5
    assert [x.dlq_id for x in await queue.list()] == [dlq_ids[4]]
    assert await queue.purge(all_letters=True) == 1
    assert await queue.length() == 0


def test_dead_letter_from_entry_and_format_error() -> None:
    letter = DeadLetter.from_entry("5-0", {b"original_id": b"1-0", b"reason": b"rejected",
                                           b"deliveries": b"2", b"type": b"t"})
    assert letter.original_id == "1-0"
    assert letter.reason == "rejected"
    assert letter.deliveries == 2
    assert letter.fields == {b"type": b"t"}
    assert format_error(ValueError("boom")) == "ValueError: boom"
    assert format_error(None) == ""
    assert len(format_error(RuntimeError("x" * 5000))) <= 2003


async def test_replay_writes_only_to_the_queues_own_stream(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    """``original_stream`` is data anyone with write access to the dead-letter stream can
    forge: a replay never follows it to another key."""
    victim = f"{stream_name}-victim"
    await raw.xadd(victim, {b"keep": b"me"})
    forged = {b"original_id": b"1-0", b"original_stream": victim.encode(), b"group": b"g",
              b"consumer": b"c", b"reason": b"rejected", b"error": b"", b"deliveries": b"1",
              b"dead_at_ms": b"0", b"type": b"t", b"payload": b"x"}
    dlq_id = await xadd_raw(raw, dlq_key(stream_name), forged)
    [(replayed_id, new_id)] = await DeadLetterQueue(client, stream_name).replay([dlq_id])
    assert replayed_id == dlq_id
    assert [msg_id for msg_id, _ in await stream_entries(raw, stream_name)] == [new_id]
    assert await raw.xlen(victim) == 1
    await raw.delete(victim)


def test_a_long_traceback_keeps_its_last_part() -> None:
    """Bounded, and cut at the start: the last lines (where it finally failed) are kept."""
    def chain(n: int) -> None:
        try:
            if n == 0:
                raise RuntimeError("the first failure")
            chain(n - 1)
        except Exception as exc:
            raise ValueError(f"level {n} " + "x" * 200) from exc

    try:
        chain(60)
    except ValueError as exc:
        text = format_traceback(exc)
    assert len(text) <= DLQ_TRACEBACK_MAX_CHARS
    assert text.startswith("...\n")
    assert text.rstrip().endswith("ValueError: level 60 " + "x" * 200)
    assert format_traceback(RuntimeError("never raised")) == ""


async def test_replay_runs_again_only_in_the_group_where_it_died(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    """Two groups take the stream; one handled the event, the other dead-lettered it. A
    replay runs it again in the failed group only (the other acknowledges it unseen);
    ``all_groups=True`` gives it to both."""
    runs: dict[str, list[int]] = {"ok": [], "picky": []}
    fail_once = {"picky": True}
    workers = []
    for group in ("ok", "picky"):
        worker = Worker(redis_url, stream_name, group, probe_server=False, block_ms=100)

        async def handle(event: Event, group: str = group) -> None:
            runs[group].append(event["n"])
            if fail_once.get(group):
                raise Reject("not yet")

        worker.add_handler(handle)
        workers.append(worker)
    try:
        for worker in workers:
            await worker.start()
        await Publisher(raw, stream_name).publish("task", {"n": 1})
        queue = DeadLetterQueue(raw, stream_name)

        async def dead_letters(count: int) -> bool:
            return await queue.length() == count

        await wait_for(lambda: dead_letters(1), message="the picky group's dead letter")
        with pytest.raises(InvalidArgumentError, match="all_letters=True"):
            await queue.replay()
        fail_once["picky"] = False
        [_replayed] = await queue.replay(all_letters=True)

        async def settled() -> bool:
            return runs["picky"] == [1, 1] and await _pending_total(raw, stream_name) == 0

        await wait_for(settled, message="the replay handled by the picky group")
        assert runs["ok"] == [1]  # the group that had handled it did not run it again
        fail_once["picky"] = True
        await Publisher(raw, stream_name).publish("task", {"n": 2})
        await wait_for(lambda: dead_letters(1), message="a second dead letter")
        fail_once["picky"] = False
        await queue.replay(all_letters=True, all_groups=True)

        async def both() -> bool:
            return runs["ok"] == [1, 2, 2] and runs["picky"] == [1, 1, 2, 2]

        await wait_for(both, message="the replay to every group")
    finally:
        for worker in workers:
            await worker.stop(timeout_s=2)


async def _pending_total(raw: aioredis.Redis, stream: str) -> int:
    groups: Any = await raw.xinfo_groups(stream)
    return sum(int(g["pending"]) for g in groups)

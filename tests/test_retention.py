"""Safe retention: trim never removes what a group has not delivered and acknowledged."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import InvalidArgumentError, TrimResult, WrongTypeError
from agentstreams._connection import ConnectionSettings, create_client
from agentstreams._retention import safe_floor, trim
from agentstreams._streams import stream_id_key
from conftest import pending_rows, stream_ids


@pytest.fixture
async def client(redis_url: str, raw: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = create_client(ConnectionSettings(url=redis_url))
    yield client
    await client.aclose()


async def add(raw: aioredis.Redis, stream: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        msg_id: Any = await raw.xadd(stream, {"type": "t", "i": str(i)})
        ids.append(msg_id.decode())
    return ids


async def test_missing_stream(client: aioredis.Redis, stream_name: str) -> None:
    assert await trim(client, stream_name, 10) == TrimResult(0, None, False)
    assert await safe_floor(client, stream_name) is None


async def test_without_groups_trims_to_length(client: aioredis.Redis, raw: aioredis.Redis,
                                              stream_name: str) -> None:
    ids = await add(raw, stream_name, 20)
    assert (await trim(client, stream_name, 25, approximate=False)).removed == 0
    result = await trim(client, stream_name, 8, approximate=False)
    assert result == TrimResult(12, None, False)
    assert await stream_ids(raw, stream_name) == ids[12:]
    assert (await trim(client, stream_name, 0, approximate=False)).removed == 8
    assert await raw.xlen(stream_name) == 0


@pytest.mark.parametrize("n", [3, 7])  # both ends of the cut-id script (drop < n, drop >= n)
async def test_cut_point_either_side_of_the_middle(client: aioredis.Redis, raw: aioredis.Redis,
                                                   stream_name: str, n: int) -> None:
    ids = await add(raw, stream_name, 10)
    await trim(client, stream_name, n, approximate=False)
    assert await stream_ids(raw, stream_name) == ids[-n:]


async def test_pending_entries_hold_the_floor(client: aioredis.Redis, raw: aioredis.Redis,
                                              stream_name: str) -> None:
    ids = await add(raw, stream_name, 10)
    await raw.xgroup_create(stream_name, "g", id="0")
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=6)
    await raw.xack(stream_name, "g", *ids[:4], ids[5])  # ids[4] stays pending
    assert await safe_floor(client, stream_name) == ids[4]
    result = await trim(client, stream_name, 0, approximate=False)
    # The result names the group holding the stream back, why, and since when.
    assert result == TrimResult(4, ids[4], True, "g", "pending", ids[4], result.held_age_ms)
    assert result.held_age_ms is not None
    assert 0 <= result.held_age_ms < 60_000
    assert await stream_ids(raw, stream_name) == ids[4:]
    assert [r["message_id"] for r in await pending_rows(raw, stream_name, "g")] == [ids[4]]


async def test_undelivered_entries_hold_the_floor(client: aioredis.Redis, raw: aioredis.Redis,
                                                  stream_name: str) -> None:
    ids = await add(raw, stream_name, 10)
    await raw.xgroup_create(stream_name, "g", id="0")
    assert (await trim(client, stream_name, 2, approximate=False)).removed == 0
    await raw.xreadgroup("g", "w", {stream_name: ">"}, count=3)
    await raw.xack(stream_name, "g", *ids[:3])
    result = await trim(client, stream_name, 2, approximate=False)
    assert result.removed == 3
    assert result.limited_by_groups
    assert await stream_ids(raw, stream_name) == ids[3:]


async def test_slowest_group_wins(client: aioredis.Redis, raw: aioredis.Redis,
                                  stream_name: str) -> None:
    ids = await add(raw, stream_name, 10)
    await raw.xgroup_create(stream_name, "late", id=ids[5])  # never wants ids[:6]
    await raw.xgroup_create(stream_name, "slow", id=ids[1])
    assert await safe_floor(client, stream_name) == f"{ids[1].split('-')[0]}-" \
        f"{int(ids[1].split('-')[1]) + 1}"
    await trim(client, stream_name, 0, approximate=False)
    assert await stream_ids(raw, stream_name) == ids[2:]


async def test_force_ignores_groups(client: aioredis.Redis, raw: aioredis.Redis,
                                    stream_name: str) -> None:
    ids = await add(raw, stream_name, 10)
    await raw.xgroup_create(stream_name, "g", id="0")
    result = await trim(client, stream_name, 4, approximate=False, force=True)
    assert result == TrimResult(6, None, False)
    assert await stream_ids(raw, stream_name) == ids[6:]


async def test_approximate_trim_never_removes_more_than_exact(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str) -> None:
    await add(raw, stream_name, 300)
    result = await trim(client, stream_name, 100)
    assert 0 <= result.removed <= 200
    assert await raw.xlen(stream_name) >= 100


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10", None])
async def test_invalid_max_length(client: aioredis.Redis, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_length must be an integer >= 0"):
        await trim(client, "s", bad)


async def test_wrong_type_key(client: aioredis.Redis, raw: aioredis.Redis,
                              stream_name: str) -> None:
    await raw.set(stream_name, "x")
    with pytest.raises(WrongTypeError):
        await trim(client, stream_name, 1)


@pytest.mark.parametrize("seed", range(4))
async def test_random_workload_never_trims_unfinished_entries(
        client: aioredis.Redis, raw: aioredis.Redis, stream_name: str, seed: int) -> None:
    """Model check: random appends, reads, acks and trims over two groups; after each trim,
    every entry that some group has not delivered and acknowledged is still there, and
    everything below the safe floor beyond ``max_length`` is gone."""
    rng = random.Random(seed)
    await raw.xgroup_create(stream_name, "a", id="0", mkstream=True)
    await raw.xgroup_create(stream_name, "b", id="0")
    unfinished: dict[str, set[str]] = {"a": set(), "b": set()}
    for _step in range(40):
        op = rng.choice(["add", "add", "read", "ack", "trim"])
        if op == "add":
            new_ids = await add(raw, stream_name, rng.randint(1, 5))
            for waiting in unfinished.values():
                waiting.update(new_ids)
        elif op == "read":
            group = rng.choice(["a", "b"])
            await raw.xreadgroup(group, "w", {stream_name: ">"}, count=rng.randint(1, 6))
        elif op == "ack":
            group = rng.choice(["a", "b"])
            pending = [r["message_id"] for r in await pending_rows(raw, stream_name, group)]
            done = rng.sample(pending, k=min(len(pending), rng.randint(0, 4)))
            if done:
                await raw.xack(stream_name, group, *done)
                unfinished[group].difference_update(done)
        else:
            max_length = rng.randint(0, 10)
            before = await stream_ids(raw, stream_name)
            result = await trim(client, stream_name, max_length, approximate=False)
            after = await stream_ids(raw, stream_name)
            still_needed = (unfinished["a"] | unfinished["b"]) & set(before)
            assert still_needed <= set(after), f"trimmed unfinished entries (seed {seed})"
            assert result.removed == len(before) - len(after)
            assert after == before[len(before) - len(after):]  # only the oldest go
            keep = max_length
            if still_needed:
                oldest_needed = min(still_needed, key=stream_id_key)
                keep = max(keep, len(before) - before.index(oldest_needed))
            assert len(after) == min(keep, len(before))

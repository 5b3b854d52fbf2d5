"""A connection the server closed while it sat idle is replaced before anything is written.

The server (or a proxy, a NAT, a failover) may drop an idle pooled connection at any time.
Nothing was sent on it, so every call must simply reconnect: publish, concurrent publishes,
publish_many, idempotent publish, and redis-py's own commands (XREADGROUP, XACK, scripts) on
a client that makes no retries, as the worker's does. Only connections this test created are
killed (by their unique client name): the Redis 7 server may be shared.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import AgentCoordinator, Publisher
from agentstreams._connection import ConnectionSettings, create_client
from conftest import kill_clients_named, with_query

ROUNDS = 3


def _unique_name() -> str:
    return f"idle-kill-{uuid.uuid4().hex[:10]}"


async def _kill(raw: aioredis.Redis, name: str) -> None:
    killed = await kill_clients_named(raw, name)
    assert killed >= 1, "the test must have killed a connection to mean anything"


def _publish_path(path: str, publish: Callable[..., Awaitable[str]],
                  publish_many: Callable[[list[dict[str, Any]]], Awaitable[list[str]]],
                  ) -> Callable[[int], Awaitable[int]]:
    """One call of ``path``; returns how many entries it wrote."""
    async def call(round_: int) -> int:
        if path == "publish":
            await publish("t", {"round": round_})
            return 1
        if path == "concurrent":
            ids = await asyncio.gather(*(publish("t", {"round": round_, "n": n})
                                         for n in range(64)))
            assert len(set(ids)) == 64
            return 64
        if path == "publish_many":
            ids = await publish_many([{"type": "t", "round": round_, "n": n}
                                      for n in range(10)])
            assert len(ids) == 10
            return 10
        await publish("t", {"round": round_}, idempotency_key=f"key-{round_}")
        return 1
    return call


PATHS = ["publish", "concurrent", "publish_many", "idempotent"]


@pytest.mark.parametrize("path", PATHS)
async def test_coordinator_publishes_after_its_idle_connections_were_killed(
        redis_url: str, raw: aioredis.Redis, stream_name: str, path: str) -> None:
    name = _unique_name()
    async with AgentCoordinator(with_query(redis_url, f"client_name={name}"),
                                stream_name) as coordinator:
        call = _publish_path(path, coordinator.publish, coordinator.publish_many)
        written = await call(0)
        for round_ in range(1, ROUNDS + 1):
            await _kill(raw, name)
            written += await call(round_)
    assert await raw.xlen(stream_name) == written


@pytest.mark.parametrize("path", PATHS)
async def test_a_publisher_on_a_plain_redis_py_client_also_reconnects(
        redis_url: str, raw: aioredis.Redis, stream_name: str, path: str) -> None:
    """A user's own redis-py client (redis-py's pool, not ours): the transport checks."""
    name = _unique_name()
    client = aioredis.Redis.from_url(with_query(redis_url, f"client_name={name}"))
    try:
        publisher = Publisher(client, stream_name)
        call = _publish_path(path, publisher.publish, publisher.publish_many)
        written = await call(0)
        for round_ in range(1, ROUNDS + 1):
            await _kill(raw, name)
            written += await call(round_)
    finally:
        await client.aclose()
    assert await raw.xlen(stream_name) == written


async def test_commands_on_a_client_without_retries_survive_killed_idle_connections(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    """The worker's client makes no retries: XREADGROUP, XACK and scripts must still never
    be written on a connection that died while idle."""
    name = _unique_name()
    client = create_client(ConnectionSettings(url=redis_url, command_retries=0,
                                              client_name=name))
    try:
        await client.xgroup_create(stream_name, "g", id="0", mkstream=True)
        count = client.register_script("return redis.call('XLEN', KEYS[1])")
        for round_ in range(ROUNDS):
            msg_id = await raw.xadd(stream_name, {"n": round_})
            await _kill(raw, name)
            reply: Any = await client.xreadgroup("g", "c", {stream_name: ">"}, count=10)
            # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
            [entries] = [v[0] for v in reply.values()] if isinstance(reply, dict) \
                else [entries for _, entries in reply]
            assert [entry_id for entry_id, _ in entries] == [msg_id]
            await _kill(raw, name)
            assert await client.xack(stream_name, "g", msg_id) == 1
            await _kill(raw, name)
            assert await count(keys=[stream_name]) == round_ + 1
    finally:
        await client.aclose()

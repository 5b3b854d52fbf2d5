"""Pins the private redis-py internals the transport's fast path relies on.

Each test names the internal and fails with the reason when an installed redis-py (or
hiredis) no longer has it or it behaves differently; ``_transport.INTERNALS`` lists them.
The transport itself then falls back to redis-py's public API: the last tests run every
publish path on that fallback.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from agentstreams import Publisher
from agentstreams import _transport as transport
from conftest import kill_clients_named, stream_entries, wait_for, with_query


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[Any]:
    """A connected redis-py connection checked out of a plain pool (dropped afterwards)."""
    pool = aioredis.ConnectionPool.from_url(redis_url)
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    yield connection
    await connection.disconnect()
    await pool.disconnect()


def test_the_fast_path_is_on() -> None:
    problem = transport.fast_path_problem()
    assert problem is None, (
        f"the transport fell back to redis-py's slow public path: {problem}. The installed "
        f"redis-py {redis.__version__} changed internals listed in _transport.INTERNALS; "
        "adapt _transport.py or bound redis in pyproject.toml")


def test_hiredis_reader_marks_an_incomplete_reply_with_not_enough_data() -> None:
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
    reader.feed(b"$5\r\nab")
    assert reader.gets() is NOT_ENOUGH_DATA, "redis._parsers.hiredis.NOT_ENOUGH_DATA"
    reader.feed(b"cde\r\n")
    assert reader.gets() == b"abcde"


async def test_connection_internals_used_by_the_transport(conn: Any) -> None:
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    parser = conn._parser
    assert isinstance(getattr(parser, "_reader", None), hiredis.Reader), \
        "connection._parser._reader is no longer the hiredis.Reader"
    assert inspect.iscoroutinefunction(getattr(parser, "read_from_socket", None)), \
        "connection._parser.read_from_socket() is gone or no longer a coroutine"
    assert parser._connected is True, "connection._parser._connected is gone"
    assert isinstance(getattr(conn, "_writer", None), asyncio.StreamWriter), \
        "connection._writer is no longer an asyncio.StreamWriter"
    # The reply path the transport takes: write on _writer, feed the reader, gets().
    conn._writer.write(b"*1\r\n$4\r\nPING\r\n")
    await conn._writer.drain()
    reply = parser._reader.gets()
    while reply is NOT_ENOUGH_DATA:
        await parser.read_from_socket()
        reply = parser._reader.gets()
    assert reply in (b"PONG", "PONG")
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)  # optional (RESP3)
    assert push_type is None or isinstance(push_type, type)
    await conn.disconnect()
    assert parser._connected is False, "the parser no longer notices a disconnect"


async def test_can_read_is_true_once_the_server_closed_an_idle_connection(
        redis_url: str, raw: aioredis.Redis) -> None:
    """``can_read()`` (``can_read_destructive()`` before redis-py 8) detects EOF, which is
    what replaces a connection that died while idle."""
    name = f"internals-{uuid.uuid4().hex[:8]}"
    pool = aioredis.ConnectionPool.from_url(with_query(redis_url, f"client_name={name}"))
    connection: Any = await pool.get_connection()  # type: ignore[no-untyped-call]  # >= 5.3
    try:
        can_read = getattr(connection, "can_read", None) or connection.can_read_destructive
        assert await can_read() is False
        assert await kill_clients_named(raw, name) == 1

        async def closed() -> bool:
            try:
                return bool(await can_read())
            except redis.ConnectionError:  # can_read_destructive() before redis-py 8
                return True

        await wait_for(closed, timeout_s=5, message="can_read() to report the closed socket")
    finally:
        await pool.release(connection)
        await pool.disconnect()


async def test_the_checked_pool_replaces_a_killed_idle_connection(
        redis_url: str, raw: aioredis.Redis) -> None:
    """``CheckedConnectionPool.get_connection`` keeps redis-py's calling conventions."""
    name = f"internals-{uuid.uuid4().hex[:8]}"
    pool = transport.CheckedConnectionPool.from_url(with_query(redis_url, f"client_name={name}"))
    client = aioredis.Redis(connection_pool=pool)
    try:
        assert await client.ping()
        assert await kill_clients_named(raw, name) == 1
        connection: Any = await pool.get_connection()
        try:
            connection._writer.write(b"*1\r\n$4\r\nPING\r\n")
            assert await transport.read_replies(connection, 1) in ([b"PONG"], ["PONG"])
        finally:
            await pool.release(connection)
    finally:
        await client.aclose()
        await pool.disconnect()


# --------------------------------------------------------------------------- the fallback


@pytest.fixture
def slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the transport as it would on a redis-py without the internals above."""
    monkeypatch.setattr(transport, "_PROBLEM", "forced by the test")


@pytest.mark.usefixtures("slow_path")
async def test_every_publish_path_works_on_the_public_fallback(
        raw: aioredis.Redis, stream_name: str) -> None:
    publisher = Publisher(raw, stream_name)
    first = await publisher.publish("t", {"n": 0})
    ids = await publisher.publish_many([{"type": "t", "n": n} for n in range(1, 200)])
    coalesced = await asyncio.gather(*(publisher.publish("t", {"n": n})
                                       for n in range(200, 300)))
    again = await publisher.publish("t", {"n": 300}, idempotency_key="k")
    assert await publisher.publish("t", {"n": 300}, idempotency_key="k") == again  # a retry
    entries = await stream_entries(raw, stream_name)
    assert len(entries) == 301
    assert {msg_id for msg_id, _ in entries} == {first, *ids, *coalesced, again}
    assert sorted(int(fields[b"n"]) for _, fields in entries) == list(range(301))
    await raw.set(f"{stream_name}-string", "x")
    wrong = Publisher(raw, f"{stream_name}-string")
    results = await asyncio.gather(*(wrong.publish("t", {}) for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(result, redis.ResponseError) for result in results), results
    await raw.delete(f"{stream_name}-string")

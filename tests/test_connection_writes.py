"""Our connections bound writes with ``asyncio.timeout`` in the caller's task.

redis-py wraps every write in ``asyncio.wait_for`` when a socket timeout is set; on Python
3.11 that runs the write in a task of its own (a tenth of a publish's cost, and a
``wait_for`` can swallow the cancellation of the task awaiting it). The tests hold a write
blocked on a frozen server (SIGSTOP: the socket buffers fill up) and look at what runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from agentstreams._connection import ConnectionSettings, create_client
from agentstreams.server import LocalServer

BIG = b"x" * (64 * 1024 * 1024)  # far more than the socket buffers take


def _write_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running redis-py's inner write coroutine (what ``wait_for`` wraps)."""
    return [task for task in asyncio.all_tasks()
            if task.get_coro().__qualname__.endswith("_send_packed_command")]  # type: ignore[union-attr]


async def _blocked_write(client: aioredis.Redis, server: LocalServer) -> asyncio.Task[Any]:
    await client.ping()
    server.pause()
    task = asyncio.ensure_future(client.set("big", BIG))
    await asyncio.sleep(0.3)  # the write fills the socket buffers and blocks
    assert not task.done()
    return task


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_a_blocked_write_runs_in_the_callers_task_and_times_out(unix: bool) -> None:
    with LocalServer("valkey", unix_socket=True) as server:
        url = server.unix_url if unix else server.url
        client = create_client(ConnectionSettings(url=url, socket_timeout_s=1,
                                                  command_retries=0))
        try:
            started = time.monotonic()
            task = await _blocked_write(client, server)
            assert _write_tasks() == []  # no extra task per write
            with pytest.raises(redis_exc.TimeoutError, match="Timeout writing to socket"):
                await asyncio.wait_for(task, 10)
            elapsed = time.monotonic() - started
            assert elapsed < 1 + 0.3 + 0.7, f"the write took {elapsed:.1f}s for a 1 s timeout"
        finally:
            server.resume()
            await client.aclose()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for makes no task since 3.12")
async def test_plain_redis_py_writes_in_a_task_of_its_own() -> None:
    """The regression proof for the test above: it tells our connections from redis-py's."""
    with LocalServer("valkey") as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=1)
        try:
            task = await _blocked_write(client, server)
            assert len(_write_tasks()) == 1
            with pytest.raises(redis_exc.RedisError):
                await asyncio.wait_for(task, 10)
        finally:
            server.resume()
            await client.aclose()


async def test_cancelling_a_blocked_write_cancels_and_drops_the_connection() -> None:
    with LocalServer("valkey") as server:
        client = create_client(ConnectionSettings(url=server.url, socket_timeout_s=30))
        try:
            task = await _blocked_write(client, server)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            server.resume()
            # The half-written command died with its connection: the next one is clean.
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
            assert await client.exists("big") == 0
        finally:
            server.resume()
            await client.aclose()

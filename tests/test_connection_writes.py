"""Our connections bound writes with asyncio.timeout (no extra task, no swallowed cancel)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions as redis_exc

from agentstreams._connection import ConnectionSettings, create_client
from agentstreams.server import LocalServer


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_clients_use_the_task_free_write_timeout(unix: bool) -> None:
    with LocalServer("valkey", unix_socket=True) as server:
        url = server.unix_url if unix else server.url
        client = create_client(ConnectionSettings(url=url, socket_timeout_s=2))
        try:
            assert "WriteTimeoutWithoutTask" in str(
                client.connection_pool.connection_class.__mro__)
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()


async def test_a_write_to_a_frozen_server_times_out() -> None:
    with LocalServer("valkey") as server:
        client = create_client(ConnectionSettings(url=server.url, socket_timeout_s=1,
                                                  command_retries=0))
        try:
            await client.ping()
            server.pause()  # SIGSTOP: the server stops reading; socket buffers fill up
            started = time.monotonic()
            with pytest.raises((redis_exc.TimeoutError, redis_exc.ConnectionError)):
                await client.set("big", b"x" * (64 * 1024 * 1024))
            elapsed = time.monotonic() - started
            assert elapsed < 10, f"the write hung for {elapsed:.1f}s"
        finally:
            server.resume()
            await client.aclose()


async def test_cancelling_a_command_is_not_swallowed() -> None:
    with LocalServer("valkey") as server:
        client = create_client(ConnectionSettings(url=server.url, socket_timeout_s=30))
        try:
            task = asyncio.create_task(client.execute_command(  # type: ignore[no-untyped-call]
                "BLPOP", "nothing", 20))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        finally:
            await client.aclose()

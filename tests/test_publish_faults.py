"""Publishing under faults, on servers started here: errors say the truth, timeouts are bounds.

* MULTI denied by an ACL: ``publish_many`` writes nothing and raises PermissionDeniedError;
  when the ACL changes after MULTI was seen accepted, the error lists the ids written.
* A frozen server (SIGSTOP): every publish path returns or raises within its timeout.
* A connection that dies after the write: PublishTimeoutError ("may have landed"), never a
  plain ConnectionLostError (which promises nothing was written).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    ConnectionLostError,
    PermissionDeniedError,
    PublishTimeoutError,
)
from agentstreams.server import LocalServer
from conftest import stream_ids

pytestmark = pytest.mark.slow

#: The timeout the frozen-server tests configure, and what a publish may take beyond it
#: (scheduling on a loaded two-core machine; the bug this guards against took 3x the timeout).
TIMEOUT_S = 0.5
SLACK_S = 0.4


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer("valkey") as local:
        yield local
        local.resume()  # a paused server would not stop


@pytest.fixture
async def admin(server: LocalServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


def _user_url(server: LocalServer) -> str:
    return f"redis://producer:secret@{server.host}:{server.port}"


# --------------------------------------------------------------------------- MULTI denied


async def test_publish_many_writes_nothing_when_multi_is_denied(
        server: LocalServer, admin: aioredis.Redis) -> None:
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "producer", "on", ">secret", "~*", "+@all", "-multi")
    async with AgentCoordinator(_user_url(server), "s") as coordinator:
        with pytest.raises(PermissionDeniedError, match="MULTI") as info:
            await coordinator.publish_many([{"type": "t", "n": n} for n in range(5)])
        assert info.value.command == "MULTI"
        assert await admin.exists("s") == 0  # the XADDs never ran outside a transaction
        # Single and concurrent publishes need no MULTI and keep working.
        assert await coordinator.publish("t", {"n": 1})
        assert len(await asyncio.gather(*(coordinator.publish("t", {"n": n})
                                          for n in range(30)))) == 30
        assert await admin.xlen("s") == 31


async def test_multi_denied_after_it_was_accepted_names_the_events_written(
        server: LocalServer, admin: aioredis.Redis) -> None:
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "producer", "on", ">secret", "~*", "+@all")
    async with AgentCoordinator(_user_url(server), "s") as coordinator:
        first = await coordinator.publish_many([{"type": "t", "n": 0}])
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "producer", "-multi")
        with pytest.raises(PermissionDeniedError) as info:
            await coordinator.publish_many([{"type": "t", "n": n} for n in range(1, 6)])
        landed = (await stream_ids(admin, "s"))[1:]
        assert len(landed) == 5
        message = str(info.value)
        assert "5 of the 5 events were written" in message
        for index, msg_id in enumerate(landed):
            assert f"#{index} -> {msg_id}" in message
        # Now the publisher checks MULTI first again: nothing more is written.
        with pytest.raises(PermissionDeniedError):
            await coordinator.publish_many([{"type": "t", "n": 9}])
        assert await stream_ids(admin, "s") == [*first, *landed]


# --------------------------------------------------------------------------- frozen server


Call = Callable[[AgentCoordinator], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "publish": lambda c: c.publish("t", {"n": 1}),
    "publish_many": lambda c: c.publish_many([{"type": "t", "n": n} for n in range(50)]),
    "idempotent": lambda c: c.publish("t", {"n": 1}, idempotency_key="k"),
    "concurrent": lambda c: asyncio.gather(*(c.publish("t", {"n": n}) for n in range(64))),
}


@pytest.mark.parametrize("path", list(CALLS))
async def test_a_publish_to_a_frozen_server_is_bounded_by_its_timeout(
        server: LocalServer, path: str) -> None:
    async with AgentCoordinator(server.url, "s", socket_timeout_s=TIMEOUT_S) as coordinator:
        await CALLS[path](coordinator)  # connected (and the script loaded)
        await CALLS[path](coordinator)
        server.pause()
        started = time.monotonic()
        with pytest.raises(PublishTimeoutError, match="may or may not have been written"):
            await CALLS[path](coordinator)
        elapsed = time.monotonic() - started
        server.resume()
        assert elapsed < TIMEOUT_S + SLACK_S, f"{path} took {elapsed:.2f}s"
        await CALLS[path](coordinator)  # and it works again


@pytest.mark.parametrize("path", list(CALLS))
async def test_connecting_to_a_frozen_server_is_bounded_and_writes_nothing(
        server: LocalServer, path: str) -> None:
    """The TCP connect succeeds (the kernel accepts) but the handshake gets no answer:
    nothing was written, so the error is a plain ConnectionLostError."""
    coordinator = AgentCoordinator(server.url, "s", socket_timeout_s=TIMEOUT_S)
    try:
        await coordinator.initialize()  # no connection yet: initialize has nothing to do
        server.pause()
        started = time.monotonic()
        with pytest.raises(ConnectionLostError) as info:
            await CALLS[path](coordinator)
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, PublishTimeoutError), info.value
        assert elapsed < TIMEOUT_S + SLACK_S, f"{path} took {elapsed:.2f}s"
    finally:
        server.resume()
        await coordinator.close()


# --------------------------------------------------------------------------- dies after write


@pytest.mark.parametrize("path", list(CALLS))
async def test_a_connection_lost_after_the_write_may_have_landed(
        server: LocalServer, path: str) -> None:
    async with AgentCoordinator(server.url, "s", socket_timeout_s=5) as coordinator:
        await CALLS[path](coordinator)
        server.pause()
        call = asyncio.ensure_future(CALLS[path](coordinator))
        await asyncio.sleep(0.2)  # written: the server holds it unread
        assert not call.done()
        server.kill()  # the connection closes with the request sent
        with pytest.raises(PublishTimeoutError, match="may or may not have been written"):
            await asyncio.wait_for(call, 5)
        server.start()

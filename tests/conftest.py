"""Real servers for the test suite: an embedded Valkey 9 and the machine's Redis 7.

Every test that takes ``redis_url`` runs against each server (and Valkey over RESP3). Redis 7
is found at ``$REDIS_URL`` or 127.0.0.1:6379; when neither answers, those tests are skipped
with the reason shown.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams._coordinator import AgentCoordinator
from agentstreams.server import LocalServer, answers_ping

REDIS7_DEFAULT = "redis://127.0.0.1:6379"


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[LocalServer]:
    """One embedded Valkey for the whole session."""
    server = LocalServer("valkey", unix_socket=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis7_url() -> str:
    """URL of the Redis 7 server every run also covers (skips when none is reachable)."""
    url = os.environ.get("REDIS_URL", REDIS7_DEFAULT)
    if not answers_ping(url):
        pytest.skip(f"no Redis 7 reachable at {url} (set REDIS_URL to cover it)")
    return url


@pytest.fixture(params=["valkey", "redis7", "valkey-resp3"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The server under test: embedded Valkey 9, Redis 7, and Valkey over RESP3."""
    if request.param == "redis7":
        return str(request.getfixturevalue("redis7_url"))
    server: LocalServer = request.getfixturevalue("valkey_server")
    return server.url + ("?protocol=3" if request.param == "valkey-resp3" else "")


@pytest.fixture
def stream_name() -> str:
    """A stream name no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(redis_url: str, stream_name: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the server under test, for checking what is really stored.

    Deletes the test's stream and its side keys afterwards.
    """
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [stream_name]
    async for key in client.scan_iter(match=f"{{{stream_name}}}*"):
        keys.append(key)
    async for key in client.scan_iter(match=f"{stream_name}*"):
        keys.append(key)
    await client.delete(*keys)
    await client.aclose()


async def wait_for(condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0,
                   interval_s: float = 0.02, message: str = "condition") -> None:
    """Poll an async condition until it holds or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {message}")


# --------------------------------------------------------------------------- shared helpers


def with_query(url: str, query: str) -> str:
    """``url`` with one more query parameter (``client_name=x``)."""
    return url + ("&" if "?" in url else "?") + query


def reference_fields(data: dict[str, Any]) -> dict[bytes, bytes]:
    """Fields exactly as the reference implementation writes them: dicts and lists as JSON,
    ints and floats with ``str()`` (so a bool becomes ``"True"``), None values dropped."""
    out: dict[bytes, bytes] = {}
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            text = json.dumps(value)
        elif isinstance(value, int | float):
            text = str(value)
        else:
            text = value
        out[key.encode()] = text.encode()
    return out


def assert_same(received: Any, sent: Any, path: str = "$") -> None:
    """Equality that also checks types all the way down (``1 == 1.0 == True`` is not enough)."""
    assert type(received) is type(sent), f"{path}: {type(received)} != {type(sent)}"
    if isinstance(sent, dict):
        assert set(received) == set(sent), path
        for key in sent:
            assert_same(received[key], sent[key], f"{path}.{key}")
    elif isinstance(sent, list):
        assert len(received) == len(sent), path
        for index, (a, b) in enumerate(zip(received, sent, strict=True)):
            assert_same(a, b, f"{path}[{index}]")
    else:
        assert received == sent, path


@pytest.fixture
async def make_coordinator(
    redis_url: str, stream_name: str, raw: aioredis.Redis,
) -> AsyncIterator[Callable[..., AgentCoordinator]]:
    """Build coordinators on the server under test (``stream_name`` unless told otherwise);
    all are closed at the end, before ``raw`` deletes the test's keys."""
    made: list[AgentCoordinator] = []

    def make(**kwargs: Any) -> AgentCoordinator:
        kwargs.setdefault("redis_url", redis_url)
        kwargs.setdefault("stream_name", stream_name)
        coordinator = AgentCoordinator(**kwargs)
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        await coordinator.close()


# Typed views of what is really stored (redis-py's own annotations are too loose for mypy).


async def stream_entries(raw: aioredis.Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry of ``stream`` as (id, raw fields)."""
    reply: Any = await raw.xrange(stream)
    return [(msg_id.decode(), dict(fields)) for msg_id, fields in reply or []]


async def stream_ids(raw: aioredis.Redis, stream: str) -> list[str]:
    """Every id of ``stream``, oldest first."""
    return [msg_id for msg_id, _ in await stream_entries(raw, stream)]


async def pending_rows(raw: aioredis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    """The group's pending entries: ``message_id``, ``consumer`` (str), ``time_since_delivered``,
    ``times_delivered`` (int)."""
    rows: Any = await raw.xpending_range(stream, group, min="-", max="+", count=100_000)
    return [{"message_id": r["message_id"].decode(), "consumer": r["consumer"].decode(),
             "time_since_delivered": int(r["time_since_delivered"]),
             "times_delivered": int(r["times_delivered"])} for r in rows]


async def xadd_raw(raw: aioredis.Redis, stream: str, fields: dict[bytes, bytes]) -> str:
    """XADD ``fields`` exactly as given (another client's writes); returns the id."""
    msg_id: Any = await raw.xadd(stream, fields)  # type: ignore[arg-type]
    return str(msg_id.decode())


async def clients_named(raw: aioredis.Redis, name: str) -> list[dict[str, str]]:
    """CLIENT LIST entries of the connections that set this client name."""
    clients: Any = await raw.client_list()
    return [c for c in clients if c.get("name") == name]


async def kill_clients_named(raw: aioredis.Redis, name: str) -> int:
    """Close the connections that set this client name, and only those (the server may be
    shared: never kill what the test did not create). Returns how many were killed."""
    killed = 0
    for info in await clients_named(raw, name):
        killed += int(await raw.client_kill_filter(_id=info["id"]))
    return killed

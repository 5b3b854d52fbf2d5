"""A password in a URL never leaks from the library: not in exceptions (message, repr, notes,
causes), not in any log record at any level, whatever fails (wrong password, server gone, bad
URL). The CLI, the exporter and the demo have their own tests (test_cli*.py, test_metrics.py)."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Iterator

import pytest
import redis

from agentstreams import (
    AgentCoordinator,
    AgentStreamsError,
    AuthenticationError,
    ConnectionLostError,
    Event,
    InvalidArgumentError,
    Worker,
)
from agentstreams.server import LocalServer
from conftest import wait_for

pytestmark = pytest.mark.slow

SECRET = f"s3cret-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def protected() -> Iterator[LocalServer]:
    """A server that wants ``SECRET`` (set after start-up: the start-up check pings without)."""
    server = LocalServer("valkey").start()
    admin = redis.Redis(host=server.host, port=server.port)
    admin.config_set("requirepass", SECRET)
    admin.close()
    yield server
    server.stop()


def _everything(exc: BaseException) -> str:
    """Every text an exception can show: its traceback with causes, notes and reprs."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.__cause__)


def _assert_clean(text: str) -> None:
    assert SECRET not in text, text


async def test_wrong_password_leaks_nowhere(protected: LocalServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = f"redis://default:{SECRET}x@127.0.0.1:{protected.port}"
    query = f"redis://127.0.0.1:{protected.port}?password={SECRET}x"
    for url in (wrong, query):
        worker = Worker(url, "s", "g", probe_server=False)

        @worker.handler()
        async def handle(event: Event) -> None:
            pass

        with pytest.raises(AuthenticationError) as caught:
            await worker.start()
        _assert_clean(_everything(caught.value))
        coordinator = AgentCoordinator(url, "s", "g")
        with pytest.raises(AuthenticationError) as caught_again:
            await coordinator.initialize()
        _assert_clean(_everything(caught_again.value))
        await coordinator.close()
    _assert_clean(caplog.text)
    _assert_clean(repr([r.__dict__ for r in caplog.records]))


async def test_a_lost_server_leaks_nowhere(protected: LocalServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The right password, then the server dies under a worker and a publisher: reconnect
    logs and publish errors name the server, never the password."""
    caplog.set_level(logging.DEBUG)
    url = f"redis://default:{SECRET}@127.0.0.1:{protected.port}"
    stream = f"secrets-{uuid.uuid4().hex[:8]}"
    worker = Worker(url, stream, "g", probe_server=False, block_ms=100)
    seen: list[str] = []

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event.msg_id)

    coordinator = AgentCoordinator(url, stream, socket_timeout_s=1)
    async with worker:
        await coordinator.publish("t", {})

        async def handled() -> bool:
            return len(seen) == 1

        await wait_for(handled, message="one event handled")
        protected.kill()

        async def reconnecting() -> bool:
            return worker.stats.reconnects >= 1

        await wait_for(reconnecting, message="the worker noticing the server is gone")
        with pytest.raises(ConnectionLostError) as caught:
            await asyncio.wait_for(coordinator.publish("t", {}), 5)
        _assert_clean(_everything(caught.value))
        await worker.stop(timeout_s=0.5)
    await coordinator.close()
    _assert_clean(caplog.text)
    _assert_clean(repr([r.__dict__ for r in caplog.records]))


async def test_a_bad_url_is_redacted_in_the_error() -> None:
    for url in (f"redis://u:{SECRET}@host:notaport", f"http://u:{SECRET}@host:6379",
                f"redis://host:6379?password={SECRET}&db=notanumber"):
        with pytest.raises((InvalidArgumentError, AgentStreamsError)) as caught:
            await _initialize(url)
        _assert_clean(_everything(caught.value))


async def _initialize(url: str) -> None:
    coordinator = AgentCoordinator(url, "s")
    try:
        await coordinator.initialize()
    finally:
        await coordinator.close()

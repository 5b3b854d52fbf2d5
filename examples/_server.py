"""Where the examples connect: ``$REDIS_URL``, else a throwaway embedded Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from agentstreams.server import LocalServer


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """Yield a server URL; start (and afterwards stop) an embedded Valkey when none is set."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with LocalServer("valkey") as server:
        yield server.url


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for ``condition()`` to hold, checking every 20 ms, failing after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)

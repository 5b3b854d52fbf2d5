"""Running a long-lived service until it is told to stop (stop(), SIGTERM or SIGINT)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable

__all__ = ["serve_until_stopped"]


async def serve_until_stopped(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    stop_requested: asyncio.Event,
    *,
    install_signal_handlers: bool = True,
    force_stop: Callable[[], None] | None = None,
) -> None:
    """``start()``, wait for ``stop_requested`` (set by SIGTERM/SIGINT too), then ``stop()``.

    A second SIGTERM/SIGINT while stopping calls ``force_stop`` (stop waiting for running work
    now). Signal handlers are installed only in the main thread, and removed afterwards, so a
    service embedded in a larger application does not take its signals over for good.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal() -> None:
        if stop_requested.is_set() and force_stop is not None:
            force_stop()
        stop_requested.set()

    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
    try:
        await start()
        await stop_requested.wait()
    finally:
        await stop()
        for sig in installed:
            loop.remove_signal_handler(sig)

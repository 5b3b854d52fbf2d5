"""``agentstreams metrics``: a Prometheus exporter of lag, pending and lengths for a server.

It consumes nothing: every scrape reads XINFO GROUPS / XPENDING / XLEN of the streams named
with ``--stream`` (or of every stream found on the server) and answers with gauges. A server
that is down is reported as ``agentstreams_up 0``, not as a failed scrape.
"""

from __future__ import annotations

import sys
import threading
from typing import Annotated

import typer

from agentstreams._connection import redact_url
from agentstreams._constants import DEFAULT_INSPECT_MAX_STREAMS, DEFAULT_REDIS_URL
from agentstreams.cli._common import ExitCode
from agentstreams.errors import AgentStreamsError

__all__ = ["metrics"]


def metrics(
    port: Annotated[int, typer.Option(
        "--port", min=0, max=65535,
        help="Port of the /metrics endpoint (0 picks a free one and prints it).")],
    addr: Annotated[str, typer.Option(
        "--addr", help="Address to bind; 0.0.0.0 lets other hosts scrape.")] = "127.0.0.1",
    redis_url: Annotated[str, typer.Option(
        "--redis-url", envvar="REDIS_URL", show_envvar=True,
        help="Server to report on: redis://, rediss:// or unix:// URL.")] = DEFAULT_REDIS_URL,
    streams: Annotated[list[str] | None, typer.Option(
        "--stream", help="Stream to report (repeatable). Default: every stream on the server.")
    ] = None,
    max_streams: Annotated[int, typer.Option(
        "--max-streams", min=1,
        help="Without --stream: report at most this many streams (the first by name).")
    ] = DEFAULT_INSPECT_MAX_STREAMS,
    duration_s: Annotated[float | None, typer.Option(
        "--duration-s", min=0.0,
        help="Stop after this many seconds (default: serve until Ctrl-C).")] = None,
) -> None:
    """Serve consumer lag, pending entries and stream lengths of a server for Prometheus."""
    try:
        from prometheus_client import CollectorRegistry

        from agentstreams.metrics import StreamStatsCollector, serve_metrics
    except ImportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(ExitCode.FAILURE)) from exc
    registry = CollectorRegistry()
    try:
        collector = StreamStatsCollector(redis_url, streams or None, max_streams=max_streams)
    except AgentStreamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from exc
    registry.register(collector)
    try:
        server = serve_metrics(port, addr, registry)
    except OSError as exc:
        collector.close()
        typer.echo(f"error: cannot listen on {addr}:{port} ({exc})", err=True)
        raise typer.Exit(int(ExitCode.FAILURE)) from exc
    what = ", ".join(streams) if streams else "every stream"
    # The URL line is the one output a script waits for (``--port 0`` prints the real port).
    sys.stdout.write(f"serving {server.url} ({what} on {redact_url(redis_url)})\n")
    sys.stdout.flush()
    finished = threading.Event()
    try:
        finished.wait(duration_s)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        collector.close()

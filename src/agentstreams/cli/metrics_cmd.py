"""``agentstreams metrics``: a Prometheus exporter of lag, pending and lengths for a server.

It consumes nothing: every scrape reads XINFO GROUPS / XPENDING / XLEN of the streams named
with ``--stream`` (or of every stream found on the server) and answers with gauges. A server
that is down is reported as ``agentstreams_up 0``, not as a failed scrape.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Annotated, Any

import typer

from agentstreams._connection import create_client, redact_url
from agentstreams._constants import DEFAULT_INSPECT_MAX_STREAMS, DEFAULT_REDIS_URL
from agentstreams._inspect import inspect_server
from agentstreams.cli._common import ExitCode, emit_json, usage_error
from agentstreams.errors import AgentStreamsError

__all__ = ["metrics"]


def _matching(base: type[Any], match: str | None) -> type[Any]:
    """The collector class, reporting only streams whose name matches ``match`` (a glob, as
    ``info --match``) when given."""
    if match is None:
        return base

    class MatchingCollector(base):  # type: ignore[misc]
        async def _scrape(self) -> Any:
            client = create_client(self._settings)
            try:
                async with asyncio.timeout(self.scrape_timeout_s):
                    return await inspect_server(client, match=match,
                                                max_streams=self.max_streams)
            finally:
                await client.aclose()

    return MatchingCollector


def _scrape_json(collector: Any) -> dict[str, Any]:
    """One scrape as JSON: {metric name: [{"labels": {...}, "value": v}, ...]}."""
    result: dict[str, Any] = {}
    for family in collector.collect():
        result[family.name] = [{"labels": dict(sample.labels), "value": sample.value}
                               for sample in family.samples]
    return result


def metrics(
    port: Annotated[int | None, typer.Option(
        "--port", min=0, max=65535,
        help="Port of the /metrics endpoint (0 picks a free one and prints it). Required "
             "unless --json.")] = None,
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
    match: Annotated[str | None, typer.Option(
        "--match", help="Without --stream: only streams whose name matches this glob.")
    ] = None,
    duration_s: Annotated[float | None, typer.Option(
        "--duration-s", min=0.0,
        help="Stop after this many seconds (default: serve until Ctrl-C).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Scrape once, print the metrics as JSON and exit (no server; exit 3 "
                       "when the server cannot be read).")] = False,
) -> None:
    """Serve consumer lag, pending entries and stream lengths of a server for Prometheus."""
    if streams and match is not None:
        usage_error("give either --stream or --match, not both", as_json)
    if port is None and not as_json:
        usage_error("--port is required (or --json to print one scrape)", as_json)
    try:
        from prometheus_client import CollectorRegistry

        from agentstreams.metrics import StreamStatsCollector, serve_metrics
    except ImportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(ExitCode.FAILURE)) from exc
    registry = CollectorRegistry()
    try:
        collector = _matching(StreamStatsCollector, match)(redis_url, streams or None,
                                                           max_streams=max_streams)
    except AgentStreamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from exc
    if as_json:
        scrape = _scrape_json(collector)
        emit_json({"redis_url": redact_url(redis_url), "metrics": scrape})
        up = scrape.get(f"{collector.namespace}_up") or [{"value": 0}]
        raise typer.Exit(int(ExitCode.OK) if up[0]["value"] else int(ExitCode.UNREACHABLE))
    assert port is not None
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

"""The Typer application every command module registers itself on."""

from __future__ import annotations

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the agentstreams CLI needs its extra: pip install 'agentstreams[cli]'") \
        from exc

app = typer.Typer(
    name="agentstreams",
    help="Inspect, tail and repair agentstreams streams; run the demo and the benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """agentstreams: reliable coordination for AI agents over Redis Streams."""

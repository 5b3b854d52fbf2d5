"""The ``agentstreams`` command line: every command registered here, in the order ``--help``
lists them. Command modules define plain functions and never see the application."""

from __future__ import annotations

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the agentstreams CLI needs its extra: pip install 'agentstreams[cli]'") \
        from exc

from agentstreams.cli._common import with_tls_options as tls
from agentstreams.cli.acl import acl_command
from agentstreams.cli.bench import bench
from agentstreams.cli.deadletters import (
    list_command,
    purge_command,
    replay_command,
    show_command,
)
from agentstreams.cli.demo import demo
from agentstreams.cli.inspect import claim, info, pending, trim_command
from agentstreams.cli.metrics_cmd import metrics
from agentstreams.cli.tail import tail_command

__all__ = ["app", "main"]

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


app.command("info")(tls(info))
app.command("pending")(tls(pending))
app.command("claim")(tls(claim))
app.command("trim")(tls(trim_command))
app.command("tail")(tls(tail_command))
app.command("metrics")(tls(metrics))
app.command("acl")(acl_command)
app.command("bench")(tls(bench))
app.command("demo")(tls(demo))

dlq_app = typer.Typer(name="dlq", no_args_is_help=True,
                      help="Dead letters: list, show, replay or purge them.")
dlq_app.command("list")(tls(list_command))
dlq_app.command("show")(tls(show_command))
dlq_app.command("replay")(tls(replay_command))
dlq_app.command("purge")(tls(purge_command))
app.add_typer(dlq_app, name="dlq")


def main() -> None:
    """Run the CLI."""
    app()


if __name__ == "__main__":
    main()

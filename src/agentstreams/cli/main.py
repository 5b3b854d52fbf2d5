"""The ``agentstreams`` command line: every command registered here, in the order ``--help``
lists them. Command modules define plain functions and never see the application."""

from __future__ import annotations

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the agentstreams CLI needs its extra: pip install 'agentstreams[cli]'") \
        from exc

import functools
from collections.abc import Callable
from typing import Annotated, Any

from typer.core import TyperOption

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
from agentstreams.cli.worker_cmd import worker_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentstreams",
    help="Inspect, tail and repair agentstreams streams; run the demo and the benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import platform

        import redis

        from agentstreams import __version__

        typer.echo(f"agentstreams {__version__} (redis-py {redis.__version__}, Python "
                   f"{platform.python_version()})")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """agentstreams: reliable coordination for AI agents over Redis Streams."""


_Display = Callable[[Any, Any], str | None]


def _no_type_for_flags(display: _Display) -> _Display:
    """Typer's help shows a type for every option, ``<bool>`` for a flag that takes no value;
    a flag's type column stays empty."""

    @functools.wraps(display)
    def wrapper(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        return display(self, ctx)

    return wrapper


TyperOption.display_type_rich = _no_type_for_flags(  # type: ignore[method-assign,assignment]
    TyperOption.display_type_rich)


app.command("info")(tls(info))
app.command("pending")(tls(pending))
app.command("claim")(tls(claim))
app.command("trim")(tls(trim_command))
app.command("tail")(tls(tail_command))
app.command("metrics")(tls(metrics))
app.command("worker")(worker_command)
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

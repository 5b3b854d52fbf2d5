"""``agentstreams demo``: three agents in three processes hand tasks along a chain, live."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from agentstreams.cli.app import app
from agentstreams.demo.display import JsonDisplay, RichDisplay
from agentstreams.demo.runner import DemoConfig, DemoDisplay, run
from agentstreams.errors import AgentStreamsError

#: Exit code when the demo ran but something did not complete.
EXIT_FAILED = 1
#: Exit code when the demo could not run at all (bad options, no server).
EXIT_ERROR = 2


@app.command()
def demo(
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="REDIS_URL", show_envvar=True,
        help="Server to use. Default: start an embedded Valkey on a free port.")] = None,
    tasks: Annotated[int, typer.Option(
        "--tasks", min=1, max=10_000, help="How many tasks to hand through the chain.")] = 3,
    stream: Annotated[str | None, typer.Option(
        "--stream", help="Stream name. Default: a fresh demo:<hex>, deleted afterwards "
                         "on an external server unless --keep.")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the generated stream on an external server (to inspect it).")
    ] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="JSON lines: the header, one object per event, then the summary.")
    ] = False,
    plain: Annotated[bool, typer.Option(
        "--plain", help="No colour or animation (for logs; automatic when not a terminal).")
    ] = False,
    pace: Annotated[float, typer.Option(
        "--pace", min=0.0, help="Multiplier of the agents' simulated work time "
                                "(0 = as fast as possible).")] = 1.0,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds the whole run may take before it counts as failed.")
    ] = 60.0,
) -> None:
    """Three agents in separate processes hand tasks along a chain, shown live.

    planner → researcher → writer: one OS process and one consumer group each.
    """
    if json_output and plain:
        raise typer.BadParameter("choose one of --json and --plain")
    try:
        config = DemoConfig(tasks=tasks, stream=stream, pace=pace, timeout_s=timeout, keep=keep)
    except AgentStreamsError as exc:
        raise typer.BadParameter(str(exc)) from exc
    display: DemoDisplay = JsonDisplay() if json_output else RichDisplay(plain=plain)
    try:
        summary = run(config, display, url=redis_url)
    except AgentStreamsError as exc:
        display.close()
        Console(stderr=True, highlight=False).print(f"demo could not run: {exc}", markup=False,
                                                  soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from exc
    finally:
        display.close()
    if not summary.ok:
        raise typer.Exit(EXIT_FAILED)

"""``agentstreams demo``: OpenAI Agents SDK agents in separate processes, a kill -9, live."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from agentstreams.errors import AgentStreamsError

#: Exit code when the demo ran but something did not complete.
EXIT_FAILED = 1
#: Exit code when the demo could not run at all (bad options, no server, no SDK, no key).
EXIT_ERROR = 2


def _fail(message: str) -> typer.Exit:
    Console(stderr=True, highlight=False).print(f"demo could not run: {message}", markup=False,
                                              soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


def demo(
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="REDIS_URL", show_envvar=True,
        help="Server to use. Default: start an embedded Valkey on a free port.")] = None,
    tasks: Annotated[int, typer.Option(
        "--tasks", min=1, max=10_000, help="How many sessions to send through the chain.")] = 3,
    namespace: Annotated[str | None, typer.Option(
        "--namespace", help="Key namespace. Default: a fresh demo-<hex>, deleted afterwards "
                            "on a given server unless --keep.")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the generated namespace's keys on a given server (to inspect "
                       "them with agentstreams info/tail).")] = False,
    kill: Annotated[bool, typer.Option(
        "--kill/--no-kill", help="kill -9 a research worker inside its first search; the "
                                 "other replica takes the hop over.")] = True,
    live_model: Annotated[bool, typer.Option(
        "--live-model", help="Use the SDK's default OpenAI model (needs OPENAI_API_KEY). "
                             "Default: a scripted offline model, no network.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="JSON lines: the header, one object per event, then the summary.")
    ] = False,
    plain: Annotated[bool, typer.Option(
        "--plain", help="One line per event, no colour or live view (for logs; automatic "
                        "when not a terminal).")] = False,
    pace: Annotated[float, typer.Option(
        "--pace", min=0.0, help="Multiplier of the search tool's time (0.8 s).")] = 1.0,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds the sessions may take (counted from when every "
                                   "worker is ready) before the run counts as failed.")
    ] = 60.0,
    startup_timeout: Annotated[float, typer.Option(
        "--startup-timeout", min=1.0, help="Seconds the worker processes may take to start.")
    ] = 120.0,
) -> None:
    """triage → research → writer: SDK agents in separate worker processes, shown live.

    Four processes (research twice) on a real server; one research worker is killed mid-run
    and the other takes its hop over. Exit code 0 when every session completed exactly once
    and nothing was lost, 1 when not, 2 when the demo could not run.
    """
    if json_output and plain:
        raise typer.BadParameter("choose one of --json and --plain")
    if live_model and not os.environ.get("OPENAI_API_KEY"):
        raise _fail("--live-model needs OPENAI_API_KEY in the environment (without "
                    "--live-model the demo runs offline on a scripted model)")
    try:
        from agentstreams.demo.display import make_display
        from agentstreams.demo.runner import DemoConfig, run
    except ImportError as exc:
        raise _fail(f"{exc} (the demo needs the OpenAI Agents SDK: "
                    "pip install 'agentstreams[cli,agents]')") from exc
    try:
        config = DemoConfig(tasks=tasks, namespace=namespace, pace=pace, timeout_s=timeout,
                            keep=keep, kill=kill, live_model=live_model,
                            startup_timeout_s=startup_timeout)
    except AgentStreamsError as exc:
        raise typer.BadParameter(str(exc)) from exc
    display = make_display(json_output=json_output, plain=plain)
    try:
        summary = run(config, display, url=redis_url)
    except AgentStreamsError as exc:
        display.close()
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        # Ctrl-C before the run could take it over (connecting, starting the server).
        display.close()
        Console(stderr=True, highlight=False).print(
            f"interrupted (Ctrl-C) before the demo started; {tasks} session"
            f"{'' if tasks == 1 else 's'} never started", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        display.close()
    if not summary.ok:
        raise typer.Exit(EXIT_FAILED)

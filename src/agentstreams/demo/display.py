"""How the demo looks: a colourful live log on a terminal, plain text in a log file, or JSON lines.

Only this module (and the CLI) writes to the terminal, always through a ``rich`` Console.
"""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Console
from rich.status import Status
from rich.table import Table
from rich.text import Text

from agentstreams.demo.agent import READY_EVENT, STOP_EVENT
from agentstreams.demo.timeline import DemoSummary, TimelineEntry, percentile
from agentstreams.events import EventType

__all__ = ["JsonDisplay", "RichDisplay"]

_STYLES = {
    EventType.HANDOFF_READY.value: "bold magenta",
    EventType.AGENT_STARTED.value: "cyan",
    EventType.TOOL_RESULT.value: "yellow",
    EventType.AGENT_COMPLETED.value: "green",
    EventType.STATE_CHANGED.value: "bold green",
    EventType.ERROR.value: "bold red",
    READY_EVENT: "dim",
    STOP_EVENT: "dim",
}

#: Column widths of a timeline row (type and actor names are short and known).
_SESSION_W = 7
_TYPE_W = 18
_ACTOR_W = 22


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


class RichDisplay:
    """Timeline rows as log lines and a summary table; ``plain`` drops colour and animation.

    A log of lines (rather than a redrawn table) reads the same on a terminal and in a CI log.
    """

    def __init__(self, console: Console | None = None, *, plain: bool = False) -> None:
        if console is None:
            console = (Console(no_color=True, highlight=False, emoji=False, width=120,
                               force_terminal=False, force_interactive=False)
                       if plain else Console(highlight=False))
        self.console = console
        self.plain = plain
        self._status: Status | None = None

    def header(self, info: dict[str, Any]) -> None:
        """Stream, server and the chain of agents."""
        chain = " → ".join(info["chain"])
        tasks = f"{info['tasks']} task{'s' if info['tasks'] != 1 else ''}"
        self.console.print(Text.assemble(("agentstreams demo", "bold"),
                                         f": {tasks} through {chain}"))
        self.console.print(f"  server  {info['server']}", markup=False)
        self.console.print(f"  stream  {info['stream']}  (run {info['run_id']})", markup=False)
        for name, description in info["roles"].items():
            self.console.print(f"  {name:<10}  own process, consumer group {name!r}: "
                               f"{description}", markup=False)
        self.console.print()
        self.console.print(Text(f"{'time':>8}  {'session':<{_SESSION_W}}  {'event':<{_TYPE_W}}"
                                f"{'agent / from → to':<{_ACTOR_W}}  detail", style="bold"))

    def event(self, entry: TimelineEntry) -> None:
        """One row: offset, session, event type, actor, detail."""
        style = _STYLES.get(entry.type, "")
        row = Text(f"{entry.offset_s:>7.3f}s  {entry.session:<{_SESSION_W}}  ")
        row.append(f"{entry.type:<{_TYPE_W}}", style=style)
        row.append(f"{entry.actor:<{_ACTOR_W}}  ", style="bold" if style else "")
        row.append(entry.detail, style="dim" if entry.type != "state_changed" else "")
        if self.console.is_terminal:  # one screen line a row; a log keeps the whole row
            self.console.print(row, no_wrap=True, overflow="ellipsis")
        else:
            self.console.print(row, soft_wrap=True)

    def progress(self, text: str) -> None:
        """A spinner line on an interactive terminal; nothing in plain output."""
        if self.plain or not self.console.is_interactive:
            return
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def close(self) -> None:
        """Stop the spinner (safe to call twice; the CLI calls it even after an error)."""
        if self._status is not None:
            self._status.stop()
            self._status = None

    def summary(self, summary: DemoSummary, agent_logs: dict[str, str]) -> None:
        """The closing table, the failure (if any) and the stderr of failed agents."""
        self.close()
        self.console.print()
        self.console.print(Text("summary", style="bold"))
        table = Table(show_header=False, box=box.ASCII if self.plain else box.ROUNDED)
        table.add_column("what", style="bold")
        table.add_column("value")
        table.add_row("sessions completed",
                      f"{summary.sessions_completed}/{summary.sessions_started}")
        table.add_row("lost", str(summary.lost))
        table.add_row("events", str(sum(summary.events_by_type.values())))
        for kind, count in sorted(summary.events_by_type.items()):
            table.add_row(f"  {kind}", str(count), style="dim")
        table.add_row("handoffs", str(summary.handoffs))
        table.add_row("duplicates", str(summary.duplicates))
        table.add_row("dead letters", "-" if summary.dead_letters is None
                      else str(summary.dead_letters))
        table.add_row("tokens (simulated)", str(summary.tokens_used))
        table.add_row("wall time", "-" if summary.wall_s is None
                      else f"{summary.wall_s:.3f} s  (tasks published → last completed)")
        table.add_row("handoff delivery p50 / p99",
                      f"{_ms(percentile(summary.delivery_ms, 50))} / "
                      f"{_ms(percentile(summary.delivery_ms, 99))}  (publish → observer)")
        table.add_row("handoff to pickup p50 / p99",
                      f"{_ms(percentile(summary.pickup_ms, 50))} / "
                      f"{_ms(percentile(summary.pickup_ms, 99))}  "
                      "(handoff → agent_started, queueing included)")
        table.add_row("agents exited", ", ".join(
            f"{name} " + ("ok" if code == 0 else "terminated" if code is None
                          else f"exit code {code}")
            for name, code in summary.agent_exit_codes.items()) or "-")
        self.console.print(table)
        for name, log in agent_logs.items():
            self.console.print(Text(f"stderr of agent {name}:", style="bold red"))
            self.console.print(log, markup=False, highlight=False)
        if summary.ok:
            self.console.print(Text("OK: every task completed, nothing lost", style="bold green"))
        else:
            reason = summary.problem
            self.console.print(Text(f"FAILED: {reason}", style="bold red"))


class JsonDisplay:
    """JSON lines: ``{"header": ...}``, one object per event, then ``{"summary": ...}``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def _line(self, obj: dict[str, Any]) -> None:
        self.console.out(json.dumps(obj, ensure_ascii=False), highlight=False)

    def header(self, info: dict[str, Any]) -> None:
        """The run's parameters."""
        self._line({"header": info})

    def event(self, entry: TimelineEntry) -> None:
        """One event."""
        self._line({"event": entry.to_dict()})

    def progress(self, text: str) -> None:
        """Progress is not part of the JSON output."""

    def summary(self, summary: DemoSummary, agent_logs: dict[str, str]) -> None:
        """The closing numbers (and the stderr of failed agents)."""
        self._line({"summary": {**summary.to_dict(), "agent_logs": agent_logs}})

    def close(self) -> None:
        """Nothing to release."""

"""How the demo looks: a live terminal view, plain log lines, or JSON lines.

Only this module (and the CLI) writes to the terminal, always through a ``rich`` Console.
On a terminal the view is a live table of the sessions (status, hop, agent, worker, delivery)
above a scrolling event log; ``--plain`` (or output that is not a terminal) prints one line
per event instead, and the sessions table once at the end.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from agentstreams.demo.timeline import (
    DemoSummary,
    DemoTracker,
    SessionView,
    TimelineEntry,
    percentile,
)

__all__ = ["JsonDisplay", "LiveDisplay", "make_display"]

_TONES = {
    "handoff": "magenta",
    "kill": "bold white on red",
    "recovery": "bold yellow",
    "done": "bold green",
    "error": "bold red",
}
_STATUS_STYLES = {
    "waiting": "dim",
    "offered": "cyan",
    "claimed": "blue",
    "searching": "yellow",
    "orphaned": "bold red",
    "completed": "bold green",
    "failed": "bold red",
}
#: Rows of the scrolling event log in the live view.
LOG_ROWS = 14
#: Column widths of a timeline row.
_SESSION_W = 3
_KIND_W = 14
_AGENT_W = 16
_WORKER_W = 10


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _row(entry: TimelineEntry, *, colour: bool) -> Text:
    style = _TONES.get(entry.tone, "") if colour else ""
    text = Text(f"{entry.offset_s:>7.3f}s  {entry.session:<{_SESSION_W}}  ")
    text.append(f"{entry.kind:<{_KIND_W}}", style=style or ("bold" if colour else ""))
    text.append(f"  {entry.agent:<{_AGENT_W}}{entry.worker:<{_WORKER_W}}  ")
    text.append(entry.detail, style=style if entry.tone else ("dim" if colour else ""))
    return text


def _timeline_heading() -> Text:
    return Text(f"{'time':>8}  {'s':<{_SESSION_W}}  {'event':<{_KIND_W}}  {'agent':<{_AGENT_W}}"
                f"{'worker':<{_WORKER_W}}  detail", style="bold")


def sessions_table(sessions: list[SessionView], *, plain: bool, now: float | None = None
                   ) -> Table:
    """One row per session: status, current hop and agent, worker, delivery, workers so far."""
    table = Table(box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=plain)
    for name in ("session", "status", "hop", "agent", "worker", "delivery", "time"):
        table.add_column(name, no_wrap=True)
    table.add_column("hops (worker of each)", overflow="ellipsis")
    for s in sessions:
        status_style = "" if plain else _STATUS_STYLES.get(s.status, "")
        end = s.answered_at if s.answered_at is not None else now
        elapsed = "" if s.submitted_at is None or end is None \
            else f"{end - s.submitted_at:5.2f}s"
        table.add_row(s.label, Text(s.status, style=status_style),
                      str(s.hop) if s.hop >= 0 else "-", s.agent or "-", s.worker or "-",
                      str(s.delivery) if s.delivery else "-", elapsed, s.chain)
    return table


def summary_table(summary: DemoSummary, *, plain: bool) -> Table:
    """The closing numbers."""
    table = Table(show_header=False, box=box.ASCII if plain else box.ROUNDED)
    table.add_column("what", style="" if plain else "bold", no_wrap=True)
    table.add_column("value")
    notes = [f"{summary.sessions_failed} failed"] if summary.sessions_failed else []
    if summary.never_started:
        notes.append(f"{summary.never_started} never started")
    table.add_row("sessions completed",
                  f"{summary.sessions_completed}/{summary.sessions_planned}"
                  + (f"  ({', '.join(notes)})" if notes else ""))
    table.add_row("handoffs", str(summary.handoffs))
    table.add_row("redeliveries", str(summary.redeliveries))
    table.add_row("duplicates seen by the caller", str(summary.duplicates))
    table.add_row("lost", str(summary.lost))
    kill = summary.kill
    if kill is not None:
        held = ", ".join(kill.held) if kill.held else "no hop"
        taken = f"; {kill.reclaim_text()}" if kill.reclaims else ""
        table.add_row("killed", f"{kill.worker} (pid {kill.pid}) holding {held}{taken}")
    table.add_row("wall time", "-" if summary.wall_s is None
                  else f"{summary.wall_s:.3f} s  (first request → last answer)")
    table.add_row("handoff latency p50 / p99",
                  f"{_ms(percentile(summary.handoff_ms, 50))} / "
                  f"{_ms(percentile(summary.handoff_ms, 99))}  (offered → claimed)")
    table.add_row("dead letters", "-" if summary.dead_letters is None
                  else str(summary.dead_letters))
    table.add_row("events observed", str(sum(summary.events_by_type.values())))
    table.add_row("model", f"{summary.model}, {summary.tokens} tokens")
    table.add_row("workers", ", ".join(f"{name} {how}"
                                       for name, how in summary.worker_exits.items()))
    if summary.sample_answer:
        table.add_row("answer of s1", summary.sample_answer)
    return table


class LiveDisplay:
    """The terminal view: a live sessions table and event log, or plain lines.

    ``plain`` (or a console that is not a terminal) prints each event as a line instead of the
    live view: it reads the same in a CI log.
    """

    def __init__(self, console: Console | None = None, *, plain: bool = False) -> None:
        if console is None:
            console = (Console(no_color=True, highlight=False, emoji=False, width=120,
                               force_terminal=False, force_interactive=False)
                       if plain else Console(highlight=False))
        self.console = console
        self.plain = plain
        self.live_view = not plain and console.is_terminal
        self._tracker: DemoTracker | None = None
        self._log: deque[TimelineEntry] = deque(maxlen=LOG_ROWS)
        self._status = ""
        self._live: Live | None = None
        self._now = 0.0

    def header(self, info: dict[str, Any], tracker: DemoTracker) -> None:
        """The run's parameters and its cast of workers."""
        self._tracker = tracker
        sessions = f"{info['sessions']} session{'s' if info['sessions'] != 1 else ''}"
        self.console.print(Text.assemble(("agentstreams demo", "bold"),
                                         f": {sessions} through {' → '.join(info['chain'])}"))
        for label, key in (("server", "server"), ("namespace", "namespace"),
                           ("model", "model"), ("recovery", "recovery")):
            self.console.print(f"  {label:<10} {info[key]}", markup=False)
        for name, agent in info["workers"].items():
            self.console.print(f"  {name:<10} own process, AgentWorker hosting {agent!r}",
                               markup=False)
        self.console.print()
        if not self.live_view:
            self.console.print(_timeline_heading())

    def event(self, entry: TimelineEntry) -> None:
        """One observed event: a line, or a row of the scrolling log."""
        self._now = max(self._now, entry.offset_s)
        if not self.live_view:
            self.console.print(_row(entry, colour=not self.plain), soft_wrap=True)
            return
        self._log.append(entry)
        self._refresh()

    def progress(self, text: str) -> None:
        """What the run waits for now (live view only)."""
        self._status = text
        if self.live_view and self._tracker is not None:
            self._refresh()

    def _render(self) -> RenderableType:
        tracker = self._tracker
        parts: list[RenderableType] = []
        if tracker is not None:
            parts.append(sessions_table(list(tracker.sessions.values()), plain=False,
                                        now=time.time()))
            workers = Text("workers: ", style="bold")
            for worker in tracker.workers.values():
                style = {"ready": "green", "killed": "bold white on red",
                         "stopped": "dim"}.get(worker.state, "yellow")
                workers.append(f" {worker.name} ", style=style)
                workers.append(" ")
            parts.append(workers)
            kill = tracker.summary.kill
            if kill is not None:
                line = Text("kill -9 ", style="bold red")
                line.append(f"{kill.worker} at {kill.at - tracker.started_at:.3f}s holding "
                            f"{', '.join(kill.held) or 'no hop'}")
                if kill.reclaims:
                    line.append(f"  →  {kill.reclaim_text()}", style="bold yellow")
                parts.append(line)
        log = Table.grid()
        log.add_column(no_wrap=True, overflow="ellipsis")
        log.add_row(_timeline_heading())
        for entry in self._log:
            log.add_row(_row(entry, colour=True))
        parts.append(Panel(log, title="events", title_align="left", box=box.ROUNDED))
        if self._status:
            parts.append(Text(f"… {self._status}", style="dim"))
        return Group(*parts)

    def _refresh(self) -> None:
        if self._live is None:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8,
                              transient=False, get_renderable=self._render)
            self._live.start()
        else:
            self._live.refresh()

    def close(self) -> None:
        """Stop the live view, leaving its last frame (safe to call twice)."""
        if self._live is not None:
            self._status = ""
            self._live.refresh()
            self._live.stop()
            self._live = None

    def summary(self, summary: DemoSummary, worker_logs: dict[str, str]) -> None:
        """The sessions (plain output), the closing table, the failure and failed workers'
        stderr."""
        self.close()
        self.console.print()
        if not self.live_view:
            self.console.print(Text("sessions", style="bold"))
            self.console.print(sessions_table(summary.sessions, plain=self.plain))
        self.console.print(Text("summary", style="bold"))
        self.console.print(summary_table(summary, plain=self.plain))
        for name, tail in worker_logs.items():
            self.console.print(Text(f"stderr of {name}:", style="bold"))
            self.console.print(tail, markup=False, highlight=False)
        problem = summary.problem
        if summary.interrupted:
            self.console.print(Text(f"INTERRUPTED: {problem}", style="" if self.plain
                                    else "bold yellow"), markup=False)
        elif problem is None:
            self.console.print(Text("OK: every session completed exactly once, nothing lost",
                                    style="" if self.plain else "bold green"))
        else:
            self.console.print(Text(f"FAILED: {problem}", style="" if self.plain
                                    else "bold red"), markup=False)


class JsonDisplay:
    """JSON lines: ``{"header": …}``, one ``{"event": …}`` per event, ``{"summary": …}``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def _line(self, obj: dict[str, Any]) -> None:
        self.console.out(json.dumps(obj, ensure_ascii=False), highlight=False)

    def header(self, info: dict[str, Any], tracker: DemoTracker) -> None:
        """The run's parameters."""
        self._line({"header": info})

    def event(self, entry: TimelineEntry) -> None:
        """One event."""
        self._line({"event": entry.to_dict()})

    def progress(self, text: str) -> None:
        """Progress is not part of the JSON output."""

    def summary(self, summary: DemoSummary, worker_logs: dict[str, str]) -> None:
        """The closing numbers (and the stderr of failed workers)."""
        self._line({"summary": {**summary.to_dict(), "worker_logs": worker_logs}})

    def close(self) -> None:
        """Nothing to release."""


def make_display(*, json_output: bool, plain: bool) -> LiveDisplay | JsonDisplay:
    """The display the CLI options ask for."""
    return JsonDisplay() if json_output else LiveDisplay(plain=plain)

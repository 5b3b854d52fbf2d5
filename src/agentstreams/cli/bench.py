"""``agentstreams bench``: measure agentstreams against raw redis-py on your own server.

A short version of ``benchmarks/run.py``: the same scenarios (``agentstreams._bench``), fewer
events. Without ``--redis-url`` (or REDIS_URL) it starts an embedded Valkey on a free port.
Every key it writes is unique to the run and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any

import typer
from rich.table import Table

from agentstreams._bench import (
    BenchConfig,
    ServerReport,
    machine_description,
    quiet_logs,
    run_suite,
)
from agentstreams._connection import redact_url
from agentstreams.cli._common import JsonOption, emit_json, err, out

__all__ = ["bench", "render_report", "report_document"]

GROUPS = ("publish", "batch", "consume", "latency", "memory")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_report(report: ServerReport) -> Table:
    """One table for one server: events/s, ratio to its baseline, latency, RSS, target."""
    table = Table(title=f"{report.server} {report.version}", title_justify="left")
    for column, justify in (("scenario", "left"), ("events/s", "right"), ("ratio", "right"),
                            ("vs", "left"), ("p50 ms", "right"), ("p99 ms", "right"),
                            ("peak RSS MB", "right"), ("target", "left"), ("met", "center")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.results:
        met = "" if row.met is None else ("[green]yes[/]" if row.met else "[red]no[/]")
        ratio = row.ratio
        if row.name.startswith("latency_worker_") and row.extra.get("p50_ratio") is not None:
            ratio_text = f"p50 {row.extra['p50_ratio']:.2f}x / p99 {ratio:.2f}x"
        elif row.name == "memory_slow_handler":
            ratio_text = f"RSS {row.extra['rss_growth']:+.1%}"
        else:
            ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        table.add_row(row.name, _num(row.events_per_s, 0), ratio_text, row.baseline or "",
                      _num(row.p50_ms, 3), _num(row.p99_ms, 3), _num(row.peak_rss_mb, 1),
                      row.target or "", met)
    return table


def report_document(reports: list[ServerReport], mode: str) -> dict[str, Any]:
    """The JSON written by ``--json`` and by ``benchmarks/run.py``."""
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "config": BenchConfig.named(mode).__repr__(),
        "machine": machine_description(),
        "servers": [report.as_dict() for report in reports],
    }


def bench(
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="REDIS_URL", show_envvar=True,
        help="Server to measure (default: an embedded Valkey started for the run).")] = None,
    mode: Annotated[str, typer.Option(
        help="How long: tiny (seconds), quick (about a minute), standard, full (5-minute "
             "memory soak).")] = "quick",
    only: Annotated[list[str] | None, typer.Option(
        help=f"Run only these groups: {', '.join(GROUPS)} (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure publish, consume, latency and memory against raw redis-py on one server."""
    try:
        cfg = BenchConfig.named(mode)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mode") from exc
    for group in only or []:
        if group not in GROUPS:
            raise typer.BadParameter(f"unknown group {group!r}; use {', '.join(GROUPS)}",
                                     param_hint="--only")
    server = None
    if redis_url is None:
        from agentstreams.server import LocalServer

        server = LocalServer("valkey").start()
        url, name = server.url, "embedded valkey"
    else:
        url, name = redis_url, redact_url(redis_url)

    def progress(group: str) -> None:
        if not as_json:
            err.print(f"[dim]running {group} scenarios on {name}...[/]")

    try:
        with quiet_logs():
            report = asyncio.run(run_suite(url, name, cfg, only=set(only) if only else None,
                                           progress=progress))
    finally:
        if server is not None:
            server.stop()
    report.url = redact_url(report.url)
    if as_json:
        emit_json(report_document([report], mode))
        return
    out.print(render_report(report))

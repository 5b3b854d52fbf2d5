"""Run the benchmark suite: one table per server, JSON in ``benchmarks/results/``.

    make bench                       # standard run (a few minutes per server)
    .venv/bin/python benchmarks/run.py --mode quick
    .venv/bin/python benchmarks/run.py --mode full   # includes the 5-minute memory soak

Servers: an embedded Valkey started here on a free port, and Redis 7 at ``--redis7-url``
(default ``redis://127.0.0.1:6379``) when it answers. Keys are unique to the run and deleted.
The scenarios live in ``agentstreams._bench`` (``agentstreams bench`` runs the same ones).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

from rich.console import Console

from agentstreams._bench import BenchConfig, ServerReport, quiet_logs, run_suite
from agentstreams.cli.bench import GROUPS, render_report, report_document
from agentstreams.server import LocalServer, answers_ping

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REDIS7_URL = "redis://127.0.0.1:6379"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="standard", choices=["tiny", "quick", "standard", "full"])
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode",
                        help="same as --mode quick")
    parser.add_argument("--full", action="store_const", const="full", dest="mode",
                        help="same as --mode full (5-minute memory soak)")
    parser.add_argument("--only", action="append", choices=GROUPS,
                        help="run only these scenario groups (repeatable)")
    parser.add_argument("--redis7-url", default=REDIS7_URL)
    parser.add_argument("--no-redis7", action="store_true", help="skip the Redis 7 server")
    parser.add_argument("--no-write", action="store_true", help="do not write results JSON")
    return parser.parse_args(argv)


async def run_all(args: argparse.Namespace, console: Console) -> list[ServerReport]:
    """The suite on the embedded Valkey, then on Redis 7 when reachable."""
    cfg = BenchConfig.named(args.mode)
    only = set(args.only) if args.only else None
    reports: list[ServerReport] = []

    def progress(server: str) -> object:
        return lambda group: console.print(f"[dim]{server}: {group} scenarios...[/]")

    with LocalServer("valkey") as valkey:
        reports.append(await run_suite(valkey.url, "embedded valkey", cfg, only=only,
                                       progress=progress("valkey")))  # type: ignore[arg-type]
    console.print(render_report(reports[-1]))
    if not args.no_redis7:
        if answers_ping(args.redis7_url):
            reports.append(await run_suite(args.redis7_url, "redis", cfg, only=only,
                                           progress=progress("redis")))  # type: ignore[arg-type]
            console.print(render_report(reports[-1]))
        else:
            console.print(f"[yellow]no Redis at {args.redis7_url}: skipped[/]")
    return reports


def main(argv: list[str] | None = None) -> int:
    """Run, print the tables, write ``results/<time>.json`` and ``results/latest.json``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(width=max(Console().width, 160))
    with quiet_logs():
        reports = asyncio.run(run_all(args, console))
    document = report_document(reports, args.mode)
    if not args.no_write:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        text = json.dumps(document, indent=2, default=str) + "\n"
        (RESULTS_DIR / f"{stamp}-{args.mode}.json").write_text(text)
        (RESULTS_DIR / "latest.json").write_text(text)
        console.print(f"[dim]results: {RESULTS_DIR / 'latest.json'}[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Print a results JSON (default ``results/latest.json``) as Markdown tables, one per server.

    .venv/bin/python benchmarks/tables.py [results/<run>.json | -]     (- reads stdin)

The README's and this folder's "recent run" tables are pasted from this output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LATEST = Path(__file__).resolve().parent / "results" / "latest.json"
X = "\u00d7"  # the multiplication sign of the ratios
COLUMNS = "| scenario | events/s | ratio | vs | p50 ms | p99 ms | peak RSS MB | target | met |"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(row: dict[str, Any]) -> str:
    extra = row.get("extra") or {}
    if row["name"].startswith("latency_worker_") and extra.get("p50_ratio") is not None:
        return f"p50 {extra['p50_ratio']:.2f}{X} / p99 {row['ratio']:.2f}{X}"
    if row["name"] == "memory_slow_handler" and "rss_growth" in extra:
        return f"RSS {extra['rss_growth']:+.1%}"
    return "-" if row["ratio"] is None else f"{row['ratio']:.2f}{X}"


def markdown(document: dict[str, Any]) -> str:
    """One Markdown table per server of a results document."""
    out: list[str] = []
    for server in document["servers"]:
        out += [f"**{server['server']} {server['version']}**", "", COLUMNS,
                "|---|---:|---:|---|---:|---:|---:|---|:-:|"]
        for row in server["results"]:
            met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
            out.append(
                f"| `{row['name']}` | {_num(row['events_per_s'], 0)} | {_ratio(row)} "
                f"| {row['baseline'] or ''} | {_num(row['p50_ms'], 3)} "
                f"| {_num(row['p99_ms'], 3)} | {_num(row['peak_rss_mb'], 1)} "
                f"| {row['target'] or ''} | {met} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """Print the tables of the file named in ``argv`` (or of the latest run)."""
    if argv and argv[0] == "-":
        text = sys.stdin.read()
    else:
        text = (Path(argv[0]) if argv else LATEST).read_text()
    print(markdown(json.loads(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

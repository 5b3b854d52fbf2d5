"""``agentstreams demo`` (being written)."""

from __future__ import annotations

from agentstreams.cli.app import app


@app.command()
def demo() -> None:
    """Run the demo."""
    raise SystemExit("the demo is not written yet")

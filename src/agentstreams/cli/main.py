"""Entry point of the ``agentstreams`` console script: imports every command module."""

from __future__ import annotations

# Each module registers its commands on ``app`` when imported.
import agentstreams.cli.inspect  # noqa: F401
import agentstreams.cli.metrics_cmd as _metrics_cmd  # noqa: F401
from agentstreams.cli import bench as _bench  # noqa: F401
from agentstreams.cli import demo  # noqa: F401
from agentstreams.cli.app import app


def main() -> None:
    """Run the CLI."""
    app()


if __name__ == "__main__":
    main()

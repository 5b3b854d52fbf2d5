"""Every example under examples/ runs to completion against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentstreams.server import LocalServer

EXAMPLES = Path(__file__).parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))

#: What each example must print to prove it did its job (examples not listed: exit 0 and output).
EXPECTED = {
    "coordinator_basics.py": ["session='123'", "pending 0"],
    "worker.py": ["handled ['s0', 's1', 's2']", "rejected (missing input)",
                  "max_deliveries (ValueError"],
    "dead_letters.py": ["replayed 3 dead letters", "succeeded after replay: [0, 1, 2]",
                        "dead letters left: 0"],
    "idempotent_publish.py": ["same: True", "entries in the stream: 1"],
    "retention.py": ["safe trim to 10: removed 30, 70 left", "forced trim to 10: removed 60"],
    "hooks_only.py": ["hook stats: {'published': 6, 'failed': 0, 'skipped': 0}", "tool_result"],
    "distributed_agents.py": ["last agent:   writer", "status:       completed"],
    "metrics.py": ["agentstreams_events_acknowledged_total", "} 4.0",
                   'agentstreams_events_dead_lettered_total{group="planners",'
                   'reason="max_deliveries"', "agentstreams_consumer_group_pending"],
    "tracing.py": ["one trace: True, handler is the child: True"],
    "request_reply.py": ["sum: 6", "sums: [0, 2, 4, 6, 8]", "timed out after 0.5s",
                         "echo: HELLO", "'replies': 1"],
}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_runs(script: Path, valkey_server: LocalServer) -> None:
    env = {**os.environ, "REDIS_URL": valkey_server.url, "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
    for expected in EXPECTED.get(script.name, []):
        assert expected in result.stdout, result.stdout

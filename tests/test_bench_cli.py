"""``agentstreams bench`` runs every scenario against a given server and reports them as JSON.

Only that the scenarios ran and their counts are right is checked here: speeds depend on the
machine and are never asserted (the numbers are for ``make bench`` to print and compare).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from agentstreams._bench import BenchConfig
from agentstreams.server import LocalServer

AGENTSTREAMS = str(Path(sys.executable).with_name("agentstreams"))
TABLES = Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py"

EXPECTED = {
    "redis_py_xadd", "reference_publish", "publish", "publish_signed",
    "redis_py_pipeline", "publish_many", "publish_concurrent", "publish_many_signed",
    "publish_concurrent_signed",
    "redis_py_consume", "reference_subscribe", "worker_consume", "worker_consume_signed",
    "latency_redis_py_0.5k", "latency_worker_0.5k",
    "memory_slow_handler",
}


def test_bench_tiny_runs_every_scenario_and_cleans_up(valkey_server: LocalServer) -> None:
    before = set(redis.Redis.from_url(valkey_server.url).keys("agentstreams-bench:*"))
    result = subprocess.run(
        [AGENTSTREAMS, "bench", "--mode", "tiny", "--json", "--redis-url", valkey_server.url],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "REDIS_URL": ""},
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mode"] == "tiny"
    assert document["machine"]["cpus"] >= 1
    (server,) = document["servers"]
    rows = {row["name"]: row for row in server["results"]}
    assert set(rows) == EXPECTED
    cfg = BenchConfig.named("tiny")
    for name in ("redis_py_xadd", "reference_publish", "publish"):
        assert rows[name]["events"] == cfg.sequential_events
    for name in ("redis_py_pipeline", "publish_many", "publish_concurrent"):
        assert rows[name]["events"] == cfg.batched_events
    for name in ("redis_py_consume", "reference_subscribe", "worker_consume"):
        assert rows[name]["events"] == cfg.consume_events
    for name in ("latency_redis_py_0.5k", "latency_worker_0.5k"):
        assert rows[name]["events"] == int(500 * cfg.latency_s)
        assert rows[name]["p50_ms"] is not None
        assert rows[name]["p99_ms"] >= rows[name]["p50_ms"]
    assert rows["memory_slow_handler"]["extra"]["rss_samples_mb"]
    for row in rows.values():
        assert row["events_per_s"] > 0
        assert row["peak_rss_mb"] > 0
    assert rows["publish"]["baseline"] == "redis_py_xadd"
    assert rows["worker_consume"]["baseline"] == "reference_subscribe"
    assert rows["worker_consume_signed"]["baseline"] == "worker_consume"
    # Every key the run wrote is gone.
    after = set(redis.Redis.from_url(valkey_server.url).keys("agentstreams-bench:*"))
    assert after <= before
    # benchmarks/tables.py turns the same document into the Markdown the docs show.
    tables = subprocess.run([sys.executable, str(TABLES), "-"], input=result.stdout,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    lines = tables.splitlines()
    assert lines[0] == f"**{server['server']} {server['version']}**"
    assert sum(line.startswith("| `") for line in lines) == len(EXPECTED)
    assert f"| `worker_consume` | {rows['worker_consume']['events_per_s']:,.0f} |" in tables


@pytest.mark.parametrize("args", [["--mode", "forever"], ["--only", "nothing"]])
def test_bench_rejects_unknown_options(valkey_server: LocalServer, args: list[str]) -> None:
    result = subprocess.run([AGENTSTREAMS, "bench", "--redis-url", valkey_server.url, *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2

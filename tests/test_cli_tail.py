"""``agentstreams tail``: --since (a duration or an ISO time), --until-now (history, then exit)
and --run (one agent run's events)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from agentstreams._streams import dlq_key
from agentstreams.server import LocalServer
from test_cli import cli


@pytest.fixture
async def valkey(valkey_server: LocalServer, stream_name: str) -> AsyncIterator[
        tuple[str, aioredis.Redis]]:
    client = aioredis.Redis.from_url(valkey_server.url)
    yield valkey_server.url, client
    await client.delete(stream_name, dlq_key(stream_name))
    await client.aclose()


async def _history(client: aioredis.Redis, stream: str) -> dict[str, str]:
    """Entries added 3 h, 20 min and 5 s ago (explicit ids), by label."""
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    ids = {}
    for label, ago_ms, run in (("old", 3 * 3_600_000, "r1"), ("recent", 20 * 60_000, "r2"),
                               ("fresh", 5_000, "r1")):
        ids[label] = f"{now_ms - ago_ms}-0"
        await client.xadd(stream, {"type": "step", "label": label, "run_id": run,
                                   "session_id": "s"}, id=ids[label])
    return ids


async def test_since_a_duration_until_now_prints_history_and_exits(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await _history(client, stream_name)
    started = time.monotonic()
    last_hour = await cli("tail", stream_name, "--since", "1h", "--until-now", "--json",
                          url=url)
    assert last_hour.code == 0, last_hour.err
    assert time.monotonic() - started < 20  # it did not wait for new entries
    assert [e["id"] for e in last_hour.json_lines()] == [ids["recent"], ids["fresh"]]
    last_minute = await cli("tail", stream_name, "--since", "30s", "--until-now", "--json",
                            url=url)
    assert [e["fields"]["label"] for e in last_minute.json_lines()] == ["fresh"]
    everything = await cli("tail", stream_name, "--until-now", "--json", url=url)
    assert [e["id"] for e in everything.json_lines()] == list(ids.values())


async def test_since_an_iso_time_and_run_filter(valkey: tuple[str, aioredis.Redis],
                                                stream_name: str) -> None:
    url, client = valkey
    ids = await _history(client, stream_name)
    recent_ms = int(ids["recent"].split("-")[0])
    iso = dt.datetime.fromtimestamp((recent_ms - 1000) / 1000, tz=dt.UTC).isoformat()
    result = await cli("tail", stream_name, "--since", iso, "--until-now", "--json", url=url)
    assert [e["id"] for e in result.json_lines()] == [ids["recent"], ids["fresh"]]
    run = await cli("tail", stream_name, "--run", "r1", "--until-now", url=url)
    assert run.code == 0, run.err
    shown = [line for line in run.out.splitlines() if line.strip()]
    assert len(shown) == 2, run.out
    assert "label=old" in shown[0]
    assert "label=fresh" in shown[1]


async def test_since_bad_values_are_usage_errors(valkey: tuple[str, aioredis.Redis],
                                                 stream_name: str) -> None:
    url, _client = valkey
    bad = await cli("tail", stream_name, "--since", "yesterday", url=url)
    assert bad.code == 2
    assert "--since 'yesterday'" in bad.err
    both = await cli("tail", stream_name, "--since", "1h", "--from", "0", url=url)
    assert both.code == 2
    assert "--from or --since" in both.err

"""``agentstreams._inspect``: the one reader of stream, group, consumer and dead-letter statistics,
checked on every server (RESP2 and RESP3), and checked to agree with the CLI and the collector
that render it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentstreams._connection import ConnectionSettings, Redis, create_client
from agentstreams._inspect import (
    dead_letter_owner,
    find_streams,
    inspect_server,
    inspect_stream,
    inspect_streams,
    pending_entries,
)
from agentstreams._streams import dlq_key
from agentstreams.metrics import StreamStatsCollector
from agentstreams.server import LocalServer

_SCRIPT = Path(sys.executable).with_name("agentstreams")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentstreams.cli.main"]
CLI_TIMEOUT_S = 30.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """The library's own bytes-mode client on the server under test."""
    lib_client = create_client(ConnectionSettings(url=redis_url))
    yield lib_client
    await lib_client.aclose()


async def _cli_json(*args: str, url: str) -> object:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, "--json", "--redis-url", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def _gauges(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """{stream label: value} of one gauge."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels["stream"]] = sample.value
    return found


# ------------------------------------------------------------------------------ dead letters


def test_dead_letter_keys_are_recognised() -> None:
    assert dead_letter_owner("{jobs}:dlq", set()) == "jobs"
    assert dead_letter_owner(dlq_key("a{tag}b"), set()) == "a{tag}b"
    assert dead_letter_owner("jobs:dlq", {"jobs"}) is None  # a stream that ends in :dlq
    assert dead_letter_owner("jobs", {"jobs"}) is None
    assert dead_letter_owner("{}:dlq", set()) is None


def test_a_braced_dead_letter_key_belongs_to_the_stream_that_exists() -> None:
    # `{x}:dlq` is both dlq_key("x") and dlq_key("{x}"): x wins when it exists.
    assert dlq_key("x") == dlq_key("{x}") == "{x}:dlq"
    assert dead_letter_owner("{x}:dlq", {"x", "{x}"}) == "x"
    assert dead_letter_owner("{x}:dlq", {"{x}"}) == "{x}"
    assert dead_letter_owner("{x}:dlq", set()) == "x"  # neither: the letters of a gone x


async def test_cli_collector_and_inspection_agree_on_who_owns_a_dead_letter_stream(
        valkey_server: LocalServer, stream_name: str) -> None:
    """A stream literally named ``{s}`` owns ``{s}:dlq`` when no stream ``s`` exists.

    The collector used to decide without looking at which streams exist: it also reported the
    letters under ``s`` (a stream that is gone), so a scrape counted them twice and disagreed
    with ``agentstreams info``."""
    url = valkey_server.url
    braced = f"{{{stream_name}}}"
    raw = aioredis.Redis.from_url(url)
    try:
        await raw.xadd(braced, {"type": "t"})
        await raw.xadd(dlq_key(braced), {"reason": "r"})
        await raw.xadd(dlq_key(braced), {"reason": "r"})

        cli_rows = await _cli_json("info", "--match", f"*{stream_name}*", url=url)
        assert isinstance(cli_rows, list)
        assert {(r["stream"], r["exists"], r["dead_letters"]) for r in cli_rows} == {
            (braced, True, 2)}

        lib = create_client(ConnectionSettings(url=url))
        try:
            stats = await inspect_server(lib, match=f"*{stream_name}*")
            assert [(s.name, s.dead_letters) for s in stats.rows] == [(braced, 2)]
            # Named, the same answer: `{s}` owns the letters, no stream `s` exists.
            named = await inspect_server(lib, streams=[braced])
            assert [(s.name, s.dead_letters) for s in named.rows] == [(braced, 2)]
        finally:
            await lib.aclose()

        registry = CollectorRegistry()
        registry.register(StreamStatsCollector(url, max_streams=100_000))
        dead = _gauges(registry, "agentstreams_dead_letters")
        assert dead.get(braced) == 2
        assert stream_name not in dead  # no phantom orphan
        # With a stream `s` as well, `{s}:dlq` is s's; `{s}` has none of its own.
        await raw.xadd(stream_name, {"type": "t"})
        dead = _gauges(registry, "agentstreams_dead_letters")
        assert (dead.get(stream_name), dead.get(braced)) == (2, 0)
        cli_rows = await _cli_json("info", "--match", f"*{stream_name}*", url=url)
        assert isinstance(cli_rows, list)
        assert {(r["stream"], r["dead_letters"]) for r in cli_rows} == {
            (stream_name, 2), (braced, 0)}
    finally:
        await raw.delete(braced, stream_name, dlq_key(braced))
        await raw.aclose()


async def test_letters_of_a_stream_that_is_gone_are_an_orphan_row(
        client: Redis, raw: aioredis.Redis, stream_name: str) -> None:
    gone = f"{stream_name}-gone"
    await raw.xadd(dlq_key(gone), {"reason": "r"})
    await raw.xadd(stream_name, {"type": "t"})
    try:
        stats = await inspect_server(client, match=f"*{stream_name}*")
        assert [s.name for s in stats.streams] == [stream_name]
        assert [(s.name, s.exists, s.dead_letters) for s in stats.orphans] == [(gone, False, 1)]
        # Only the dead-letter key matches: its stream exists, so it is no orphan.
        await raw.xadd(dlq_key(stream_name), {"reason": "r"})
        only_dlq = await inspect_server(client, match=f"{{{stream_name}}}*")
        assert only_dlq.rows == ()
    finally:
        await raw.delete(dlq_key(gone))


# ------------------------------------------------------------------------------ statistics


async def test_stream_group_consumer_and_pending_stats(
        client: Redis, raw: aioredis.Redis, stream_name: str) -> None:
    await raw.xgroup_create(stream_name, "busy", id="0", mkstream=True)
    await raw.xgroup_create(stream_name, "idle", id="0")
    added_ms = int(time.time() * 1000) - 5000  # explicit ids 5 s old: ages are known
    ids = [f"{added_ms}-{seq}" for seq in range(4)]
    for msg_id in ids[:3]:
        await raw.xadd(stream_name, {"type": "tool_result", "session_id": "s-1"}, id=msg_id)
    await raw.xadd(stream_name, {"garbage": b"\xff"}, id=ids[3])
    await raw.xreadgroup("busy", "c1", {stream_name: ">"}, count=2)
    await raw.xreadgroup("busy", "c2", {stream_name: ">"}, count=1)
    await raw.xadd(dlq_key(stream_name), {"reason": "x"})

    stream = await inspect_stream(client, stream_name)
    assert (stream.exists, stream.length, stream.dead_letters) == (True, 4, 1)
    assert (stream.first_entry_id, stream.last_entry_id) == (ids[0], ids[3])
    assert stream.last_entry_type == "(malformed)"
    assert stream.entries_added == 4  # every server of the suite is Redis 7+ / Valkey
    assert stream.first_entry_age_ms is not None
    assert 5000 <= stream.first_entry_age_ms < 120_000
    groups = {g.name: g for g in stream.groups}
    busy, idle = groups["busy"], groups["idle"]
    assert (busy.consumers, busy.pending, busy.lag, busy.last_delivered_id) == (2, 3, 1, ids[2])
    assert busy.oldest_pending is not None
    assert (busy.oldest_pending.id, busy.oldest_pending.consumer,
            busy.oldest_pending.deliveries) == (ids[0], "c1", 1)
    assert busy.oldest_pending.age_ms is not None
    assert busy.oldest_pending.age_ms >= 5000
    assert {c.name: c.pending for c in busy.consumer_stats} == {"c1": 2, "c2": 1}
    assert all(c.idle_ms >= 0 for c in busy.consumer_stats)
    assert (idle.pending, idle.lag, idle.oldest_pending, idle.consumer_stats) == (0, 4, None, ())

    # Without detail: the same counts, no entries and no consumer rows (what a scrape needs).
    (cheap,) = (await inspect_streams(client, [stream_name])).streams
    assert (cheap.length, cheap.dead_letters, cheap.first_entry_id) == (4, 1, None)
    assert [(g.name, g.pending, g.lag, g.consumer_stats) for g in cheap.groups] == [
        ("busy", 3, 1, ()), ("idle", 0, 4, ())]

    report = await pending_entries(client, stream_name, "busy", count=2)
    assert (report.pending, report.oldest_id, report.newest_id) == (3, ids[0], ids[2])
    assert report.consumers == {"c1": 2, "c2": 1}
    assert [(e.id, e.consumer) for e in report.entries] == [(ids[0], "c1"), (ids[1], "c1")]
    summary = report.entries[0].summary
    assert summary is not None
    assert (summary.type, summary.session_id, summary.label) == ("tool_result", "s-1",
                                                                  "tool_result")


async def test_missing_named_streams_and_other_types(
        client: Redis, raw: aioredis.Redis, stream_name: str) -> None:
    text_key = f"{stream_name}-str"
    missing = f"{stream_name}-missing"
    await raw.set(text_key, "not a stream")
    await raw.xadd(stream_name, {"type": "t"})
    stats = await inspect_server(client, streams=[stream_name, missing, text_key])
    assert [(s.name, s.exists, s.length) for s in stats.streams] == [
        (stream_name, True, 1), (missing, False, 0)]


async def test_work_per_call_is_bounded_by_max_streams(
        client: Redis, raw: aioredis.Redis, stream_name: str) -> None:
    names = [f"{stream_name}-{n}" for n in range(3)]
    for name in names:
        await raw.xadd(name, {"type": "t"})
    found = await find_streams(client, match=f"{stream_name}-*", max_streams=2)
    assert (found.streams, found.truncated) == (tuple(names[:2]), True)
    stats = await inspect_server(client, match=f"{stream_name}-*", max_streams=2)
    assert ([s.name for s in stats.streams], stats.truncated, stats.found) == (names[:2], True, 3)
    named = await inspect_server(client, streams=names, max_streams=1)
    assert ([s.name for s in named.streams], named.truncated) == (names[:1], True)
    with pytest.raises(ValueError, match="max_streams"):
        await inspect_server(client, max_streams=0)

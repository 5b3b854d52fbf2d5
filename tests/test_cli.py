"""The operator CLI, run as a real subprocess against real servers.

Each test prepares state with the library or raw commands, runs ``agentstreams ...``, and checks
both the human output (key words) and the ``--json`` output parsed back. Commands whose reply
parsing differs between RESP2 and RESP3 (info, pending) run on every server; the rest on the
embedded Valkey.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import Publisher
from agentstreams._codec import decode_entry
from agentstreams._dlq import dead_letter
from agentstreams._streams import dlq_key, to_str
from agentstreams.server import LocalServer, find_free_port

#: One CLI run must end well within this (they normally take about half a second).
CLI_TIMEOUT_S = 30.0
GROUP = "researchers"

_SCRIPT = Path(sys.executable).with_name("agentstreams")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentstreams.cli.main"]


@dataclass
class Result:
    """What one CLI run printed and how it exited."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        """stdout parsed as JSON lines."""
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def error(self) -> dict[str, Any]:
        """The JSON error object a ``--json`` run writes to stderr."""
        parsed: dict[str, Any] = json.loads(self.err.strip().splitlines()[-1])
        return parsed


def _env(env_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if env_url is not None:
        env["REDIS_URL"] = env_url
    return env


async def cli(*args: str, url: str | None, env_url: str | None = None) -> Result:
    """Run ``agentstreams *args --redis-url url`` and wait for it to end."""
    command = [*CLI, *args] + (["--redis-url", url] if url is not None else [])
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_env(env_url))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(args)} did not finish within {CLI_TIMEOUT_S}s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class Seeded:
    """Ids of what ``seed`` wrote."""

    started: str
    handoff: str
    search: str
    weather: str
    malformed: str
    dlq_id: str


async def seed(client: aioredis.Redis, stream: str) -> Seeded:
    """Five entries (one malformed), two groups, three pending entries, one dead letter.

    Group ``researchers``: researcher-1 holds started + handoff, researcher-2 holds weather,
    search was dead-lettered, the malformed entry is unread (lag 1). Group ``writers``: up to
    date, nothing pending.
    """
    publisher = Publisher(client, stream)
    started = await publisher.publish("agent_started", {
        "agent_name": "planner", "session_id": "s-42", "input_summary": "plan a trip"})
    handoff = await publisher.publish("handoff_ready", {
        "from_agent": "planner", "to_agent": "researcher", "session_id": "s-42",
        "context": {"city": "Lisbon", "days": 3}})
    search = await publisher.publish("tool_result", {
        "tool_name": "search", "session_id": "s-42", "result": {"hits": 12}})
    weather = await publisher.publish("tool_result", {
        "tool_name": "weather", "session_id": "123", "result": "sunny", "attempt": 2,
        "flag": "true"})
    malformed = to_str(await client.xadd(stream, {"garbage": b"\xff\xfe"}))
    await client.xgroup_create(stream, GROUP, id="0")
    await client.xgroup_create(stream, "writers", id="$")
    await client.xreadgroup(GROUP, "researcher-1", {stream: ">"}, count=3)
    fields = (await entries(client, stream, search, search))[0][1]
    dlq_id = await dead_letter(
        client, stream=stream, group=GROUP, consumer="researcher-1", msg_id=search,
        fields=fields, reason="max_deliveries",
        error="TimeoutError: search API did not answer in 30s", deliveries=5)
    assert dlq_id is not None
    await client.xreadgroup(GROUP, "researcher-2", {stream: ">"}, count=1)
    return Seeded(started, handoff, search, weather, malformed, dlq_id)


@pytest.fixture
async def valkey(valkey_server: LocalServer, stream_name: str) -> AsyncIterator[
        tuple[str, aioredis.Redis]]:
    """(URL, client) of the embedded Valkey; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(valkey_server.url)
    yield valkey_server.url, client
    await client.delete(stream_name, dlq_key(stream_name), f"{stream_name}:str")
    await client.aclose()


async def pending_rows(client: aioredis.Redis, stream: str) -> dict[str, tuple[str, int]]:
    """id -> (owner, deliveries) of the group's pending entries."""
    rows: Any = await client.xpending_range(stream, GROUP, min="-", max="+", count=100)
    return {to_str(r["message_id"]): (to_str(r["consumer"]), int(r["times_delivered"]))
            for r in rows}


async def entries(client: aioredis.Redis, stream: str, start: str = "-", end: str = "+",
                  count: int | None = None) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE as (id, fields) pairs."""
    rows: Any = await client.xrange(stream, min=start, max=end, count=count)
    return [(to_str(msg_id), dict(fields)) for msg_id, fields in rows]


def _delivery_state(groups: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a read through a group would change (lag is left out: new entries change it)."""
    return [(g["name"], g["consumers"], g["pending"], g["last-delivered-id"], g["entries-read"])
            for g in groups]


# ------------------------------------------------------------------------------------ info


async def test_info_lists_every_stream_with_dead_letters_folded_in(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    await seed(raw, stream_name)
    # The glob also matches `{name}:dlq`, which must not get a row of its own.
    data = (await cli("info", "--match", f"*{stream_name}*", "--json", url=redis_url)).json()
    assert [row["stream"] for row in data] == [stream_name]
    row = data[0]
    assert row["exists"] is True
    assert row["length"] == 5
    assert row["dead_letters"] == 1
    assert {g["name"]: (g["pending"], g["lag"]) for g in row["groups"]} == {
        GROUP: (3, 1), "writers": (0, 0)}
    human = await cli("info", "--match", f"*{stream_name}*", url=redis_url)
    assert human.code == 0, human.err
    assert stream_name in human.out
    assert "dead letters" in human.out
    assert dlq_key(stream_name) not in human.out


async def test_info_of_one_stream_shows_groups_pending_consumers(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    ids = await seed(raw, stream_name)
    result = await cli("info", stream_name, "--json", url=redis_url)
    assert result.code == 0, result.err
    data = result.json()
    assert data["first_entry_id"] == ids.started
    assert data["last_entry_id"] == ids.malformed
    assert data["last_entry_type"] == "(malformed)"
    assert 0 <= data["first_entry_age_ms"] < 60_000
    assert data["dead_letters"] == 1
    groups = {g["name"]: g for g in data["groups"]}
    research = groups[GROUP]
    assert research["oldest_pending_id"] == ids.started
    assert research["oldest_pending_consumer"] == "researcher-1"
    assert research["oldest_pending_deliveries"] == 1
    assert research["oldest_pending_idle_ms"] >= 0
    assert {c["name"]: c["pending"] for c in research["consumers"]} == {
        "researcher-1": 2, "researcher-2": 1}
    assert groups["writers"]["pending"] == 0
    human = await cli("info", stream_name, url=redis_url)
    assert human.code == 0, human.err
    for word in ("groups", "consumers", "researcher-1", "researcher-2", "writers", ids.started):
        assert word in human.out, human.out


async def test_info_shows_dead_letters_of_a_deleted_stream(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    await client.delete(stream_name)
    data = (await cli("info", "--match", f"*{stream_name}*", "--json", url=url)).json()
    assert len(data) == 1
    assert data[0]["stream"] == stream_name
    assert data[0]["exists"] is False
    assert data[0]["dead_letters"] == 1


# ------------------------------------------------------------------------------------ tail


async def test_tail_last_n_as_json_lines_keeps_types_and_shows_malformed(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    result = await cli("tail", stream_name, "--from", "-2", "--count", "2", "--json", url=url)
    assert result.code == 0, result.err
    weather, broken = result.json_lines()
    assert weather["id"] == ids.weather
    assert weather["type"] == "tool_result"
    assert weather["session_id"] == "123"  # a string that looks like a number stays a string
    assert weather["fields"]["attempt"] == 2
    assert weather["fields"]["flag"] == "true"
    assert weather["malformed"] is False
    assert broken == {**broken, "id": ids.malformed, "malformed": True}
    assert "UTF-8" in broken["reason"]


async def test_tail_human_lines_filters_and_inclusive_from_id(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    everything = await cli("tail", stream_name, "--from", ids.started, "--count", "5", url=url)
    assert everything.code == 0, everything.err
    lines = everything.out.splitlines()
    assert len(lines) == 5
    assert ids.started in lines[0]
    assert "agent_started" in lines[0]
    assert "session=s-42" in lines[0]
    assert 'context={"city":"Lisbon","days":3}' in lines[1]
    assert "MALFORMED" in lines[4]
    filtered = await cli("tail", stream_name, "--from", ids.handoff, "--type", "tool_result",
                         "--session", "s-42", "--timeout-s", "0.5", "--json", url=url)
    assert filtered.code == 0, filtered.err
    assert [e["id"] for e in filtered.json_lines()] == [ids.search]


async def test_tail_follows_new_events_without_taking_them_from_groups(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    before_groups = await client.xinfo_groups(stream_name)
    before_pending = await pending_rows(client, stream_name)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "tail", stream_name, "--json", "--count", "2", "--timeout-s", "20",
        "--redis-url", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_env(None))
    assert proc.stderr is not None
    try:
        ready = await asyncio.wait_for(proc.stderr.readline(), CLI_TIMEOUT_S)
        assert b"following" in ready
        publisher = Publisher(client, stream_name)
        first = await publisher.publish("state_changed", {"session_id": "s-9",
                                                          "changes": {"step": 2}})
        second = await publisher.publish("agent_completed", {"session_id": "s-9"})
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["id"], e["type"]) for e in events] == [(first, "state_changed"),
                                                      (second, "agent_completed")]
    assert events[0]["fields"]["changes"] == {"step": 2}
    # Plain XREAD: no group saw a delivery, no consumer appeared.
    assert _delivery_state(await client.xinfo_groups(stream_name)) == \
        _delivery_state(before_groups)
    assert await pending_rows(client, stream_name) == before_pending


async def test_tail_stops_cleanly_on_ctrl_c(valkey: tuple[str, aioredis.Redis],
                                            stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "tail", stream_name, "--redis-url", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env(None))
    assert proc.stderr is not None
    try:
        ready = await asyncio.wait_for(proc.stderr.readline(), CLI_TIMEOUT_S)
        assert b"Ctrl-C" in ready
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert out == b""


# ------------------------------------------------------------------------------------ pending


async def test_pending_shows_owner_idle_time_and_deliveries(
        redis_url: str, raw: aioredis.Redis, stream_name: str) -> None:
    ids = await seed(raw, stream_name)
    result = await cli("pending", stream_name, GROUP, "--json", url=redis_url)
    assert result.code == 0, result.err
    data = result.json()
    assert data["pending"] == 3
    assert data["consumers"] == {"researcher-1": 2, "researcher-2": 1}
    assert [(e["id"], e["consumer"], e["deliveries"], e["type"], e["session_id"])
            for e in data["entries"]] == [
        (ids.started, "researcher-1", 1, "agent_started", "s-42"),
        (ids.handoff, "researcher-1", 1, "handoff_ready", "s-42"),
        (ids.weather, "researcher-2", 1, "tool_result", "123"),
    ]
    assert all(e["idle_ms"] >= 0 for e in data["entries"])
    human = await cli("pending", stream_name, GROUP, url=redis_url)
    assert human.code == 0, human.err
    for word in ("3 pending", "researcher-1", "handoff_ready", ids.weather):
        assert word in human.out, human.out


async def test_pending_filters_by_consumer_and_idle_time(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    mine, idle = await asyncio.gather(
        cli("pending", stream_name, GROUP, "--consumer", "researcher-2", "--json", url=url),
        cli("pending", stream_name, GROUP, "--min-idle-ms", "600000", "--json", url=url))
    assert [e["id"] for e in mine.json()["entries"]] == [ids.weather]
    assert idle.json()["entries"] == []
    assert idle.json()["pending"] == 3


# ------------------------------------------------------------------------------------ claim


async def test_claim_moves_entries_of_one_consumer_without_counting_a_delivery(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    result = await cli("claim", stream_name, GROUP, "rescuer", "--from-consumer",
                       "researcher-1", "--min-idle-ms", "0", "--json", url=url)
    assert result.code == 0, result.err
    assert result.json()["claimed"] == [ids.started, ids.handoff]
    assert await pending_rows(client, stream_name) == {
        ids.started: ("rescuer", 1), ids.handoff: ("rescuer", 1),
        ids.weather: ("researcher-2", 1)}
    human = await cli("claim", stream_name, GROUP, "other", "--id", ids.weather, url=url)
    assert human.code == 0, human.err
    assert "claimed 1 entry" in human.out
    assert (await pending_rows(client, stream_name))[ids.weather] == ("other", 1)


async def test_claim_leaves_recently_delivered_entries_alone(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    before = await pending_rows(client, stream_name)
    # Default min idle (the visibility timeout) protects live consumers' work in progress.
    auto, by_id = await asyncio.gather(
        cli("claim", stream_name, GROUP, "rescuer", "--json", url=url),
        cli("claim", stream_name, GROUP, "rescuer", "--id", ids.started, "--id", "1-1",
            "--min-idle-ms", "600000", "--json", url=url))
    assert auto.json()["claimed"] == []
    assert by_id.json()["claimed"] == []
    assert by_id.json()["skipped"] == [ids.started, "1-1"]
    assert await pending_rows(client, stream_name) == before


# ------------------------------------------------------------------------------------ dlq


async def test_dlq_list_and_show_give_the_reason_and_the_event(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    listed, shown, human_list, human_show = await asyncio.gather(
        cli("dlq", "list", stream_name, "--json", url=url),
        cli("dlq", "show", stream_name, ids.dlq_id, "--json", url=url),
        cli("dlq", "list", stream_name, url=url),
        cli("dlq", "show", stream_name, ids.dlq_id, url=url))
    data = listed.json()
    assert data["dead_letters"] == 1
    (letter,) = data["entries"]
    assert letter["dlq_id"] == ids.dlq_id
    assert letter["original_id"] == ids.search
    assert letter["reason"] == "max_deliveries"
    assert letter["error"] == "TimeoutError: search API did not answer in 30s"
    assert letter["deliveries"] == 5
    assert (letter["type"], letter["session_id"]) == ("tool_result", "s-42")
    assert shown.json()["event"]["result"] == {"hits": 12}
    for word in (ids.dlq_id, "max_deliveries", "TimeoutError", "tool_result"):
        assert word in human_list.out, human_list.out
    for word in ("search API did not answer in 30s", "researchers / researcher-1", "hits"):
        assert word in human_show.out, human_show.out


async def test_dlq_replay_one_puts_the_same_event_back(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    original = (await entries(client, stream_name, ids.search, ids.search))[0][1]
    result = await cli("dlq", "replay", stream_name, ids.dlq_id, "--json", url=url)
    assert result.code == 0, result.err
    ((dead_id, new_id),) = [(r["dlq_id"], r["new_id"]) for r in result.json()["replayed"]]
    assert dead_id == ids.dlq_id
    replayed = (await entries(client, stream_name, new_id, new_id))[0][1]
    # same fields, same event id, for the group where it died only
    assert replayed == {**original, b"_grp": GROUP.encode()}
    assert decode_entry(new_id, replayed, stream=stream_name)["result"] == {"hits": 12}
    assert await client.xlen(dlq_key(stream_name)) == 0


async def test_dlq_replay_by_filter_then_all(valkey: tuple[str, aioredis.Redis],
                                             stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    broken_id, broken_fields = (await entries(client, stream_name))[-1]
    await client.xreadgroup(GROUP, "researcher-1", {stream_name: ">"}, count=1)
    assert await dead_letter(client, stream=stream_name, group=GROUP, consumer="researcher-1",
                             msg_id=broken_id, fields=broken_fields,
                             reason="malformed", error="MalformedEventError: not UTF-8",
                             deliveries=1)
    length = await client.xlen(stream_name)
    by_reason = await cli("dlq", "replay", stream_name, "--reason", "malformed", "--json",
                          url=url)
    assert by_reason.code == 0, by_reason.err
    assert len(by_reason.json()["replayed"]) == 1
    left = (await cli("dlq", "list", stream_name, "--json", url=url)).json()["entries"]
    assert [x["reason"] for x in left] == ["max_deliveries"]
    rest = await cli("dlq", "replay", stream_name, "--all", url=url)
    assert rest.code == 0, rest.err
    assert "replayed 1 dead letter" in rest.out
    assert await client.xlen(dlq_key(stream_name)) == 0
    assert await client.xlen(stream_name) == length + 2


async def test_dlq_purge_asks_for_yes_then_deletes(valkey: tuple[str, aioredis.Redis],
                                                   stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    refused = await cli("dlq", "purge", stream_name, "--all", url=url)
    assert refused.code == 2
    assert "--yes" in refused.err
    assert await client.xlen(dlq_key(stream_name)) == 1
    other_type = await cli("dlq", "purge", stream_name, "--type", "handoff_ready", "--yes",
                           "--json", url=url)
    assert other_type.json()["purged"] == 0
    purged = await cli("dlq", "purge", stream_name, "--type", "tool_result", "--yes", "--json",
                       url=url)
    assert purged.code == 0, purged.err
    assert purged.json()["purged"] == 1
    assert await client.xlen(dlq_key(stream_name)) == 0


async def test_dlq_wrong_selection_and_unknown_ids(valkey: tuple[str, aioredis.Redis],
                                                   stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)
    nothing, both, missing_show, missing_replay = await asyncio.gather(
        cli("dlq", "replay", stream_name, url=url),
        cli("dlq", "replay", stream_name, ids.dlq_id, "--all", url=url),
        cli("dlq", "show", stream_name, "1-1", "--json", url=url),
        cli("dlq", "replay", stream_name, "1-1", "--json", url=url))
    assert (nothing.code, both.code) == (2, 2)
    assert "--all" in nothing.err
    assert missing_show.code == 4
    assert "1-1" in missing_show.error()["error"]
    assert missing_replay.code == 4
    assert missing_replay.json() == {"stream": stream_name, "replayed": [],
                                     "not_found": ["1-1"]}
    assert await client.xlen(dlq_key(stream_name)) == 1


# ------------------------------------------------------------------------------------ trim


async def test_trim_keeps_unacknowledged_entries_unless_forced(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    publisher = Publisher(client, stream_name)
    ids = await publisher.publish_many([{"type": "tick", "n": n} for n in range(10)])
    await client.xgroup_create(stream_name, GROUP, id="0")
    await client.xreadgroup(GROUP, "w", {stream_name: ">"}, count=6)
    await client.xack(stream_name, GROUP, *ids[:4])  # ids[4] and ids[5] stay pending
    safe = await cli("trim", stream_name, "--maxlen", "2", "--json", url=url)
    assert safe.code == 0, safe.err
    report = safe.json()
    assert report == {**report, "removed": 4, "length_before": 10, "length_after": 6,
                      "limited_by_groups": True, "floor_id": ids[4]}
    assert (await entries(client, stream_name, count=1))[0][0] == ids[4]
    human = await cli("trim", stream_name, "--maxlen", "2", url=url)
    assert "removed 0 entries" in human.out
    assert "--force" in human.out
    forced = await cli("trim", stream_name, "--maxlen", "2", "--force", "--yes", "--json",
                       url=url)
    assert forced.json()["length_after"] == 2
    assert await client.xlen(stream_name) == 2


# ------------------------------------------------------------------------------------ errors


async def test_unreachable_server_exits_3() -> None:
    free = f"redis://127.0.0.1:{find_free_port()}"
    human, as_json, from_env = await asyncio.gather(
        cli("info", url=free),
        cli("pending", "s", "g", "--json", url=free),
        cli("tail", "s", url=None, env_url=free))
    assert human.code == 3
    assert "cannot reach the server" in human.err
    assert "Traceback" not in human.err
    assert as_json.code == 3
    assert as_json.error()["exit_code"] == 3
    assert as_json.out == ""
    assert from_env.code == 3  # REDIS_URL is used when --redis-url is not given
    assert free in from_env.err


async def test_missing_stream_or_group_exits_4(valkey: tuple[str, aioredis.Redis],
                                               stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    missing = f"{stream_name}-missing"
    results = await asyncio.gather(
        cli("info", missing, url=url),
        cli("tail", missing, "--json", url=url),
        cli("trim", missing, "--maxlen", "1", url=url),
        cli("dlq", "list", missing, url=url),
        cli("pending", stream_name, "nobody", url=url),
        cli("claim", stream_name, "nobody", "c", "--json", url=url))
    assert [r.code for r in results] == [4] * len(results), [r.err for r in results]
    assert "does not exist" in results[0].err
    assert "nobody" in results[4].err
    assert GROUP in results[4].err  # the message lists the groups that do exist
    assert results[5].error()["exit_code"] == 4


async def test_key_of_another_type_exits_5(valkey: tuple[str, aioredis.Redis],
                                           stream_name: str) -> None:
    url, client = valkey
    key = f"{stream_name}:str"
    await client.set(key, "not a stream")
    results = await asyncio.gather(
        cli("info", key, url=url),
        cli("tail", key, url=url),
        cli("pending", key, GROUP, url=url),
        cli("trim", key, "--maxlen", "1", url=url),
        cli("dlq", "list", key, "--json", url=url))
    assert [r.code for r in results] == [5] * len(results), [r.err for r in results]
    assert "holds a string" in results[0].err
    assert results[4].error()["exit_code"] == 5


async def test_bad_usage_exits_2_before_connecting() -> None:
    # The server is unreachable: exit 2 (not 3) shows the options were rejected first.
    free = f"redis://127.0.0.1:{find_free_port()}"
    results = await asyncio.gather(
        cli("tail", "s", "--from", "yesterday", url=free),
        cli("claim", "s", "g", "c", "--id", "abc", url=free),
        cli("info", "s", "--match", "x*", url=free),
        cli("info", url="http://localhost:6379"),
        cli("trim", "s", url=free))
    assert [r.code for r in results] == [2] * len(results), [r.err for r in results]
    assert "yesterday" in results[0].err
    assert "unsupported URL" in results[3].err


# ------------------------------------------------------------------------------------ secrets

#: The password of the server ``password_server`` starts; it must never be printed.
SECRET = "s3cret-Pw-7f1d"


@pytest.fixture(scope="module")
def password_server() -> Any:
    """A Valkey of this module's own that asks for ``SECRET``."""
    import redis as sync_redis

    server = LocalServer("valkey").start()
    sync_redis.Redis.from_url(server.url).config_set("requirepass", SECRET)
    yield server
    server.stop()


async def test_credentials_in_the_url_are_never_printed(password_server: LocalServer) -> None:
    host = f"{password_server.host}:{password_server.port}"
    dead = f"127.0.0.1:{find_free_port()}"
    wrong_user, wrong_query, unreachable = await asyncio.gather(
        cli("info", url=f"redis://default:{SECRET}x@{host}"),
        cli("info", "--json", url=f"redis://{host}/0?password={SECRET}y"),
        cli("pending", "s", "g", url=f"redis://default:{SECRET}@{dead}/0?password={SECRET}"))
    # A refused password is exit 7 (authentication); an unreachable server exit 3.
    assert [r.code for r in (wrong_user, wrong_query, unreachable)] == [7, 7, 3]
    assert "refused our credentials" in wrong_user.err or "password" in wrong_user.err
    for result in (wrong_user, wrong_query, unreachable):
        assert SECRET not in result.out + result.err, result.err
        assert "***" in result.err, result.err
    # The exporter prints the URL it reports on: without the password, in either place.
    right = f"redis://default:{SECRET}@{host}/0?password={SECRET}"
    exporter = await cli("metrics", "--port", "0", "--duration-s", "0", url=right)
    assert exporter.code == 0, exporter.err
    assert "serving http://" in exporter.out
    assert f"redis://default:***@{host}/0?password=***" in exporter.out
    assert SECRET not in exporter.out + exporter.err

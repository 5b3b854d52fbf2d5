"""Operator commands, issue 15: trim names the group that holds a stream back and asks before a
forced trim deletes unacknowledged entries, purge and claim say how many and why, a service
that is not Redis exits 3, ``--version``, and help without ``<bool>``."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from agentstreams import Publisher, TrimResult
from agentstreams._connection import ConnectionSettings, create_client
from agentstreams._retention import trim, unacknowledged_cut
from agentstreams._streams import dlq_key, to_str
from agentstreams.server import LocalServer
from test_cli import CLI, CLI_TIMEOUT_S, GROUP, Result, cli, seed


@pytest.fixture
async def valkey(valkey_server: LocalServer, stream_name: str) -> AsyncIterator[
        tuple[str, aioredis.Redis]]:
    """(URL, client) of the embedded Valkey; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(valkey_server.url)
    yield valkey_server.url, client
    await client.delete(stream_name, dlq_key(stream_name))
    await client.aclose()


async def cli_tty(*args: str, url: str, answer: str) -> Result:
    """Run the CLI with a terminal as stdin and ``answer`` typed into it."""
    master, slave = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, "--redis-url", url, stdin=slave, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        os.write(master, answer.encode() + b"\n")
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def _ticks(client: aioredis.Redis, stream: str, n: int) -> list[str]:
    return await Publisher(client, stream).publish_many([{"type": "tick", "n": i}
                                                         for i in range(n)])


# ------------------------------------------------------------------------------------ trim


async def test_trim_names_the_group_that_never_read(valkey: tuple[str, aioredis.Redis],
                                                    stream_name: str) -> None:
    url, client = valkey
    await _ticks(client, stream_name, 10)
    await client.xgroup_create(stream_name, "workers", id="0")  # nobody ever reads it
    await client.xgroup_create(stream_name, "fast", id="$")
    result = await cli("trim", stream_name, "--maxlen", "2", "--json", url=url)
    assert result.code == 0, result.err
    report = result.json()
    assert report["removed"] == 0
    assert report["held_by"] == {"group": "workers", "reason": "unread", "since_id": "0-0",
                                 "age_ms": None, "kept_over_maxlen": 8}
    human = await cli("trim", stream_name, "--maxlen", "2", url=url)
    assert "kept 8 entries more than --maxlen: group 'workers' has not read anything yet" \
        in human.out, human.out


async def test_trim_names_the_group_behind_and_since_when(valkey: tuple[str, aioredis.Redis],
                                                          stream_name: str) -> None:
    url, client = valkey
    ids = await _ticks(client, stream_name, 10)
    await client.xgroup_create(stream_name, "workers", id=ids[2])  # read up to ids[2]
    await client.xgroup_create(stream_name, GROUP, id="0")
    await client.xreadgroup(GROUP, "w", {stream_name: ">"}, count=10)
    await client.xack(stream_name, GROUP, *ids[:5])  # ids[5:] stay pending in GROUP
    report = (await cli("trim", stream_name, "--maxlen", "1", "--json", url=url)).json()
    assert report["held_by"]["group"] == "workers"
    assert report["held_by"]["reason"] == "unread"
    assert report["held_by"]["since_id"] == ids[2]
    assert 0 <= report["held_by"]["age_ms"] < 60_000
    assert report["length_after"] == 7
    human = await cli("trim", stream_name, "--maxlen", "1", url=url)
    assert re.search(rf"kept 6 entries more than --maxlen: group 'workers' has not read past "
                     rf"{ids[2]} \(\d+(ms|s) ago\)", human.out), human.out
    await client.xgroup_destroy(stream_name, "workers")
    pending = (await cli("trim", stream_name, "--maxlen", "1", "--json", url=url)).json()
    assert pending["held_by"]["group"] == GROUP
    assert (pending["held_by"]["reason"], pending["held_by"]["since_id"]) == ("pending", ids[5])
    human = await cli("trim", stream_name, "--maxlen", "1", url=url)
    assert f"group '{GROUP}' has not acknowledged {ids[5]}" in human.out, human.out


async def test_trim_api_returns_the_holding_group(valkey: tuple[str, aioredis.Redis],
                                                  stream_name: str) -> None:
    url, client = valkey
    ids = await _ticks(client, stream_name, 6)
    await client.xgroup_create(stream_name, "idle", id=ids[1])
    lib = create_client(ConnectionSettings(url=url))
    try:
        result = await trim(lib, stream_name, 2, approximate=False)
        ms, seq = ids[1].split("-")
        assert result == TrimResult(2, f"{ms}-{int(seq) + 1}", True, "idle", "unread", ids[1],
                                    result.held_age_ms)
        assert result.held_age_ms is not None
        assert 0 <= result.held_age_ms < 60_000
        assert await unacknowledged_cut(lib, stream_name, 2) == 2
        unlimited = await trim(lib, stream_name, 10, approximate=False)
        assert unlimited.held_by is None
    finally:
        await lib.aclose()


async def test_forced_trim_asks_with_the_count_unless_yes(valkey: tuple[str, aioredis.Redis],
                                                          stream_name: str) -> None:
    url, client = valkey
    ids = await _ticks(client, stream_name, 10)
    await client.xgroup_create(stream_name, GROUP, id="0")
    await client.xreadgroup(GROUP, "w", {stream_name: ">"}, count=6)
    await client.xack(stream_name, GROUP, *ids[:4])  # 4, 5 pending; 6..9 unread
    refused = await cli("trim", stream_name, "--maxlen", "2", "--force", url=url)
    assert refused.code == 2
    assert "would delete 4 entries" in refused.err, refused.err
    assert "--yes" in refused.err
    assert await client.xlen(stream_name) == 10
    declined = await cli_tty("trim", stream_name, "--maxlen", "2", "--force", url=url,
                             answer="n")
    assert declined.code == 1
    assert "deletes 4 entries" in declined.out, declined.out
    assert await client.xlen(stream_name) == 10
    accepted = await cli_tty("trim", stream_name, "--maxlen", "2", "--force", "--json",
                             url=url, answer="y")
    assert accepted.code == 0, accepted.err
    assert await client.xlen(stream_name) == 2
    # Nothing unacknowledged to lose: no question.
    await client.xgroup_destroy(stream_name, GROUP)
    quiet = await cli("trim", stream_name, "--maxlen", "1", "--force", url=url)
    assert quiet.code == 0, quiet.err
    assert await client.xlen(stream_name) == 1


async def test_purge_says_how_many(valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    refused = await cli("dlq", "purge", stream_name, "--all", url=url)
    assert refused.code == 2
    assert f"purge would delete 1 dead letter of '{stream_name}' for good" in refused.err
    asked = await cli_tty("dlq", "purge", stream_name, "--type", "tool_result", url=url,
                          answer="y")
    assert asked.code == 0, asked.err
    assert f"Delete 1 dead letter of '{stream_name}' for good?" in asked.out
    assert await client.xlen(dlq_key(stream_name)) == 0
    nothing = await cli("dlq", "purge", stream_name, "--all", url=url)  # nothing to ask about
    assert nothing.code == 0, nothing.err
    assert "purged 0 dead letters" in nothing.out


# ------------------------------------------------------------------------------------ claim


async def test_claim_says_why_nothing_was_claimed(valkey: tuple[str, aioredis.Redis],
                                                  stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)  # 3 pending in GROUP, just delivered
    result = await cli("claim", stream_name, GROUP, "rescuer", url=url)
    assert result.code == 0, result.err
    assert "claimed 0 entries" in result.out
    assert "3 entries pending, all idle less than 30 s" in result.out, result.out
    assert "0 ms" not in result.out
    one = await cli("claim", stream_name, GROUP, "rescuer", "--from-consumer", "researcher-2",
                    "--json", url=url)
    assert one.json()["note"].startswith(
        "nothing to claim: 1 entry pending held by 'researcher-2', all idle less than 30 s")
    mine = await cli("claim", stream_name, GROUP, "researcher-2", "--from-consumer",
                     "researcher-2", "--min-idle-ms", "0", url=url)
    assert "all already held by 'researcher-2'" in mine.out, mine.out
    by_id = await cli("claim", stream_name, GROUP, "rescuer", "--id", "1-1", url=url)
    assert "skipped 1 (not pending in this group): 1-1" in by_id.out, by_id.out


# ------------------------------------------------------------------------------------ not Redis


@pytest.fixture
def not_redis() -> Iterator[dict[str, int]]:
    """Two TCP servers that are not Redis: one answers like HTTP, one with binary garbage."""
    ports: dict[str, int] = {}
    sockets: list[socket.socket] = []
    replies = {"http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
               "binary": b"\x00\x01\x02garbage\xff\r\n"}
    for name, reply in replies.items():
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        ports[name] = server.getsockname()[1]
        sockets.append(server)

        def serve(server: socket.socket = server, reply: bytes = reply) -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.recv(4096)
                        conn.sendall(reply)
                        conn.recv(4096)  # until the client gives up
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
    yield ports
    for server in sockets:
        server.close()


async def test_a_service_that_is_not_redis_exits_3(not_redis: dict[str, int]) -> None:
    http, binary, as_json = await asyncio.gather(
        cli("info", url=f"redis://127.0.0.1:{not_redis['http']}"),
        cli("info", url=f"redis://127.0.0.1:{not_redis['binary']}"),
        cli("pending", "s", "g", "--json", url=f"redis://127.0.0.1:{not_redis['binary']}"))
    assert http.code == 3, http.err
    assert "does not speak the Redis protocol" in http.err
    assert "HTTP" in http.err
    assert binary.code == 3, binary.err
    assert "does not speak the Redis protocol" in binary.err
    assert "Traceback" not in http.err + binary.err
    assert as_json.code == 3
    assert as_json.error()["exit_code"] == 3


# ------------------------------------------------------------------------------------ help


async def test_version_and_help_without_type_of_flags() -> None:
    version = await cli("--version", url=None)
    assert version.code == 0, version.err
    assert re.match(r"agentstreams \d+\.\d+\.\d+", version.out)
    help_text = await cli("trim", "--help", url=None)
    assert help_text.code == 0
    assert "--force" in help_text.out
    assert "<bool>" not in help_text.out
    assert "<int" in help_text.out or "INTEGER" in help_text.out or "int" in help_text.out


# ------------------------------------------------------------------------------------ pending


async def test_pending_ack_gone_acknowledges_exactly_the_deleted(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    ids = await seed(client, stream_name)  # pending: started, handoff (r-1), weather (r-2)
    await client.xdel(stream_name, ids.handoff, ids.weather)
    shown = await cli("pending", stream_name, GROUP, url=url)
    assert shown.out.count("(deleted)") == 2, shown.out
    refused = await cli("pending", stream_name, GROUP, "--ack-gone", url=url)
    assert refused.code == 2
    assert "would acknowledge 2 pending entries" in refused.err, refused.err
    assert (await client.xpending(stream_name, GROUP))["pending"] == 3
    one = await cli("pending", stream_name, GROUP, "--ack-gone", "--consumer", "researcher-2",
                    "--yes", "--json", url=url)
    assert one.code == 0, one.err
    assert one.json()["gone"] == [ids.weather]
    assert one.json()["acknowledged"] == 1
    asked = await cli_tty("pending", stream_name, GROUP, "--ack-gone", url=url, answer="y")
    assert asked.code == 0, asked.err
    assert "Acknowledge 1 pending entry in group" in asked.out, asked.out
    assert f"acknowledged 1 of 1 pending entry in group '{GROUP}'" in asked.out
    rows = await client.xpending_range(stream_name, GROUP, min="-", max="+", count=10)
    assert [to_str(r["message_id"]) for r in rows] == [ids.started]  # the live one stays
    again = await cli("pending", stream_name, GROUP, "--ack-gone", url=url)
    assert again.code == 0
    assert "has lost its stream entry" in again.out


# ------------------------------------------------------------------------------------ metrics


async def test_metrics_json_prints_one_scrape_of_the_matching_streams(
        valkey: tuple[str, aioredis.Redis], stream_name: str) -> None:
    url, client = valkey
    await seed(client, stream_name)
    other = f"{stream_name}-other"
    await client.xadd(other, {"type": "x"})
    try:
        result = await cli("metrics", "--json", "--match", f"{stream_name}*", url=url)
        assert result.code == 0, result.err
        scrape = result.json()["metrics"]
        assert scrape["agentstreams_up"] == [{"labels": {}, "value": 1.0}]
        lengths = {s["labels"]["stream"]: s["value"]
                   for s in scrape["agentstreams_stream_length"]}
        assert lengths == {stream_name: 5, other: 1}
        narrow = (await cli("metrics", "--json", "--match", other, url=url)).json()["metrics"]
        assert [s["labels"]["stream"] for s in narrow["agentstreams_stream_length"]] == [other]
        pending = {(s["labels"]["stream"], s["labels"]["group"]): s["value"]
                   for s in scrape["agentstreams_consumer_group_pending"]}
        assert pending == {(stream_name, GROUP): 3, (stream_name, "writers"): 0}
    finally:
        await client.delete(other)
    down = await cli("metrics", "--json", url="redis://127.0.0.1:1")
    assert down.code == 3
    assert down.json()["metrics"]["agentstreams_up"][0]["value"] == 0
    no_port = await cli("metrics", url=url)
    assert no_port.code == 2
    assert "--port is required" in no_port.err

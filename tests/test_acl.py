"""``agentstreams acl``: each role's rules, proven on real servers (Redis 7 and Valkey).

For every role a user is created from the generated rules on a server of this module's own;
the role's real operations run as that user and must succeed with nothing in ``ACL LOG``
(except the worker's optional CONFIG GET probe); then the user tries what the role must not
have, and every try must be denied.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from agentstreams import AgentCoordinator, Event, PermissionDeniedError, Reject, Worker
from agentstreams._acl import ROLES, acl_rules, key_patterns
from agentstreams._connection import translate_error
from agentstreams._streams import dlq_key, side_key, to_str
from agentstreams.errors import InvalidArgumentError
from agentstreams.server import LocalServer
from conftest import wait_for
from test_cli import cli

PASSWORD = "acl-test-pw-91c4"
#: Denials the library tolerates by design: redis-py's CLIENT SETINFO at connect (not granted:
#: Redis 7.0 lacks the command) and the worker's optional CONFIG GET durability probe.
TOLERATED = {"command:client|setinfo", "command:config|get"}


# ------------------------------------------------------------------------------ the rules


def test_rules_are_narrow_and_well_formed() -> None:
    for role in ROLES:
        kwargs: dict[str, Any] = ({"namespace": "ns"} if role.startswith("agent-")
                                  else {"streams": ["s1", "s2"]})
        rules = acl_rules(role, **kwargs)
        tokens = rules.split()
        assert tokens[0] == "-@all", rules
        assert "\n" not in rules
        assert not any(t.lstrip("(+").startswith("@") for t in tokens), rules  # no categories
        assert not {"allkeys", "~*", "allcommands", "+@all"} & set(tokens), rules
        for token in tokens:
            key = token.lstrip("(").rstrip(")")
            if "~" in key:
                pattern = key.split("~", 1)[1]
                assert pattern.startswith(("s1", "{s1}:", "s2", "{s2}:", "ns:", "{ns:")), token
        # (the producer's DEL is on its own reply streams {S}:replies:* only: request())
        allowed = {"operator": {"+xtrim"}, "agent-client": {"+del"},
                   "producer": {"+del"}}.get(role, set())
        for denied in {"+flushall", "+flushdb", "+config", "+keys", "+acl", "+del", "+xtrim",
                       "+unlink", "+xgroup|destroy", "+xgroup|setid"} - allowed:
            assert denied not in {t.strip("()") for t in tokens}, (role, denied)
    assert "+xreadgroup" not in acl_rules("observer", ["s"]).split()
    assert "+xreadgroup" not in acl_rules("operator", ["s"]).split()
    assert "+xreadgroup" not in acl_rules("producer", ["s"]).split()


def test_key_patterns_escape_glob_characters_and_keep_hash_tags() -> None:
    assert key_patterns("agent_events") == ("agent_events", "{agent_events}:*")
    assert key_patterns("{t1}:events") == ("{t1}:events", "{t1}:events:*")
    assert key_patterns("a*b?[c]") == ("a\\*b\\?\\[c\\]", "{a\\*b\\?\\[c\\]}:*")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown role"):
        acl_rules("admin", ["s"])
    with pytest.raises(InvalidArgumentError, match="at least one --stream"):
        acl_rules("producer", [])
    with pytest.raises(InvalidArgumentError, match="white space"):
        acl_rules("producer", ["a b"])
    with pytest.raises(InvalidArgumentError, match="--namespace"):
        acl_rules("agent-worker", ["s"])
    with pytest.raises(InvalidArgumentError, match="--publish-to"):
        acl_rules("producer", ["s"], publish_to=["t"])


# ------------------------------------------------------------------------------ servers


@dataclass
class AclServer:
    """A server of this module's own, with an admin connection and the users it made."""

    server: LocalServer
    admin: aioredis.Redis
    users: list[str] = field(default_factory=list)

    async def user(self, rules: str) -> tuple[str, str]:
        """A new user with ``rules``; returns (name, url)."""
        name = f"acl-{uuid.uuid4().hex[:10]}"
        await self.admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", name, "on", f">{PASSWORD}", *rules.split())
        self.users.append(name)
        return name, f"redis://{name}:{PASSWORD}@{self.server.host}:{self.server.port}"

    async def denials(self, user: str) -> list[str]:
        """What ``ACL LOG`` recorded as denied to ``user``: ``reason:object`` strings."""
        entries = await self.admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "LOG", "128")
        found = []
        for entry in entries:
            data = _pairs(entry)
            what = f"{data.get('reason')}:{data.get('object')}"
            if data.get("reason") == "key":  # which command: the client info ends with cmd=
                what += " (" + data.get("client-info", "").rsplit("cmd=", 1)[-1].split()[0] + ")"
            if data.get("username") == user and what not in TOLERATED:
                found.append(what)
        return found


def _pairs(entry: Any) -> dict[str, str]:
    if isinstance(entry, dict):
        items = list(entry.items())
    else:
        items = list(zip(entry[::2], entry[1::2], strict=True))
    return {_s(k): _s(v) for k, v in items}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module", params=["redis", "valkey"])
def acl_server_process(request: pytest.FixtureRequest) -> Iterator[LocalServer]:
    try:
        server = LocalServer(request.param).start()
    except Exception as exc:  # no redis-server on PATH
        pytest.skip(f"cannot start {request.param}: {exc}")
    yield server
    server.stop()


@pytest.fixture
async def acl(acl_server_process: LocalServer) -> AsyncIterator[AclServer]:
    admin = aioredis.Redis.from_url(acl_server_process.url)
    harness = AclServer(acl_server_process, admin)
    yield harness
    for user in harness.users:
        await admin.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]
    await admin.aclose()


def _stream() -> str:
    return f"acl-{uuid.uuid4().hex[:8]}"


async def _denied(url: str, *command: Any) -> bool:
    """True when the server refuses ``command`` to the user of ``url`` with NOPERM."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.execute_command(*command)  # type: ignore[no-untyped-call]
    except redis_exc.ResponseError as exc:
        # A plain NOPERM, or a denial inside a script (which does not say NOPERM; Valkey says
        # "ACL failure in script: No permissions to access a key").
        return (isinstance(translate_error(exc), PermissionDeniedError)
                or "no permissions" in str(exc).lower())
    finally:
        await client.aclose()
    return False


async def _assert_denied(url: str, *commands: tuple[Any, ...]) -> None:
    allowed = [c for c in commands if not await _denied(url, *c)]
    assert not allowed, f"allowed but must be denied: {allowed}"


# ------------------------------------------------------------------------------ producer


async def test_producer_publishes_and_nothing_else(acl: AclServer) -> None:
    stream, other = _stream(), _stream()
    user, url = await acl.user(acl_rules("producer", [stream]))
    async with AgentCoordinator(url, stream) as coordinator:
        first = await coordinator.publish("task", {"n": 1})
        ids = await coordinator.publish_many([{"type": "task", "n": i} for i in range(3)])
        again = await coordinator.publish("task", {"n": 2}, idempotency_key="k1")
        # After a script cache flush the client must load the script again (NOSCRIPT).
        await acl.admin.script_flush()
        same = await coordinator.publish("task", {"n": 2}, idempotency_key="k1")
        fresh = await coordinator.publish("task", {"n": 3}, idempotency_key="k2")
    assert same == again
    assert fresh != again
    assert await acl.admin.xlen(stream) == 1 + len(ids) + 2
    assert await acl.denials(user) == []
    await acl.admin.xgroup_create(stream, "g", id="0")
    await _assert_denied(
        url,
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", stream, ">"),
        ("XRANGE", stream, "-", "+"), ("XDEL", stream, first), ("XTRIM", stream, "MAXLEN", "0"),
        ("XACK", stream, "g", first), ("FLUSHALL",), ("CONFIG", "GET", "appendonly"),
        ("XADD", other, "*", "type", "x"), ("XADD", dlq_key(stream), "*", "type", "x"),
        ("GET", side_key(other, "idem:k1")), ("DEL", stream), ("KEYS", "*"),
        ("SET", stream, "x"), ("GET", stream), ("SET", dlq_key(stream), "x"),
        ("EVAL", "return redis.call('XADD', KEYS[1], '*', 'a', 'b')", "1", other))
    await acl.admin.delete(stream, other, side_key(stream, "idem:k1"), side_key(stream, "idem:k2"))


# ------------------------------------------------------------------------------ worker


@pytest.mark.slow
async def test_worker_consumes_retries_dead_letters_renews_and_reclaims(acl: AclServer) -> None:
    stream, other = _stream(), _stream()
    user, url = await acl.user(acl_rules("worker", [stream]))
    admin = acl.admin
    # Another consumer's abandoned entry (reclaimed), and a long-gone consumer (removed).
    await admin.xgroup_create(stream, "g", id="0", mkstream=True)
    await admin.xadd(stream, {"type": "ok", "n": "abandoned"})
    await admin.xreadgroup("g", "ghost", {stream: ">"}, count=1)
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "XGROUP", "CREATECONSUMER", stream, "g", "gone")
    attempts: dict[str, int] = {}
    handled: list[str] = []

    worker = Worker(url, stream, "g", visibility_timeout_ms=600, reclaim_interval_ms=200,
                    consumer_cleanup_idle_ms=100, retry_delay_s=0.05, retry_delay_max_s=0.1,
                    max_deliveries=3, block_ms=200)

    @worker.handler()
    async def handle(event: Event) -> None:
        kind = event.type
        attempts[event.msg_id] = attempts.get(event.msg_id, 0) + 1
        if kind == "flaky" and attempts[event.msg_id] == 1:
            raise RuntimeError("first attempt fails")
        if kind == "poison":
            raise RuntimeError("always fails")
        if kind in ("reject", "wide"):
            raise Reject("bad input")
        if kind == "slow":
            await asyncio.sleep(1.5)  # over twice the visibility timeout: leases renewed
        handled.append(kind)

    async with worker:
        for kind in ("ok", "flaky", "poison", "reject", "slow"):
            await admin.xadd(stream, {"type": kind})
        # Too many fields for the dead-letter script: dead-lettered in a MULTI/EXEC instead.
        await admin.xadd(stream, {"type": "wide", **{f"f{i}": "x" for i in range(4000)}})

        async def settled() -> bool:
            return (sorted(handled) == ["flaky", "ok", "ok", "slow"]
                    and worker.stats.dead_lettered == 3 and worker.stats.consumers_removed >= 1
                    and not (await admin.xpending(stream, "g"))["pending"])
        await wait_for(settled, timeout_s=20, message="every event handled or dead-lettered")
    stats = worker.stats
    assert stats.retried >= 1, stats
    assert stats.claimed >= 1, stats  # the ghost's entry
    assert stats.leases_renewed >= 1, stats
    assert stats.leases_lost == 0, stats
    assert stats.dead_letter_failures == 0, stats
    assert await admin.xlen(dlq_key(stream)) == 3
    assert await acl.denials(user) == []
    await _assert_denied(
        url, ("FLUSHALL",), ("XTRIM", stream, "MAXLEN", "0"), ("XDEL", stream, "0-1"),
        ("XADD", stream, "*", "type", "forged"), ("XADD", other, "*", "type", "x"),
        ("XGROUP", "CREATE", other, "g", "0", "MKSTREAM"), ("XGROUP", "DESTROY", stream, "g"),
        ("XGROUP", "SETID", stream, "g", "$"), ("DEL", stream), ("CONFIG", "SET", "save", ""),
        ("XRANGE", other, "-", "+"), ("XREADGROUP", "GROUP", "g", "c", "STREAMS", other, ">"),
        ("EVAL", "return redis.call('XADD', KEYS[1], '*', 'a', 'b')", "1", stream),
        ("EVAL", "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)", "1", stream))
    await admin.delete(stream, other, dlq_key(stream))


async def test_worker_publishes_only_to_its_publish_to_streams(acl: AclServer) -> None:
    stream, handoffs, other = _stream(), _stream(), _stream()
    user, url = await acl.user(acl_rules("worker", [stream], publish_to=[handoffs]))
    async with AgentCoordinator(url, handoffs) as producer:
        one = await producer.publish("handoff_ready", {"n": 1}, idempotency_key="h1")
        assert await producer.publish("handoff_ready", {"n": 1}, idempotency_key="h1") == one
        await producer.publish_many([{"type": "handoff_ready", "n": 2}])
    assert await acl.admin.xlen(handoffs) == 2
    assert await acl.denials(user) == []
    await acl.admin.xgroup_create(handoffs, "g", id="0")
    await _assert_denied(
        url, ("XADD", stream, "*", "type", "x"), ("XADD", other, "*", "type", "x"),
        ("XREADGROUP", "GROUP", "g", "c", "STREAMS", handoffs, ">"), ("XRANGE", handoffs, "-", "+"),
        ("XTRIM", handoffs, "MAXLEN", "0"), ("SET", handoffs, "x"))
    await acl.admin.delete(handoffs, side_key(handoffs, "idem:h1"))


# ------------------------------------------------------------------------------ observer, operator


async def _seed_for_operators(admin: aioredis.Redis, stream: str) -> list[str]:
    """Entries, a group with a dead consumer's pending entries, two dead letters; their ids."""
    await admin.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [to_str(await admin.xadd(stream, {"type": "task", "n": str(i)})) for i in range(5)]
    await admin.xreadgroup("g", "ghost", {stream: ">"}, count=3)
    from agentstreams._dlq import dead_letter
    for msg_id in ids[:2]:
        await dead_letter(admin, stream=stream, group="g", consumer="ghost", msg_id=msg_id,
                          fields={b"type": b"task"}, reason="rejected", error="bad", deliveries=1)
    return ids


async def _dlq_ids(admin: aioredis.Redis, stream: str) -> list[str]:
    entries: Any = await admin.xrange(dlq_key(stream))
    return [to_str(e[0]) for e in entries]


async def _scrape(url: str, stream: str) -> dict[str, float]:
    from agentstreams.metrics import StreamStatsCollector

    collector = StreamStatsCollector(url, [stream])
    samples = await asyncio.to_thread(lambda: [s for m in collector.collect() for s in m.samples])
    return {s.name: s.value for s in samples}


async def test_observer_reads_everything_and_changes_nothing(acl: AclServer) -> None:
    stream, other = _stream(), _stream()
    ids = await _seed_for_operators(acl.admin, stream)
    await acl.admin.xadd(other, {"type": "x"})
    user, url = await acl.user(acl_rules("observer", [stream]))
    dlq_ids = await _dlq_ids(acl.admin, stream)
    results = await asyncio.gather(
        cli("info", stream, "--json", url=url), cli("info", stream, url=url),
        cli("tail", stream, "--from", "-5", "--count", "5", "--json", url=url),
        cli("pending", stream, "g", "--json", url=url),
        cli("dlq", "list", stream, "--json", url=url),
        cli("dlq", "show", stream, dlq_ids[0], url=url))
    assert [r.code for r in results] == [0] * len(results), [r.err for r in results]
    assert results[0].json()["groups"][0]["pending"] == 1
    assert [e["id"] for e in results[2].json_lines()] == ids
    assert results[4].json()["dead_letters"] == 2
    metrics = await _scrape(url, stream)
    assert metrics["agentstreams_up"] == 1, metrics
    assert await acl.denials(user) == []
    await _assert_denied(
        url, ("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", stream, ">"),
        ("XADD", stream, "*", "type", "x"), ("XACK", stream, "g", ids[2]),
        ("XTRIM", stream, "MAXLEN", "0"), ("XCLAIM", stream, "g", "c", "0", ids[2]),
        ("XGROUP", "CREATE", stream, "g2", "0"), ("XDEL", dlq_key(stream), dlq_ids[0]),
        ("XRANGE", other, "-", "+"), ("FLUSHALL",), ("SCAN", "0"),
        ("EVAL", "return 1", "0"))
    await acl.admin.delete(stream, other, dlq_key(stream))


async def test_operator_claims_replays_purges_and_trims(acl: AclServer) -> None:
    stream, other = _stream(), _stream()
    ids = await _seed_for_operators(acl.admin, stream)
    user, url = await acl.user(acl_rules("operator", [stream]))
    info = await cli("info", stream, "--json", url=url)
    assert info.code == 0, info.err
    claim = await cli("claim", stream, "g", "c2", "--from-consumer", "ghost", "--min-idle-ms",
                      "0", "--json", url=url)
    assert claim.code == 0, claim.err
    assert claim.json()["claimed"] == [ids[2]]
    dlq_ids = await _dlq_ids(acl.admin, stream)
    replay = await cli("dlq", "replay", stream, dlq_ids[0], "--json", url=url)
    assert replay.code == 0, replay.err
    purge = await cli("dlq", "purge", stream, "--all", "--yes", "--json", url=url)
    assert purge.code == 0, purge.err
    assert await acl.admin.xlen(dlq_key(stream)) == 0
    trim = await cli("trim", stream, "--maxlen", "1", "--json", url=url)
    forced = await cli("trim", stream, "--maxlen", "1", "--force", "--yes", "--json", url=url)
    assert (trim.code, forced.code) == (0, 0), trim.err + forced.err
    assert await acl.admin.xlen(stream) == 1
    await acl.admin.script_flush()  # the replay script is loaded again after NOSCRIPT
    await acl.admin.xadd(dlq_key(stream), {"original_stream": stream, "original_id": "1-1",
                                           "group": "g", "reason": "rejected", "type": "t"})
    again = await cli("dlq", "replay", stream, "--all", url=url)
    assert again.code == 0, again.err
    assert await acl.denials(user) == []
    await _assert_denied(
        url, ("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", stream, ">"),
        ("XADD", other, "*", "type", "x"), ("XTRIM", other, "MAXLEN", "0"),
        ("XGROUP", "DESTROY", stream, "g"), ("DEL", stream), ("FLUSHALL",),
        ("CONFIG", "SET", "save", ""), ("XACK", stream, "g", ids[2]))
    await acl.admin.delete(stream, other, dlq_key(stream))


# ------------------------------------------------------------------------------ agents


@pytest.mark.slow
async def test_agent_worker_and_client_run_a_chain(acl: AclServer) -> None:
    pytest.importorskip("agents")
    from agents import set_tracing_disabled

    from agents_support.scenario import TOPIC_PREFIX, remote_agents
    from agentstreams.integrations.openai_agents import AgentClient, AgentWorker, Keys

    set_tracing_disabled(True)
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    worker_user, worker_url = await acl.user(acl_rules("agent-worker", namespace=namespace))
    client_user, client_url = await acl.user(acl_rules("agent-client", namespace=namespace))
    async with AgentWorker(list(remote_agents().values()), worker_url, namespace=namespace,
                           block_ms=200, visibility_timeout_ms=5000) as worker, \
            AgentClient(client_url, namespace=namespace) as client:
        result = await client.run("triage", TOPIC_PREFIX + "ACLs", session_id="s1",
                                  timeout_s=20)
        status = await client.status("s1")
    assert result.final_output
    assert status is not None
    assert status.done
    assert worker.stats.hops_run == 3
    assert await acl.denials(worker_user) == []
    assert await acl.denials(client_user) == []
    inbox = keys.inbox("triage")
    await _assert_denied(
        client_url, ("XREADGROUP", "GROUP", "workers", "c", "STREAMS", inbox, ">"),
        ("XRANGE", inbox, "-", "+"), ("XREAD", "STREAMS", keys.events, "0"),
        ("XADD", "agents:inbox:triage", "*", "type", "x"), ("FLUSHALL",),
        ("SET", inbox, "x"), ("SET", keys.events, "x"))
    await _assert_denied(
        worker_url, ("XTRIM", inbox, "MAXLEN", "0"), ("XDEL", inbox, "0-1"), ("FLUSHALL",),
        ("XADD", "other:inbox:triage", "*", "type", "x"), ("DEL", inbox),
        ("SET", inbox, "x"), ("SET", keys.events, "x"), ("SET", keys.replies("c1"), "x"),
        ("XREADGROUP", "GROUP", "workers", "c", "STREAMS", keys.replies("c1"), ">"))
    found = [k async for k in acl.admin.scan_iter(match=f"*{namespace}*")]
    if found:
        await acl.admin.delete(*found)


def test_the_examples_in_the_docs_are_what_the_command_prints() -> None:
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    text = (docs / "security.md").read_text() + (docs / "cli.md").read_text()
    examples = re.findall(r"\$ agentstreams acl ([^\n]+)\n([^\n]+)", text)
    assert len(examples) >= 7
    for command, printed in examples:
        role, *options = command.split()
        given: dict[str, list[str]] = {"--stream": [], "--publish-to": [], "--namespace": []}
        for option, value in zip(options[::2], options[1::2], strict=True):
            given[option].append(value)
        namespace = given["--namespace"][0] if given["--namespace"] else None
        assert acl_rules(role, given["--stream"], publish_to=given["--publish-to"],
                         namespace=namespace) == printed.strip(), command


async def test_request_reply_between_a_producer_and_a_worker(acl: AclServer) -> None:
    """A producer may request() and a worker may reply, each as its role's user: the reply
    stream and its idempotency key live under {S}:replies:, and nothing else is granted."""
    stream = _stream()
    producer, producer_url = await acl.user(acl_rules("producer", [stream]))
    worker_user, worker_url = await acl.user(acl_rules("worker", [stream]))
    worker = Worker(worker_url, stream, "g", block_ms=200, probe_server=False)

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        await event.reply({"answer": event["question"] * 2})

    async with worker, AgentCoordinator(producer_url, stream) as coordinator:
        reply = await coordinator.request("ask", {"question": 21}, timeout_s=10)
    assert reply["answer"] == 42
    assert await acl.denials(producer) == []
    assert await acl.denials(worker_user) == []
    await _assert_denied(worker_url, ("SET", side_key(stream, "replies:x"), "v"),
                         ("DEL", side_key(stream, "replies:x")))
    await _assert_denied(producer_url, ("XADD", side_key(stream, "replies:x"), "*", "a", "1"))

"""Request/reply on real servers: ``AgentCoordinator.request`` answered by a ``Worker``
handler (``event.reply``) or a ``subscribe`` loop (``coordinator.reply``); one reply per
request id; timeouts, cancellation and ``close`` clean up; late replies are ignored; forged
requests can only make a replier write under its own stream's ``replies:`` keys; with signing
keys an unsigned or forged reply never resolves a request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    ClosedError,
    Event,
    InvalidArgumentError,
    PayloadTooLargeError,
    RequestTimeoutError,
    Retry,
    Worker,
)
from agentstreams._codec import encode_event
from agentstreams._constants import DEFAULT_REPLY_TTL_S
from agentstreams._signing import SigningKeys
from agentstreams.server import LocalServer
from conftest import assert_same, stream_entries, wait_for, xadd_raw

KEYS = {"k1": b"k1-secret-0123456789abcdef-0123456789"}
OTHER_KEYS = {"k1": b"not-the-real-secret-but-just-as-long!"}

FAST: dict[str, Any] = {
    "visibility_timeout_ms": 600,
    "block_ms": 200,
    "retry_delay_s": 0.02,
    "retry_delay_max_s": 0.1,
    "probe_server": False,
    "shutdown_timeout_s": 5.0,
}


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Workers created by a test; all stopped at teardown."""
    created: list[Worker] = []
    yield created
    for worker in created:
        await worker.stop(timeout_s=2)


def make_worker(workers: list[Worker], redis_url: str, stream: str, **kwargs: Any) -> Worker:
    worker = Worker(redis_url, stream, kwargs.pop("consumer_group", "g"), **{**FAST, **kwargs})
    workers.append(worker)
    return worker


def replies_key(stream: str, caller: str) -> str:
    return f"{{{stream}}}:replies:{caller}"


async def until(condition: Callable[[], bool], message: str, timeout_s: float = 10.0) -> None:
    async def check() -> bool:
        return condition()
    await wait_for(check, timeout_s=timeout_s, message=message)


def request_fields(caller: bytes, request_id: bytes, **fields: Any) -> dict[bytes, bytes]:
    """A request entry as another client could write it (unsigned)."""
    entry = encode_event("ask", fields)
    entry[b"_rto"] = caller
    entry[b"_rid"] = request_id
    return entry


# ------------------------------------------------------------------------------ round trips


async def test_round_trip_through_a_worker_handler(
        redis_url: str, raw: aioredis.Redis, stream_name: str,
        make_coordinator: Callable[..., AgentCoordinator], workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    seen: list[Event] = []

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        seen.append(event)
        assert event.expects_reply
        await event.reply({"answer": event["q"] * 2, "echo": event["text"], "none": None,
                           "nested": {"a": ["1", 2, True]}})

    await worker.start()
    coordinator = make_coordinator(caller_id="caller-1")
    reply = await coordinator.request("ask", {"q": 21, "text": "42"}, timeout_s=10,
                                      session_id="s1")
    timestamp = reply.pop("timestamp")
    assert isinstance(timestamp, float)
    assert_same(reply, {"answer": 42, "echo": "42", "none": None,
                        "nested": {"a": ["1", 2, True]}})
    assert seen[0].session_id == "s1"
    # The request names the caller and the request, not a key; the reply's event id is the
    # request id; the reply stream expires.
    (_, request), = await stream_entries(raw, stream_name)
    assert request[b"_rto"] == b"caller-1"
    assert seen[0].event_id != request[b"_rid"].decode()
    ttl = await raw.pttl(replies_key(stream_name, "caller-1"))
    assert 0 < ttl <= DEFAULT_REPLY_TTL_S * 1000
    assert coordinator.request_stats.requests == 1
    assert coordinator.request_stats.replies == 1
    # The reader deletes what it read: the reply stream does not grow.
    await wait_for(lambda: _eq(raw.xlen(replies_key(stream_name, "caller-1")), 0),
                   message="reply entry deleted by the reader")
    await until(lambda: worker.stats.acked == 1, "the request acknowledged")


async def _eq(awaitable: Any, expected: Any) -> bool:
    return bool(await awaitable == expected)


async def test_round_trip_through_subscribe_and_coordinator_reply(
        raw: aioredis.Redis, stream_name: str,
        make_coordinator: Callable[..., AgentCoordinator]) -> None:
    caller = make_coordinator()
    replier = make_coordinator(consumer_group="answerers")
    await replier.initialize()

    async def serve() -> None:
        async for event in replier.subscribe(max_events=1, timeout_ms=10_000):
            assert event["type"] == "ask"
            assert event["_reply_to"] == caller.caller_id
            first = await replier.reply(event, {"sum": sum(event["numbers"])})
            again = await replier.reply(event, {"sum": -1})  # answered twice: one entry
            assert first == again

    server = asyncio.create_task(serve())
    reply = await caller.request("ask", {"numbers": [1, 2, 3]}, timeout_s=10)
    await asyncio.wait_for(server, 10)
    assert reply["sum"] == 6
    info: Any = await raw.xinfo_stream(replies_key(stream_name, caller.caller_id))
    assert info["entries-added"] == 1
    assert caller.request_stats.late_or_duplicate_replies == 0


async def test_many_concurrent_requests_each_get_their_own_reply(
        redis_url: str, stream_name: str,
        make_coordinator: Callable[..., AgentCoordinator], workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, concurrency=32)

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        n = event["n"]
        await asyncio.sleep((100 - n) * 0.002)  # answers arrive in reverse order
        await event.reply({"n": n, "square": n * n})

    await worker.start()
    coordinator = make_coordinator()
    replies = await asyncio.gather(*(coordinator.request("ask", {"n": n}, timeout_s=20)
                                     for n in range(100)))
    assert [(r["n"], r["square"]) for r in replies] == [(n, n * n) for n in range(100)]
    stats = coordinator.request_stats
    assert (stats.requests, stats.replies, stats.late_or_duplicate_replies) == (100, 100, 0)
    assert coordinator._requester is not None
    assert coordinator._requester.waiting == 0


# ------------------------------------------------------------------------------ timeouts


async def test_timeout_raises_and_cleans_up(
        make_coordinator: Callable[..., AgentCoordinator]) -> None:
    coordinator = make_coordinator()
    started = asyncio.get_running_loop().time()
    with pytest.raises(RequestTimeoutError) as caught:
        await coordinator.request("nobody_answers", {"x": 1}, timeout_s=0.3)
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.3 <= elapsed < 3
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.timeout_s == 0.3
    assert len(caught.value.request_id) == 32
    assert coordinator.request_stats.timeouts == 1
    assert coordinator._requester is not None
    assert coordinator._requester.waiting == 0
    # A cancelled request is cleaned up too.
    task = asyncio.create_task(coordinator.request("nobody_answers", {}, timeout_s=30))
    await until(lambda: coordinator._requester is not None
                and coordinator._requester.waiting == 1, "the request waiting")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert coordinator._requester.waiting == 0


async def test_a_late_reply_after_the_timeout_is_ignored(
        redis_url: str, stream_name: str,
        make_coordinator: Callable[..., AgentCoordinator], workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    release = asyncio.Event()

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        if event["slow"]:
            await release.wait()
        await event.reply({"n": event["n"]})

    await worker.start()
    coordinator = make_coordinator()
    with pytest.raises(RequestTimeoutError):
        await coordinator.request("ask", {"n": 1, "slow": True}, timeout_s=0.3)
    release.set()
    await until(lambda: coordinator.request_stats.late_or_duplicate_replies == 1,
                "the late reply counted")
    # It resolved nothing, and the coordinator keeps working.
    assert coordinator.request_stats.replies == 0
    assert (await coordinator.request("ask", {"n": 2, "slow": False}, timeout_s=10))["n"] == 2
    assert coordinator.request_stats.late_or_duplicate_replies == 1


# ------------------------------------------------------------------------------ redelivery


async def test_a_redelivered_request_answered_twice_yields_one_reply(
        redis_url: str, raw: aioredis.Redis, stream_name: str, workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    answers: list[str] = []

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        answers.append(await event.reply({"attempt": event.delivery_count}))
        if event.delivery_count == 1:
            raise Retry(0)  # replied, then failed: the request comes back and is answered again

    await xadd_raw(raw, stream_name, request_fields(b"c1", b"r1", q=1))
    await worker.start()
    await until(lambda: len(answers) == 2 and worker.stats.acked == 1, "two answers, one ack")
    assert answers[0] == answers[1]
    entries = await stream_entries(raw, replies_key(stream_name, "c1"))
    assert len(entries) == 1
    (_, reply), = entries
    assert reply[b"type"] == b"reply"
    assert reply[b"_eid"] == b"r1"
    assert reply[b"attempt"] == b"1"


# ------------------------------------------------------------------------------ trust boundary


async def _keys(raw: aioredis.Redis, match: str = "*") -> set[bytes]:
    return {key async for key in raw.scan_iter(match=match, count=1000)}


async def test_a_forged_request_can_only_write_under_the_streams_replies_keys(
        redis_url: str, raw: aioredis.Redis, stream_name: str, workers: list[Worker],
        make_coordinator: Callable[..., AgentCoordinator], valkey_server: LocalServer) -> None:
    token = stream_name.removeprefix("test-")
    victim = f"victim-{token}"
    await raw.set(victim, b"untouched")
    forged = [
        victim,                                     # a plain key name
        f"{{{stream_name}}}:dlq",                   # another side key of the stream
        f"x}}:{victim}",                            # hash-tag games
        f"../{victim}",
        f"a:b-{token}",                             # a separator
        "x" * 65,                                   # too long
        "",                                         # empty
        f"ok-{token}",                              # valid: answered, under replies:
    ]
    worker = make_worker(workers, redis_url, stream_name)
    outcomes: dict[str, str] = {}

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        try:
            await event.reply({"stolen": "data"})
            outcomes[event["label"]] = "replied"
        except InvalidArgumentError:
            outcomes[event["label"]] = "refused"

    # The session's embedded Valkey serves this test process only (the Redis 7 may be shared).
    private = redis_url.startswith(valkey_server.url)
    before = await _keys(raw) if private else set()
    for n, caller in enumerate(forged):
        await xadd_raw(raw, stream_name, request_fields(caller.encode(), b"r1", label=str(n)))
    await xadd_raw(raw, stream_name, request_fields(f"rid-{token}".encode(), b"../r",
                                                    label="bad-request-id"))
    await worker.start()
    await until(lambda: len(outcomes) == len(forged) + 1, "every forged request handled")
    # A valid id is answered, under the stream's replies: keys; anything else is refused.
    assert outcomes == {**{str(n): "refused" for n in range(1, len(forged) - 1)},
                        "0": "replied", str(len(forged) - 1): "replied",
                        "bad-request-id": "refused"}
    assert await raw.get(victim) == b"untouched"
    assert await raw.exists(f"{{{stream_name}}}:dlq") == 0
    allowed = {stream_name.encode(), victim.encode()}
    for caller in (victim, f"ok-{token}"):
        allowed |= {replies_key(stream_name, caller).encode(),
                    f"{replies_key(stream_name, caller)}:idem:r1".encode()}
    assert await _keys(raw, f"*{token}*") == allowed
    if private:  # a server only this test process uses: nothing else appeared anywhere
        assert await _keys(raw) - before == allowed - {victim.encode()}
    # coordinator.reply checks the dict the same way.
    replier = make_coordinator(consumer_group="g2")
    bad: object
    for bad in (f"../{victim}", f"{{{stream_name}}}:dlq", "a:b", "", None):
        with pytest.raises(InvalidArgumentError):
            await replier.reply({"_msg_id": "1-0", "_reply_to": bad, "_request_id": "r"},
                                {"x": 1})
    await raw.delete(victim)


async def test_reply_on_an_event_that_is_not_a_request_raises(
        redis_url: str, stream_name: str, workers: list[Worker],
        make_coordinator: Callable[..., AgentCoordinator]) -> None:
    worker = make_worker(workers, redis_url, stream_name)
    errors: list[BaseException] = []

    @worker.handler("plain")
    async def answer(event: Event) -> None:
        assert not event.expects_reply
        try:
            await event.reply({"x": 1})
        except InvalidArgumentError as exc:
            errors.append(exc)

    coordinator = make_coordinator(consumer_group="subscribers")
    await coordinator.initialize()
    await coordinator.publish("plain", {"x": 1})
    await worker.start()
    await until(lambda: len(errors) == 1, "the handler's reply refused")
    async for event in coordinator.subscribe(max_events=1, timeout_ms=5000):
        assert "_reply_to" not in event
        with pytest.raises(InvalidArgumentError, match="no reply metadata"):
            await coordinator.reply(event, {"x": 1})


# ------------------------------------------------------------------------------ close


async def test_close_fails_waiting_requests_and_stops_the_reader(
        raw: aioredis.Redis, stream_name: str,
        make_coordinator: Callable[..., AgentCoordinator]) -> None:
    coordinator = make_coordinator()
    tasks = [asyncio.create_task(coordinator.request("ask", {"n": n}, timeout_s=30))
             for n in range(3)]
    await until(lambda: coordinator._requester is not None
                and coordinator._requester.waiting == 3, "three requests waiting")
    requester = coordinator._requester
    assert requester is not None
    reader = requester._reader.task
    assert reader is not None
    started = asyncio.get_running_loop().time()
    await coordinator.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert asyncio.get_running_loop().time() - started < 5
    assert all(isinstance(r, ClosedError) for r in results), results
    assert reader.done()
    assert requester.waiting == 0
    with pytest.raises(ClosedError):
        await requester.request("ask", {}, timeout_s=1)


# ------------------------------------------------------------------------------ signing


async def test_with_signing_keys_replies_are_signed_and_an_unsigned_one_never_resolves(
        redis_url: str, raw: aioredis.Redis, stream_name: str, workers: list[Worker],
        make_coordinator: Callable[..., AgentCoordinator]) -> None:
    coordinator = make_coordinator(signing_keys=KEYS, caller_id="signed-caller")
    reply_stream = replies_key(stream_name, "signed-caller")
    waiting = asyncio.create_task(coordinator.request("ask", {"q": 1}, timeout_s=30))
    await wait_for(lambda: _eq(raw.xlen(stream_name), 1), message="the request published")
    (_, request), = await stream_entries(raw, stream_name)
    assert request[b"_kid"] == b"k1"  # the request is signed, metadata included
    request_id = request[b"_rid"]
    # Injected replies: unsigned, signed with another secret, signed for another stream.
    unsigned = encode_event("reply", {"forged": True}, event_id=request_id.decode())
    wrong_key = encode_event("reply", {"forged": True}, event_id=request_id.decode(),
                             signer=SigningKeys(OTHER_KEYS).signer(reply_stream))
    other_stream = encode_event("reply", {"forged": True}, event_id=request_id.decode(),
                                signer=SigningKeys(KEYS).signer(stream_name))
    for fields in (unsigned, wrong_key, other_stream):
        await xadd_raw(raw, reply_stream, fields)
    await until(lambda: coordinator.request_stats.unauthenticated_replies == 3,
                "three replies refused")
    assert not waiting.done()
    # A worker with the keys answers; its reply is signed and resolves the request.
    worker = make_worker(workers, redis_url, stream_name, signing_keys=KEYS)

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        await event.reply({"genuine": event["q"]})

    await worker.start()
    reply = await asyncio.wait_for(waiting, 10)
    assert reply["genuine"] == 1
    assert coordinator.request_stats.replies == 1


async def test_a_worker_with_signing_keys_never_answers_an_unsigned_request(
        redis_url: str, raw: aioredis.Redis, stream_name: str, workers: list[Worker]) -> None:
    worker = make_worker(workers, redis_url, stream_name, signing_keys=KEYS)
    handled: list[Event] = []

    @worker.handler("ask")
    async def answer(event: Event) -> None:
        handled.append(event)
        await event.reply({"x": 1})

    await xadd_raw(raw, stream_name, request_fields(b"c1", b"r1", q=1))
    await worker.start()
    await until(lambda: worker.stats.dead_lettered == 1, "the unsigned request dead-lettered")
    assert handled == []
    assert await raw.exists(replies_key(stream_name, "c1")) == 0


# ------------------------------------------------------------------------------ arguments


async def test_arguments_are_checked(make_coordinator: Callable[..., AgentCoordinator]) -> None:
    for caller_id in ("a:b", "", "x" * 65, "{tag}", "a b"):
        with pytest.raises(InvalidArgumentError, match="caller_id"):
            AgentCoordinator("redis://127.0.0.1:1", "s", caller_id=caller_id)
    coordinator = make_coordinator(max_event_bytes=200)
    timeout_s: Any
    for timeout_s in (0, -1, True, "1"):
        with pytest.raises(InvalidArgumentError, match="timeout_s"):
            await coordinator.request("ask", {}, timeout_s=timeout_s)
    with pytest.raises(PayloadTooLargeError) as caught:
        await coordinator.request("ask", {"big": "x" * 150}, timeout_s=1)
    assert caught.value.limit == 200
    assert caught.value.size > 200
    with pytest.raises(InvalidArgumentError, match="reserved"):
        await coordinator.request("ask", {"_rto": "x"}, timeout_s=1)
    assert coordinator._requester is not None
    assert coordinator._requester.waiting == 0

"""Signed events on real servers: every publish path signs, every consumer verifies before
decoding, and every forgery (written with a plain redis-py client) is dead-lettered as
``unauthenticated`` without reaching a handler. Key rotation; the size rule with signing on."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import AgentCoordinator, DeadLetterQueue, Event, Worker
from agentstreams._codec import encode_event
from agentstreams._constants import DLQ_REASON_UNAUTHENTICATED
from agentstreams._publisher import Publisher
from agentstreams._signing import SigningKeys
from agentstreams.errors import InvalidArgumentError, PayloadTooLargeError, Reject
from conftest import pending_rows, reference_fields, stream_entries, wait_for, xadd_raw

K1 = b"k1-secret-0123456789abcdef-0123456789"
K2 = b"k2-secret-fedcba9876543210-9876543210"
OTHER = b"not-the-real-secret-but-just-as-long!"
KEYS = {"k2": K2, "k1": K1}
SIG = re.compile(rb"[0-9a-f]{64}\Z")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("keys", "words"), [
    ({}, "empty"),
    ([("k1", K1)], "mapping"),
    ({"": K1}, "not valid"),
    ({"a,b": K1}, "not valid"),
    ({"a b": K1}, "not valid"),
    ({"a:b": K1}, "not valid"),
    ({"x" * 65: K1}, "not valid"),
    ({7: K1}, "not valid"),
    ({"k1": b"fifteen bytes!!"}, "at least 16"),
    ({"k1": "short"}, "at least 16"),
    ({"k1": 1234567890123456789}, "bytes or str"),
    ({"k1": None}, "bytes or str"),
])
def test_signing_keys_are_validated_by_every_constructor(keys: Any, words: str) -> None:
    from agents_support.scenario import remote_agents
    from agentstreams.integrations.openai_agents import AgentClient, AgentWorker

    client = aioredis.Redis.from_url("redis://127.0.0.1:1")  # never connected
    builders: list[Callable[[], object]] = [
        lambda: SigningKeys(keys),
        lambda: AgentCoordinator("redis://127.0.0.1:1", "s", signing_keys=keys),
        lambda: Worker("redis://127.0.0.1:1", "s", "g", signing_keys=keys),
        lambda: Publisher(client, "s", signing_keys=keys),
        lambda: AgentWorker(list(remote_agents().values()), "redis://127.0.0.1:1",
                            signing_keys=keys),
        lambda: AgentClient("redis://127.0.0.1:1", signing_keys=keys),
    ]
    for build in builders:
        with pytest.raises(InvalidArgumentError, match=words):
            build()


def test_valid_keys_keep_their_order_and_never_show_a_secret() -> None:
    keys = SigningKeys({"2026-06.b": "a str secret of 24 bytes", "k_1": K1})
    assert keys.key_ids == ("2026-06.b", "k_1")
    assert keys.signing_key_id == "2026-06.b"
    assert "secret" not in repr(keys)
    assert K1.decode() not in repr(keys)


# ----------------------------------------------------------------------------- helpers


class Recorder:
    """A worker handler that records what it was given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    def markers(self) -> list[str]:
        return [str(e["marker"]) for e in self.events]


@pytest.fixture
async def started() -> AsyncIterator[list[Worker]]:
    """Workers a test started; stopped at the end."""
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        await worker.stop(timeout_s=5)


async def start_worker(started: list[Worker], url: str, stream: str, group: str,
                       recorder: Recorder, **kwargs: Any) -> Worker:
    kwargs.setdefault("block_ms", 100)
    worker = Worker(url, stream, group, f"c-{uuid.uuid4().hex[:6]}", **kwargs)
    worker.add_handler(recorder)
    started.append(worker)
    await worker.start()
    return worker


async def dead_letters(raw: aioredis.Redis, stream: str) -> dict[str, tuple[str, str]]:
    """marker -> (reason, error) of every dead letter of ``stream``."""
    out: dict[str, tuple[str, str]] = {}
    for letter in await DeadLetterQueue(raw, stream).list(count=1000):
        marker = letter.fields.get(b"marker", b"?").decode(errors="replace")
        out[marker] = (letter.reason, letter.error)
    return out


async def drained(raw: aioredis.Redis, stream: str, group: str) -> bool:
    return not await pending_rows(raw, stream, group)


# ----------------------------------------------------------------------------- publish paths


async def test_every_publish_path_signs_and_a_verifying_worker_handles_all(
        redis_url: str, stream_name: str, raw: aioredis.Redis, started: list[Worker]) -> None:
    publisher = Publisher(raw, stream_name, signing_keys=KEYS)
    await publisher.publish("t", {"marker": "single", "n": 1})
    await asyncio.gather(*(publisher.publish("t", {"marker": f"co-{i}", "n": i})
                           for i in range(40)))
    await publisher.publish_many([{"type": "t", "marker": f"many-{i}", "n": i}
                                  for i in range(30)])
    await publisher.publish("t", {"marker": "idem", "n": 2}, idempotency_key="once")
    await publisher.publish("t", {"marker": "idem", "n": 2}, idempotency_key="once")
    entries = await stream_entries(raw, stream_name)
    assert len(entries) == 72
    for _, fields in entries:
        assert fields[b"_kid"] == b"k2"
        assert SIG.match(fields[b"_sig"])
        assert list(fields)[-2:] == [b"_kid", b"_sig"]
    recorder = Recorder()
    worker = await start_worker(started, redis_url, stream_name, "g", recorder,
                                signing_keys=KEYS)
    await wait_for(lambda: drained_count(recorder, 72), message="every genuine event handled")
    assert await drained(raw, stream_name, "g")
    assert worker.stats.unauthenticated == 0
    assert await DeadLetterQueue(raw, stream_name).length() == 0
    assert sorted(recorder.markers()) == sorted(
        ["single", "idem"] + [f"co-{i}" for i in range(40)] + [f"many-{i}" for i in range(30)])
    by_marker = {e["marker"]: e for e in recorder.events}
    assert by_marker["many-3"]["n"] == 3
    assert "_sig" not in by_marker["single"]
    assert "_kid" not in by_marker["single"]


async def drained_count(recorder: Recorder, count: int) -> bool:
    return len(recorder.events) >= count


# ----------------------------------------------------------------------------- forgeries


async def test_forgeries_are_dead_lettered_unauthenticated_and_never_handled(
        redis_url: str, stream_name: str, raw: aioredis.Redis, started: list[Worker]) -> None:
    other_stream = f"{stream_name}:other"
    genuine = Publisher(raw, stream_name, signing_keys=KEYS)
    elsewhere = Publisher(raw, other_stream, signing_keys=KEYS)
    try:
        await genuine.publish("t", {"marker": "g-1", "session_id": "123", "n": 1})
        await genuine.publish("t", {"marker": "g-2", "session_id": "456", "n": 2})
        await elsewhere.publish("t", {"marker": "copied", "session_id": "123", "n": 1})
        [(_, g1), (_, g2)] = await stream_entries(raw, stream_name)
        [(_, copied)] = await stream_entries(raw, other_stream)
    finally:
        await raw.delete(other_stream)

    def variant(base: dict[bytes, bytes] = g1, **changes: bytes | None) -> dict[bytes, bytes]:
        """``base`` with exactly the given changes (None: the field removed)."""
        out = dict(base)
        for name, value in changes.items():
            if value is None:
                out.pop(name.encode(), None)
            else:
                out[name.encode()] = value
        return out

    def without(base: dict[bytes, bytes], *names: bytes) -> dict[bytes, bytes]:
        return {k: v for k, v in base.items() if k not in names}

    forgeries: dict[str, dict[bytes, bytes]] = {
        # the reference's format carries no signature at all
        "legacy": reference_fields({"type": "t", "marker": "legacy", "n": 1}),
        # a current-format entry without _kid/_sig (an unsigned publisher)
        "unsigned": encode_event("t", {"marker": "unsigned", "n": 1}),
        "no-sig": variant(_sig=None),
        "no-kid": variant(_kid=None),
        "tampered": variant(n=b"2"),
        "tampered-metadata": variant(_eid=b"0" * 32),
        "extra-field": variant(admin=b"true"),
        "extra-field-before-sig": {**without(g1, b"_kid", b"_sig"), b"admin": b"true",
                                   b"_kid": g1[b"_kid"], b"_sig": g1[b"_sig"]},
        "removed-field": variant(session_id=None),
        "reordered": {b"session_id": g1[b"session_id"], **without(g1, b"session_id")},
        "wrong-key": encode_event("t", {"marker": "wrong-key", "n": 1},
                                  signer=SigningKeys({"k2": OTHER}).signer(stream_name)),
        "unknown-kid": encode_event("t", {"marker": "unknown-kid", "n": 1},
                                    signer=SigningKeys({"k9": K2}).signer(stream_name)),
        "kid-swapped": variant(_kid=b"k1"),
        "sig-replayed": {**without(g2, b"_kid", b"_sig"), b"_kid": g1[b"_kid"],
                         b"_sig": g1[b"_sig"]},
        "sig-garbage": variant(_sig=b"\xff" * 64),
        "sig-upper": variant(_sig=g1[b"_sig"].upper()),
        # a genuine entry copied verbatim from another stream into this one
        "copied": copied,
    }
    # Interleaved with more genuine events; told apart by stream id (most forgeries carry
    # the genuine g-1's marker, so a forgery that got through would show up as a duplicate).
    forged_ids: dict[str, str] = {}
    for index, (name, fields) in enumerate(forgeries.items()):
        forged_ids[await xadd_raw(raw, stream_name, fields)] = name
        await genuine.publish("t", {"marker": f"g-late-{index}", "n": index})
    genuine_ids = {msg_id for msg_id, _ in await stream_entries(raw, stream_name)} \
        - set(forged_ids)
    recorder = Recorder()
    worker = await start_worker(started, redis_url, stream_name, "g", recorder,
                                signing_keys=KEYS)
    queue = DeadLetterQueue(raw, stream_name)

    async def settled() -> bool:
        return (await queue.length() >= len(forged_ids)
                and len(recorder.events) >= len(genuine_ids))

    await wait_for(settled, message="every forgery dead-lettered and every genuine handled")
    await wait_for(lambda: drained(raw, stream_name, "g"), message="nothing left pending")
    assert {e.msg_id for e in recorder.events} == genuine_ids
    assert len(recorder.events) == len(genuine_ids) == 2 + len(forgeries)
    letters = {forged_ids[lt.original_id]: lt for lt in await queue.list(count=1000)}
    assert set(letters) == set(forgeries)
    assert {lt.reason for lt in letters.values()} == {DLQ_REASON_UNAUTHENTICATED}
    assert worker.stats.unauthenticated == len(forgeries)
    assert worker.stats.malformed == 0
    for name in ("legacy", "unsigned", "no-sig", "no-kid"):
        assert letters[name].error.startswith("unsigned"), name
    assert "'k9'" in letters["unknown-kid"].error
    assert "not among" in letters["unknown-kid"].error
    for name in set(forgeries) - {"legacy", "unsigned", "no-sig", "no-kid", "unknown-kid"}:
        assert letters[name].error.startswith("bad signature"), name
    # The dead letters keep the entries exactly as they were written, signature included.
    assert letters["tampered"].fields == forgeries["tampered"]
    assert list(letters["reordered"].fields) == list(forgeries["reordered"])


async def test_a_consumer_without_keys_ignores_the_signature_fields(
        make_coordinator: Callable[..., AgentCoordinator], raw: aioredis.Redis) -> None:
    publisher = make_coordinator(signing_keys=KEYS)
    reader = make_coordinator(consumer_group="plain")
    await reader.initialize()
    await publisher.publish("t", {"marker": "m", "session_id": "123", "n": 1})
    events = [e async for e in reader.subscribe(max_events=1, timeout_ms=5000)]
    assert len(events) == 1
    assert {k: v for k, v in events[0].items() if not k.startswith("_")} == {
        "type": "t", "marker": "m", "session_id": "123", "n": 1,
        "timestamp": events[0]["timestamp"]}
    assert "_sig" not in events[0]
    assert "_kid" not in events[0]


# ----------------------------------------------------------------------------- rotation


async def test_rotation_old_entries_verify_and_unknown_new_keys_are_refused(
        redis_url: str, stream_name: str, raw: aioredis.Redis, started: list[Worker]) -> None:
    old = Publisher(raw, stream_name, signing_keys={"k1": K1})
    new = Publisher(raw, stream_name, signing_keys={"k2": K2, "k1": K1})
    await old.publish("t", {"marker": "old-1"})
    await new.publish("t", {"marker": "new-1"})
    await old.publish_many([{"type": "t", "marker": "old-2"}])
    await new.publish_many([{"type": "t", "marker": "new-2"}])
    kids = [fields[b"_kid"] for _, fields in await stream_entries(raw, stream_name)]
    assert kids == [b"k1", b"k2", b"k1", b"k2"]
    both, only_old = Recorder(), Recorder()
    await start_worker(started, redis_url, stream_name, "both", both,
                       signing_keys={"k2": K2, "k1": K1})
    lagging = await start_worker(started, redis_url, stream_name, "only-old", only_old,
                                 signing_keys={"k1": K1})
    await wait_for(lambda: drained_count(both, 4), message="both keys verify")
    await wait_for(lambda: drained_count(only_old, 2), message="k1 entries verify")
    await wait_for(lambda: drained(raw, stream_name, "only-old"), message="k2 refused")
    assert sorted(both.markers()) == ["new-1", "new-2", "old-1", "old-2"]
    assert sorted(only_old.markers()) == ["old-1", "old-2"]
    assert lagging.stats.unauthenticated == 2
    letters = await DeadLetterQueue(raw, stream_name).list()
    assert sorted((lt.group, lt.reason, lt.fields[b"marker"].decode()) for lt in letters) == [
        ("only-old", DLQ_REASON_UNAUTHENTICATED, "new-1"),
        ("only-old", DLQ_REASON_UNAUTHENTICATED, "new-2")]
    assert all("'k2'" in lt.error for lt in letters)


# ----------------------------------------------------------------------------- coordinator


async def test_coordinator_subscribe_and_claim_verify_before_decoding(
        make_coordinator: Callable[..., AgentCoordinator], raw: aioredis.Redis,
        stream_name: str) -> None:
    coordinator = make_coordinator(consumer_group="g", consumer_name="c2", signing_keys=KEYS)
    await coordinator.initialize()
    await coordinator.publish("t", {"marker": "a"})
    [(_, genuine)] = await stream_entries(raw, stream_name)
    await xadd_raw(raw, stream_name, encode_event("t", {"marker": "forged-1"}))
    await xadd_raw(raw, stream_name, {**genuine, b"marker": b"forged-2"})
    await coordinator.publish_many([{"type": "t", "marker": "b"}, {"type": "t", "marker": "c"}])
    events = [e async for e in coordinator.subscribe(max_events=3, timeout_ms=3000)]
    assert [e["marker"] for e in events] == ["a", "b", "c"]
    dead = await dead_letters(raw, stream_name)
    assert {m: r for m, (r, _) in dead.items()} == {
        "forged-1": DLQ_REASON_UNAUTHENTICATED, "forged-2": DLQ_REASON_UNAUTHENTICATED}

    # Entries another consumer of the group left pending: claimed, verified, sorted.
    await coordinator.publish("t", {"marker": "d"})
    await xadd_raw(raw, stream_name, reference_fields({"type": "t", "marker": "forged-3"}))
    await coordinator.publish_handoff_ready("x", "y", "s", {"marker": "e"})
    await xadd_raw(raw, stream_name, {**genuine, b"marker": b"forged-4", b"_kid": b"k1"})
    await raw.xreadgroup("g", "c1", {stream_name: ">"}, count=100)
    # taken by c1, which dies without acknowledging
    assert [r["consumer"] for r in await pending_rows(raw, stream_name, "g")] == ["c1"] * 4
    claimed = await coordinator.claim_abandoned_messages(min_idle_ms=0)
    assert sorted(e.get("marker", "") or e["context"]["marker"] for e in claimed) == ["d", "e"]
    dead = await dead_letters(raw, stream_name)
    assert set(dead) == {"forged-1", "forged-2", "forged-3", "forged-4"}
    assert {r for r, _ in dead.values()} == {DLQ_REASON_UNAUTHENTICATED}
    await coordinator.ack(*[e["_msg_id"] for e in claimed])
    assert await drained(raw, stream_name, "g")


async def test_a_replayed_dead_letter_verifies_again_in_its_own_stream(
        redis_url: str, stream_name: str, raw: aioredis.Redis, started: list[Worker]) -> None:
    """Dead letters keep the signed fields in order: replayed to their stream they verify."""
    seen = Recorder()
    rejected: list[str] = []

    async def handle(event: Event) -> None:
        if not rejected:
            rejected.append(event.msg_id)
            raise Reject("not now")
        await seen(event)

    worker = Worker(redis_url, stream_name, "g", "c", block_ms=100, signing_keys=KEYS)
    worker.add_handler(handle)
    started.append(worker)
    await worker.start()
    await Publisher(raw, stream_name, signing_keys=KEYS).publish("t", {"marker": "r"})
    queue = DeadLetterQueue(raw, stream_name)

    async def one_dead() -> bool:
        return await queue.length() == 1

    await wait_for(one_dead, message="the rejected event dead-lettered")
    assert (await queue.list())[0].reason == "rejected"
    assert len(await queue.replay(all_letters=True)) == 1
    await wait_for(lambda: drained_count(seen, 1), message="the replayed event handled")
    assert seen.markers() == ["r"]
    assert worker.stats.unauthenticated == 0


# ----------------------------------------------------------------------------- size rule


async def test_an_event_exactly_at_the_limit_is_signed_and_accepted(
        redis_url: str, stream_name: str, raw: aioredis.Redis, started: list[Worker]) -> None:
    limit = 4096 + 300
    keys = SigningKeys(KEYS)
    fixed = {"timestamp": 1.5, "marker": "limit"}

    def size(blob: int) -> int:
        entry = encode_event("t", {**fixed, "blob": "x" * blob}, event_id="e" * 32,
                             max_event_bytes=1 << 30, signer=keys.signer(stream_name))
        return sum(len(k) + len(v) for k, v in entry.items())

    blob = limit - size(0)
    assert size(blob) == limit
    publisher = Publisher(raw, stream_name, max_event_bytes=limit, signing_keys=keys)
    await publisher.publish("t", {**fixed, "blob": "x" * blob}, event_id="e" * 32)
    await publisher.publish_many([{"type": "t", **fixed, "blob": "x" * blob}])
    with pytest.raises(PayloadTooLargeError):
        await publisher.publish("t", {**fixed, "blob": "x" * (blob + 1)}, event_id="e" * 32)
    with pytest.raises(PayloadTooLargeError):
        await publisher.publish_many([{"type": "t", **fixed, "blob": "x" * (blob + 1)}])
    stored = await stream_entries(raw, stream_name)
    assert [sum(len(k) + len(v) for k, v in f.items()) for _, f in stored] == [limit, limit]
    recorder = Recorder()
    worker = await start_worker(started, redis_url, stream_name, "g", recorder,
                                max_event_bytes=limit, signing_keys=keys)
    await wait_for(lambda: drained_count(recorder, 2), message="both at-limit events handled")
    assert worker.stats.malformed == worker.stats.unauthenticated == 0
    assert [len(e["blob"]) for e in recorder.events] == [blob, blob]

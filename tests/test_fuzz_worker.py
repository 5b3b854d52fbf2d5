"""A live worker fed thousands of hostile entries interleaved with valid events.

Raw entries are written with plain XADD, the way any other client (or an attacker with write
access) can: random fields, non-UTF-8 bytes, empty-ish and metadata-only entries, entries up to
and over ``max_event_bytes``, JSON bombs, future format versions, numeric-looking types, no
type, thousands of fields. Valid events are published with ``Publisher``, each with a sequence
number. Everything is generated from one seeded ``random.Random`` (printed; set
``FUZZ_SEED`` to replay another run) and every raw entry's expected fate is checked against
``decode_entry`` when it is generated, so the generator cannot drift from the format.

Asserted within a deadline, on every server, with one worker and with two competing in the
group: the workers keep running and never restart a task; every valid event (and every foreign
entry that does decode) is handled exactly once, with the data that was published; every bad
entry is dead-lettered exactly once with reason ``malformed``, a reason text and its original
fields unchanged; nothing valid is dead-lettered; nothing stays pending.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import DeadLetterQueue, Event, MalformedEventError, Publisher, Worker
from agentstreams._codec import decode_entry
from conftest import assert_same, wait_for

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
#: Entries written per run: about a third valid events, the rest raw.
TOTAL = 3000
#: A small limit keeps "huge, up to the limit" cheap to write thousands of times.
MAX_EVENT_BYTES = 64 * 1024
GROUP = "fuzz"
DEADLINE_S = 40.0

Fields = dict[bytes, bytes]

#: Names another client may use, including the dead-letter stream's own metadata names and
#: names that look like its escape of them.
NAMES = [b"_orig_reason", b"_orig_", b"type", b"Type", b"type ", b"session_id", b"timestamp",
         b"data", b"n", b"", b" ",
         b"_v", b"_eid", b"_json", b"_tp", b"_tstate", b"_", b"_x", b"original_id",
         b"original_stream", b"reason", b"error", b"group", b"consumer", b"deliveries",
         b"dead_at_ms", b"\xc3\xa9", b"\xf0\x9f\x99\x82", b"a,b"]
NUMERIC_LOOKING = [b"0", b"1", b"-1", b"1.5", b"1e3", b"123", b"18446744073709551616", b"true",
                   b"false", b"null", b"[]", b"{}", b'""', b"NaN", b"Infinity", b"-0"]
FUTURE_VERSIONS = [b"2", b"0", b"01", b"1.0", b" 1", b"", b"\xff", b"999", b"v1"]


def entry_size(fields: Fields) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def deep(depth: int, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b"[" * depth + b"0" + b"]" * depth
    return b'{"k":' * depth + b"0" + b"}" * depth


class Generator:
    """Hostile entries, each of a known fate, from one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def junk(self, size: int | None = None) -> bytes:
        n = self.rng.randrange(0, 24) if size is None else size
        return self.rng.randbytes(n)

    def text(self, n: int = 12) -> bytes:
        alphabet = "abc xyz019_,:{}[]\"\\é🙂\x00\t"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(n)))\
            .encode()

    def value(self) -> bytes:
        kind = self.rng.randrange(6)
        if kind == 0:
            return self.junk()
        if kind == 1:
            return self.rng.choice(NUMERIC_LOOKING)
        if kind == 2:
            return json.dumps({"a": [1, "x", None, self.rng.random()]}).encode()
        return self.text()

    def name(self) -> bytes:
        return self.rng.choice(NAMES) if self.rng.random() < 0.5 else self.text(8)

    def bad(self) -> tuple[str, Fields]:
        """An entry no decoder may accept, and its category."""
        rng = self.rng
        kind = rng.choice([
            "no type", "non-UTF-8 value", "non-UTF-8 name", "future version", "bad JSON",
            "type not a string", "over the limit", "JSON bomb", "metadata only",
            "empty-ish", "random bytes", "v1 JSON type", "v1 non-UTF-8 type",
        ])
        fields: Fields = {}
        for _ in range(rng.randrange(0, 5)):
            fields[self.name()] = self.value()
        fields.pop(b"type", None)
        fields.pop(b"_v", None)
        if kind == "no type":
            if not fields or rng.random() < 0.3:
                fields[b"_v"] = b"1"  # a version-1 entry without a type
        elif kind == "non-UTF-8 value":
            fields[b"type"] = b"t"
            fields[b"bad"] = b"\xff" + self.junk()
        elif kind == "non-UTF-8 name":
            fields[b"type"] = b"t"
            fields[b"\xfe" + self.junk(3)] = b"v"
        elif kind == "future version":
            fields[b"type"] = b"t"
            fields[b"_v"] = rng.choice(FUTURE_VERSIONS)
        elif kind == "bad JSON":
            fields.update({b"type": b"t", b"_v": b"1", b"_json": b"x,missing,,_v",
                           b"x": rng.choice([b"{", b"NaN", b"[1,]", b"\xff", b"", b"01",
                                             b'"\\ud800"', b"1e400"])})
        elif kind == "type not a string":
            fields[b"type"] = rng.choice([b"123", b"1.5", b"null", b"true", b"[]", b'{"a":1}',
                                          b'""', b"", b"-0", b"1e3"])
        elif kind == "over the limit":
            fields[b"type"] = b"t"
            filler = MAX_EVENT_BYTES - entry_size(fields) - len(b"pad")
            fields[b"pad"] = rng.choice([b"x", b"1", b" "]) * (filler + rng.randrange(1, 64))
        elif kind == "JSON bomb":
            if rng.random() < 0.5:  # legacy: Python's json recursion
                fields[b"type"] = b"t"
                fields[b"bomb"] = deep(rng.randrange(1100, 20_000), rng)
            else:  # version 1: orjson's depth limit
                fields.update({b"type": b"t", b"_v": b"1", b"_json": b"bomb",
                               b"bomb": deep(rng.randrange(1025, 20_000), rng)})
        elif kind == "metadata only":
            fields = {b"_v": b"1"}
            for name in (b"_eid", b"_json", b"_tp", b"_tstate", b"_x"):
                if rng.random() < 0.5:
                    fields[name] = self.text()
        elif kind == "empty-ish":
            fields = rng.choice([{b"": b""}, {b" ": b""}, {b"type": b""}, {b"type": b" "[:0]},
                                 {b"_v": b"1", b"type": b""}, {b"_": b""}, {b"\x00": b"\x00"}])
        elif kind == "random bytes":
            fields = {self.junk(rng.randrange(1, 8)): self.junk() for _ in range(1, 6)}
            fields.pop(b"type", None)
            fields[b"\xff"] = b"\xff"
        elif kind == "v1 JSON type":
            fields.update({b"type": rng.choice([b"1", b"null", b"[]", b'""', b"{"]),
                           b"_v": b"1", b"_json": b"type"})
        else:
            fields.update({b"type": b"\xc3\x28" + self.junk(3), b"_v": b"1"})
        return kind, fields

    def foreign_good(self) -> tuple[str, Fields]:
        """An entry another client wrote that decodes (it must be handled, not dead-lettered)."""
        rng = self.rng
        kind = rng.choice(["legacy", "legacy at the limit", "v1 by hand", "numeric strings"])
        if kind == "legacy":
            fields = {b"type": b"foreign", b"n": rng.choice(NUMERIC_LOOKING),
                      b"context": b'{"a": [1, 2]}', b"\xc3\xa9": b"\xf0\x9f\x99\x82"}
        elif kind == "legacy at the limit":
            fields = {b"type": b"foreign", b"pad": b""}
            fields[b"pad"] = b"y" * (MAX_EVENT_BYTES - entry_size(fields) - rng.randrange(0, 2))
        elif kind == "v1 by hand":
            fields = {b"type": b"foreign", b"_v": b"1", b"_json": b"obj,missing,_v",
                      b"obj": b'{"deep": [[[[1]]]], "s": "123"}', b"s": b"123",
                      b"_eid": self.junk(8), b"_future_meta": self.junk()}
        else:
            fields = {b"type": rng.choice([b"123x", b"\xc3\xa9", b"a,b", b" t "]), b"_v": b"1",
                      b"n": b"123", b"t": b"true", b"z": b"null"}
        return kind, fields

    def many_fields(self) -> tuple[str, Fields]:
        """More fields than one server-side script takes (the dead-letter fallback path)."""
        fields = {f"f{i}".encode(): b"" for i in range(8000)}
        return "8,000 fields, no type", fields

    def payload(self, seq: int) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {"seq": seq, "s": str(seq), "flag": "true", "none": None,
                               "nested": {"l": [seq, "null", 1.5, False, {"é": "🙂"}]}}
        if rng.random() < 0.01:
            out["pad"] = "p" * (MAX_EVENT_BYTES - 400 - rng.randrange(200))
        return out


def expect_fate(fields: Fields, good: bool, what: str) -> None:
    """The generator's claim, checked against the decoder the worker uses."""
    try:
        decode_entry("0-1", fields, stream="s", max_event_bytes=MAX_EVENT_BYTES)
    except MalformedEventError:
        assert not good, f"generated {what!r} should decode: {fields!r:.300}"
        return
    assert good, f"generated {what!r} should be malformed: {fields!r:.300}"


@dataclass
class Plan:
    actions: list[tuple[str, Any]] = field(default_factory=list)
    categories: Counter[str] = field(default_factory=Counter)


def make_plan(rng: random.Random) -> Plan:
    gen = Generator(rng)
    plan = Plan()
    seq = 0
    plan.actions.append(("raw bad", gen.many_fields()))
    while len(plan.actions) < TOTAL:
        roll = rng.random()
        if roll < 0.33:
            plan.actions.append(("publish", (seq, gen.payload(seq))))
            seq += 1
        elif roll < 0.40:
            plan.actions.append(("raw good", gen.foreign_good()))
        else:
            plan.actions.append(("raw bad", gen.bad()))
    rng.shuffle(plan.actions)
    for action, item in plan.actions:
        if action != "publish":
            kind, fields = item
            expect_fate(fields, action == "raw good", kind)
            plan.categories[f"{action}: {kind}"] += 1
        else:
            plan.categories["publish"] += 1
    return plan


@pytest.mark.parametrize("consumers", [1, 2])
async def test_worker_survives_interleaved_hostile_entries(
        redis_url: str, raw: aioredis.Redis, stream_name: str, consumers: int) -> None:
    rng = random.Random(SEED)
    plan = make_plan(rng)
    started = time.monotonic()

    handled: Counter[str] = Counter()
    data_by_id: dict[str, dict[str, Any]] = {}
    workers = [Worker(redis_url, stream_name, GROUP, f"fuzz-{n}", block_ms=200,
                      visibility_timeout_ms=1000, probe_server=False, max_deliveries=2,
                      max_event_bytes=MAX_EVENT_BYTES, shutdown_timeout_s=5.0)
               for n in range(consumers)]
    for worker in workers:
        @worker.handler()
        async def on_any(event: Event) -> None:
            handled[event.msg_id] += 1
            data_by_id[event.msg_id] = dict(event.data)

    def total(counter: str) -> int:
        return sum(int(getattr(w.stats, counter)) for w in workers)

    publisher = Publisher(raw, stream_name, max_event_bytes=MAX_EVENT_BYTES)
    valid: dict[str, dict[str, Any]] = {}  # stream id -> published fields
    foreign_good: dict[str, Fields] = {}
    bad: dict[str, Fields] = {}
    for worker in workers:
        await worker.start()
    try:
        for action, item in plan.actions:  # the worker reads while we write
            if action == "publish":
                _seq, payload = item
                valid[await publisher.publish("valid", payload)] = payload
            else:
                _kind, fields = item
                reply: Any = await raw.xadd(stream_name, fields)
                (foreign_good if action == "raw good" else bad)[reply.decode()] = fields
        written_s = time.monotonic() - started
        good_ids = valid.keys() | foreign_good.keys()
        dlq = DeadLetterQueue(raw, stream_name)

        async def settled() -> bool:
            for worker in workers:
                assert worker.running, f"{worker.consumer} stopped: {worker.failure!r}"
            pending: Any = await raw.xpending(stream_name, GROUP)
            # the server's view, then the worker's (its counters follow the replies)
            return (len(handled) >= len(good_ids) and await dlq.length() >= len(bad)
                    and int(pending["pending"]) == 0
                    and total("dead_lettered") + total("dead_letter_failures") >= len(bad)
                    and total("acked") >= len(good_ids))

        await wait_for(settled, timeout_s=DEADLINE_S, interval_s=0.05,
                       message=f"{len(good_ids)} handled, {len(bad)} dead-lettered, 0 pending"
                               f" (seed {SEED})")
        assert all(worker.running for worker in workers)
    finally:
        for worker in workers:
            await worker.stop(timeout_s=5)
    elapsed = time.monotonic() - started
    letters = await dlq.list(count=len(bad) + 1000)
    stats = {name: total(name) for name in workers[0].stats.as_dict()}
    print(f"\nseed={SEED} server={redis_url} consumers={consumers} "
          f"entries={len(plan.actions)} valid={len(valid)} "
          f"foreign_good={len(foreign_good)} bad={len(bad)} dead_letters={len(letters)} "
          f"handled={sum(handled.values())} written_in={written_s:.2f}s total={elapsed:.2f}s")
    print("categories:", dict(sorted(plan.categories.items())))
    print("stats:", stats)

    # The worker never stopped nor restarted a task.
    assert stats["task_restarts"] == 0
    assert all(worker.failure is None for worker in workers)
    # Every good entry handled exactly once (no faults: no duplicates), nothing else handled.
    duplicates = {msg_id: n for msg_id, n in handled.items() if n > 1}
    assert not duplicates, f"handled more than once: {duplicates}"
    assert handled.keys() == good_ids, (
        f"missing {sorted(good_ids - handled.keys())[:10]}, "
        f"unexpected {sorted(handled.keys() - good_ids)[:10]}")
    for msg_id, payload in valid.items():
        received = {k: v for k, v in data_by_id[msg_id].items() if k != "timestamp"}
        assert_same(received, {"type": "valid", **payload})
    assert sorted(data_by_id[i]["seq"] for i in valid) == list(range(len(valid)))
    # Every bad entry dead-lettered exactly once, as malformed, with its fields unchanged.
    dead = Counter(letter.original_id for letter in letters)
    assert not {i: n for i, n in dead.items() if n > 1}, "dead-lettered more than once"
    assert dead.keys() == bad.keys(), (
        f"not dead-lettered {sorted(bad.keys() - dead.keys())[:10]}, "
        f"wrongly dead-lettered {sorted(dead.keys() - bad.keys())[:10]}")
    for letter in letters:
        assert letter.reason == "malformed", letter
        assert letter.error, letter
        assert letter.original_stream == stream_name
        assert letter.group == GROUP
        assert letter.consumer in {worker.consumer for worker in workers}
        assert letter.fields == bad[letter.original_id], letter.original_id
    # Nothing pending, and the counters agree.
    pending: Any = await raw.xpending(stream_name, GROUP)
    assert int(pending["pending"]) == 0
    assert stats["malformed"] == len(bad)
    assert stats["dead_lettered"] == len(bad)
    assert stats["dead_letter_failures"] == 0
    assert stats["succeeded"] == len(good_ids)
    assert stats["failed"] == stats["retried"] == stats["lost"] == stats["unhandled"] == 0


@pytest.mark.parametrize("extra", [
    {b"_orig_reason": b"x"},
    {b"reason": b"r", b"_orig_reason": b"x"},
    {b"_orig_": b"y"},
], ids=["escape-lookalike", "escape-lookalike-and-collision", "bare-prefix"])
async def test_dead_letters_keep_fields_that_look_like_the_collision_escape(
        redis_url: str, raw: aioredis.Redis, stream_name: str, extra: Fields) -> None:
    """Found by the fuzz above with '_orig_*' names in its pool (they are left out of it so
    the main test keeps guarding everything else; put them back once this passes)."""
    original: Fields = {b"type": b"t", b"_v": b"9", **extra}  # a future version: malformed
    worker = Worker(redis_url, stream_name, GROUP, "fuzz-1", block_ms=200,
                    visibility_timeout_ms=1000, probe_server=False, max_deliveries=2)

    @worker.handler()
    async def on_any(event: Event) -> None:
        raise AssertionError(f"a malformed entry reached the handler: {event!r}")

    reply: Any = await raw.xadd(stream_name, original)  # type: ignore[arg-type]
    msg_id = reply.decode()
    dlq = DeadLetterQueue(raw, stream_name)
    async with worker:
        async def dead_lettered() -> bool:
            return worker.stats.dead_lettered == 1

        await wait_for(dead_lettered, message="the dead letter")
    [letter] = await dlq.list()
    assert letter.original_id == msg_id
    assert letter.reason == "malformed"
    fields_kept = letter.fields == original
    [(_, new_id)] = await dlq.replay(all_letters=True)
    replayed: Any = await raw.xrange(stream_name, min=new_id, max=new_id)
    assert fields_kept, f"dead letter holds {letter.fields!r}, the entry was {original!r}"
    assert dict(replayed[0][1]) == {**original, b"_grp": GROUP.encode()}  # routed back

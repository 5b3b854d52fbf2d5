"""Issue 10, test first: no silent stalls.

Every fault here is injected on a real server this test starts and owns (embedded Valkey 9 or
Debian's redis-server 7): a kill -9 and AOF restart, OOM through ``CONFIG SET maxmemory``, a
connection cut, an ACL revoked, a SIGSTOP. After each, the worker must keep handling new events
by itself, lose nothing, and never sit on entries another replica could take; every timeout must
be a bound and every permanent error must surface as a typed error instead of a retry loop.

Only public names are used, plus raw redis-py for what is really stored (XPENDING, the DLQ).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    AuthenticationError,
    ConfigurationError,
    ConnectionLostError,
    Event,
    PayloadTooLargeError,
    PermissionDeniedError,
    Reject,
    Worker,
    WrongTypeError,
)
from agentstreams.server import LocalServer, find_free_port

pytestmark = pytest.mark.slow

GROUP = "stalls"
#: Small knobs so that every recovery bound is a few seconds.
VISIBILITY_MS = 1000
FAST: dict[str, Any] = {
    "visibility_timeout_ms": VISIBILITY_MS,
    "block_ms": 200,
    "retry_delay_s": 0.05,
    "probe_server": False,
}
#: Reclaim interval the worker derives from VISIBILITY_MS (half of it).
RECLAIM_S = VISIBILITY_MS / 2000
SERVER_KINDS = ["valkey", "redis"]


# --------------------------------------------------------------------------- waiting


async def eventually(condition: Callable[[], bool | Awaitable[bool]], *, timeout_s: float,
                     what: str | Callable[[], str], interval_s: float = 0.02) -> float:
    """Poll ``condition`` (sync or async) until it holds; fail after ``timeout_s``.

    ``what`` describes the condition; a callable is evaluated at the failure (to report the
    state then). Returns how long it took.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            description = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout_s}s waiting for {description}")
        await asyncio.sleep(interval_s)


async def holds_within(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll ``condition`` for up to ``timeout_s``; False (no failure) if it never held."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --------------------------------------------------------------------------- raw views


def dlq_key(stream: str) -> str:
    """The dead-letter stream (README: ``{stream}:dlq``)."""
    return f"{{{stream}}}:dlq"


async def dead_letters(raw: aioredis.Redis, stream: str) -> dict[str, dict[bytes, bytes]]:
    """Dead letters of ``stream`` by original id: their raw fields."""
    reply: Any = await raw.xrange(dlq_key(stream))
    out: dict[str, dict[bytes, bytes]] = {}
    for _dlq_id, raw_fields in reply or []:
        fields = dict(raw_fields)
        out[fields[b"original_id"].decode()] = fields
    return out


async def pending(raw: aioredis.Redis, stream: str, group: str = GROUP) -> dict[str, str]:
    """Pending entries of the group: id -> owning consumer."""
    rows: Any = await raw.xpending_range(stream, group, min="-", max="+", count=100_000)
    return {r["message_id"].decode(): r["consumer"].decode() for r in rows}


async def unaccounted(raw: aioredis.Redis, stream: str, ids: Iterable[str],
                      handled: Iterable[str]) -> list[str]:
    """Ids that were neither handled, nor are still pending, nor were dead-lettered: lost."""
    done = set(handled)
    dead = await dead_letters(raw, stream)
    held = await pending(raw, stream)
    return [i for i in ids if i not in done and i not in dead and i not in held]


def worker_alive(worker: Worker) -> tuple[bool, str]:
    """Is the worker still working (not silently stalled)?

    Uses ``worker.running`` when the worker has it (property or method); otherwise checks that
    none of today's background tasks (runners, reader, acker, retrier, reclaimer, leases) died.
    """
    running = getattr(worker, "running", None)
    if callable(running):
        running = running()
    if isinstance(running, bool):
        return running, f"worker.running is {running}"
    tasks: list[asyncio.Task[Any]] = [*getattr(worker, "_runners", []),
                                      *getattr(worker, "_tasks", [])]
    dead = [f"{t.get_name()} ({'cancelled' if t.cancelled() else t.exception()!r})"
            for t in tasks if t.done()]
    return not dead, f"background tasks ended: {dead}"


def good_fields(n: int, event_type: str = "ok") -> dict[bytes, bytes]:
    """A well-formed entry in the current wire format, written raw."""
    return {b"type": event_type.encode(), b"n": str(n).encode(), b"_v": b"1",
            b"_eid": uuid.uuid4().hex.encode()}


#: An entry that cannot be decoded: ``a`` is marked as JSON but is not.
MALFORMED = {b"type": b"x", b"_v": b"1", b"_json": b"a", b"a": b"{not json"}


# --------------------------------------------------------------------------- a cutting proxy


class CuttingProxy:
    """A TCP proxy in front of a server that cuts a client connection (both sides) instead of
    forwarding a chosen command, a given number of times. Deterministic connection loss at an
    exact point of the protocol, without touching anything else on the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts: list[str] = []
        self._commands: tuple[bytes, ...] = ()
        self._budget = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def arm(self, *commands: str, times: int) -> None:
        """Cut the next ``times`` connections that send one of ``commands``."""
        self._commands = tuple(b"\r\n" + c.upper().encode() + b"\r\n" for c in commands)
        self._budget = times

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(client_writer)
        server_writer: asyncio.StreamWriter | None = None
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port)
            self._writers.add(server_writer)
            up = asyncio.ensure_future(self._pump(client_reader, server_writer, check=True))
            down = asyncio.ensure_future(self._pump(server_reader, client_writer, check=False))
            try:
                await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except OSError:
            pass
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    check: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if check and self._budget > 0:
                    upper = data.upper()
                    hit = next((c for c in self._commands if c in upper), None)
                    if hit is not None:
                        self._budget -= 1
                        self.cuts.append(hit.strip().decode())
                        return  # the command is not forwarded; both sides are closed
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


# --------------------------------------------------------------------------- the harness


class Harness:
    """Servers, clients, workers and tasks of one test; ``close()`` ends all of them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[LocalServer] = []
        self.clients: list[aioredis.Redis] = []
        self.workers: list[Worker] = []
        self.coordinators: list[AgentCoordinator] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.proxies: list[CuttingProxy] = []

    def server(self, kind: str = "valkey", *, appendonly: bool = False,
               extra_config: dict[str, str] | None = None) -> LocalServer:
        data_dir = self.tmp_path / f"{kind}-{len(self.servers)}"
        data_dir.mkdir()
        server = LocalServer(kind, port=find_free_port(), appendonly=appendonly,
                             appendfsync="always", extra_config=extra_config, data_dir=data_dir)
        self.servers.append(server)  # registered first: stopped even if start() fails
        server.start()
        return server

    def raw(self, url: str) -> aioredis.Redis:
        client = aioredis.Redis.from_url(url, socket_timeout=10)
        self.clients.append(client)
        return client

    def worker(self, url: str, stream: str, **options: Any) -> Worker:
        worker = Worker(redis_url=url, stream_name=stream, consumer_group=GROUP,
                        **{**FAST, **options})
        self.workers.append(worker)
        return worker

    def coordinator(self, url: str, stream: str, **options: Any) -> AgentCoordinator:
        coordinator = AgentCoordinator(url, stream_name=stream, **options)
        self.coordinators.append(coordinator)
        return coordinator

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.append(task)
        return task

    async def proxy(self, server: LocalServer) -> CuttingProxy:
        proxy = CuttingProxy(server.port)
        self.proxies.append(proxy)
        return await proxy.start()

    async def close(self) -> None:
        for server in self.servers:  # a frozen server would make every stop below wait
            with contextlib.suppress(OSError):
                server.resume()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        for task in self.tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" warning
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.stop(timeout_s=0.5), 20)
        for coordinator in self.coordinators:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coordinator.close(), 10)
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.close()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 10)
        for server in self.servers:
            server.stop()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        await harness.close()


def new_stream() -> str:
    return f"stall-{uuid.uuid4().hex[:10]}"


async def publish(coordinator: AgentCoordinator, event_type: str, count: int,
                  start: int = 0) -> list[str]:
    return [await coordinator.publish(event_type, {"n": start + i}) for i in range(count)]


# --------------------------------------------------------------------------- 1, 10: restart


class FailingHandlers:
    """``fail`` events enter, wait at a gate, then raise; every other event is handled."""

    def __init__(self, exc: Callable[[], Exception]) -> None:
        self.exc = exc
        self.gate = asyncio.Event()
        self.entered: set[str] = set()
        self.raised: set[str] = set()
        self.handled: dict[str, int] = {}

    async def handle(self, event: Event) -> None:
        if event.type == "fail":
            self.entered.add(event.msg_id)
            await self.gate.wait()
            self.raised.add(event.msg_id)
            raise self.exc()
        self.handled[event.msg_id] = self.handled.get(event.msg_id, 0) + 1


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_restart_while_handlers_fail_keeps_the_worker_handling(
        h: Harness, kind: str) -> None:
    """Issue 10 #1: handlers fail (dead-letter due) while the server is down; after an AOF
    restart the same worker handles every new event, is still running, and loses nothing."""
    server = h.server(kind, appendonly=True)
    stream = new_stream()
    handlers = FailingHandlers(lambda: RuntimeError("tool failed while the server restarts"))
    worker = h.worker(server.url, stream, concurrency=4, max_deliveries=1)
    worker.add_handler(handlers.handle)
    await worker.start()
    failing = await publish(h.coordinator(server.url, stream), "fail", 4)
    await eventually(lambda: len(handlers.entered) == 4, timeout_s=5,
                     what="4 failing handlers to start")

    server.kill()
    handlers.gate.set()  # they raise now: dead-lettering needs the (dead) server
    await eventually(lambda: len(handlers.raised) == 4, timeout_s=5, what="handlers to raise")
    await asyncio.sleep(0.5)  # the outage lasts a moment after the failures
    server.start()

    fresh = await publish(h.coordinator(server.url, stream), "ok", 20)
    await eventually(lambda: all(i in handlers.handled for i in fresh), timeout_s=10,
                     what=lambda: f"the 20 events published after the restart to be handled "
                          f"(stats {worker.stats.as_dict()}, {worker_alive(worker)[1]})")
    alive, why = worker_alive(worker)
    assert alive, why
    raw = h.raw(server.url)
    lost = await unaccounted(raw, stream, failing + fresh, handlers.handled)
    assert not lost, f"lost (neither handled, pending nor dead-lettered): {lost}"


async def test_a_replica_takes_what_a_worker_stalled_by_a_restart_held(h: Harness) -> None:
    """Issue 10 #1 (second half): a worker whose dead-lettering failed during a restart must not
    sit on entries: with a healthy replica B running, every event (the failed ones and the 20
    new ones) ends up handled or dead-lettered, none stays pending, within the recovery bound."""
    server = h.server("valkey", appendonly=True)
    stream = new_stream()
    handlers_a = FailingHandlers(lambda: RuntimeError("tool failed while the server restarts"))
    worker_a = h.worker(server.url, stream, concurrency=4, max_deliveries=1,
                        consumer_name="stalled-a")
    worker_a.add_handler(handlers_a.handle)
    await worker_a.start()
    failing = await publish(h.coordinator(server.url, stream), "fail", 4)
    await eventually(lambda: len(handlers_a.entered) == 4, timeout_s=5,
                     what="4 failing handlers to start on A")

    handled_b: dict[str, int] = {}

    async def healthy(event: Event) -> None:  # B's tool works
        handled_b[event.msg_id] = handled_b.get(event.msg_id, 0) + 1

    worker_b = h.worker(server.url, stream, concurrency=4, max_deliveries=1,
                        consumer_name="healthy-b")
    worker_b.add_handler(healthy)
    await worker_b.start()

    server.kill()
    handlers_a.gate.set()
    await eventually(lambda: len(handlers_a.raised) == 4, timeout_s=5, what="A's handlers raise")
    await asyncio.sleep(0.5)
    server.start()
    fresh = await publish(h.coordinator(server.url, stream), "ok", 20)
    raw = h.raw(server.url)

    held: dict[str, str] = {}

    async def all_settled() -> bool:
        done = set(handlers_a.handled) | set(handled_b)
        dead = await dead_letters(raw, stream)
        held.clear()
        held.update(await pending(raw, stream))
        return all(i in done or i in dead for i in failing + fresh) and not held

    bound = VISIBILITY_MS / 1000 + RECLAIM_S + 6.0
    await eventually(all_settled, timeout_s=bound,
                     what=lambda: f"every event handled or dead-lettered, none pending (pending: "
                          f"{held}; A {worker_alive(worker_a)[1]})")


# --------------------------------------------------------------------------- 2, 3: OOM


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_oom_while_handlers_reject_keeps_the_worker_handling(
        h: Harness, kind: str) -> None:
    """Issue 10 #1 (OOM): handlers ``Reject`` while writes fail with OOM (the dead-letter move
    gets BackpressureError); once memory is back the worker handles new events, no task died,
    and the rejected events are dead-lettered or still pending, never lost."""
    server = h.server(kind)
    stream = new_stream()
    raw = h.raw(server.url)
    handlers = FailingHandlers(lambda: Reject("bad input"))
    worker = h.worker(server.url, stream, concurrency=4)
    worker.add_handler(handlers.handle)
    await worker.start()
    rejected = await publish(h.coordinator(server.url, stream), "fail", 4)
    await eventually(lambda: len(handlers.entered) == 4, timeout_s=5,
                     what="4 rejecting handlers to start")

    await raw.config_set("maxmemory", "1")  # noeviction (the default): every write fails
    handlers.gate.set()
    await eventually(lambda: len(handlers.raised) == 4, timeout_s=5, what="handlers to reject")
    await asyncio.sleep(0.5)  # the OOM lasts a moment after the rejections
    await raw.config_set("maxmemory", "0")

    fresh = await publish(h.coordinator(server.url, stream), "ok", 20)
    await eventually(lambda: all(i in handlers.handled for i in fresh), timeout_s=5,
                     what=lambda: f"the 20 events published after the OOM to be handled "
                          f"(stats {worker.stats.as_dict()}, {worker_alive(worker)[1]})")
    alive, why = worker_alive(worker)
    assert alive, why
    dead = await dead_letters(raw, stream)
    held = await pending(raw, stream)
    lost = [i for i in rejected if i not in dead and i not in held]
    assert not lost, f"rejected events neither dead-lettered nor pending: {lost}"
    assert not set(rejected) & set(handlers.handled)


@pytest.mark.parametrize("position", ["first", "middle", "last"])
async def test_oom_with_a_malformed_entry_does_not_stall_its_batch(
        h: Harness, position: str) -> None:
    """Issue 10 #2: one batch of 10 good entries and a malformed one arrives while OOM (the
    malformed one cannot be dead-lettered). The good ones must all be handled within seconds
    of memory coming back, not only after the visibility timeout (10 s here)."""
    server = h.server("valkey")
    stream = new_stream()
    raw = h.raw(server.url)
    handled: dict[str, int] = {}

    async def handle(event: Event) -> None:
        handled[event.msg_id] = handled.get(event.msg_id, 0) + 1

    worker = h.worker(server.url, stream, concurrency=4, visibility_timeout_ms=10_000)
    worker.add_handler(handle)
    await worker.start()

    entries = [good_fields(n) for n in range(10)]
    at = {"first": 0, "middle": 5, "last": 10}[position]
    entries.insert(at, MALFORMED)
    # One transaction: the blocked read is served after EXEC, so it gets the whole batch, and
    # by then maxmemory is 1 byte (every write, the dead-letter XADD included, fails).
    pipe = raw.pipeline(transaction=True)
    for fields in entries:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
    pipe.config_set("maxmemory", "1")
    replies: list[Any] = await pipe.execute()
    ids = [r.decode() for r in replies[:-1]]
    bad_id = ids.pop(at)

    await eventually(lambda: worker.stats.malformed >= 1 or len(handled) == 10, timeout_s=5,
                     what="the batch to be delivered")
    await asyncio.sleep(0.3)  # the OOM lasts a moment after the failed dead-letter move
    await raw.config_set("maxmemory", "0")
    await eventually(lambda: all(i in handled for i in ids), timeout_s=3,
                     what=lambda: f"the 10 good entries of the batch to be handled "
                          f"({sum(i in handled for i in ids)}/10 so far, "
                          f"stats {worker.stats.as_dict()})")

    async def good_acked() -> bool:
        return not set(ids) & set(await pending(raw, stream))

    await eventually(good_acked, timeout_s=3, what="the good entries to be acknowledged")
    alive, why = worker_alive(worker)
    assert alive, why
    dead = await dead_letters(raw, stream)
    assert bad_id in dead or bad_id in await pending(raw, stream), "the malformed entry is lost"


# --------------------------------------------------------------------------- 4: connection loss


class FlakyHandlers:
    """Every event fails its first attempt (a retry is scheduled) and succeeds afterwards."""

    def __init__(self) -> None:
        self.first_failed: set[str] = set()
        self.succeeded: dict[str, int] = {}

    async def handle(self, event: Event) -> None:
        if event.msg_id not in self.first_failed:
            self.first_failed.add(event.msg_id)
            raise RuntimeError("transient tool failure")
        self.succeeded[event.msg_id] = self.succeeded.get(event.msg_id, 0) + 1


async def test_retries_survive_a_connection_cut_after_their_claim(h: Harness) -> None:
    """Issue 10 #3, deterministic: the connection is cut exactly when the retry loop sends its
    first XPENDING (after XCLAIM re-claimed a failed entry). Every retry must still run and
    succeed; none stays pending."""
    server = h.server("valkey")
    proxy = await h.proxy(server)
    stream = new_stream()
    handlers = FlakyHandlers()
    worker = h.worker(proxy.url, stream, concurrency=4, max_deliveries=10, retry_delay_s=0.3)
    worker.add_handler(handlers.handle)
    await worker.start()
    # Only the retry loop sends XPENDING while the worker reads new entries: cut the first two.
    proxy.arm("XPENDING", times=2)
    ids = await publish(h.coordinator(server.url, stream), "flaky", 11)
    await eventually(lambda: len(handlers.first_failed) == 11, timeout_s=5,
                     what="11 first attempts to fail")
    raw = h.raw(server.url)
    await eventually(lambda: all(i in handlers.succeeded for i in ids), timeout_s=10,
                     what=lambda: f"all 11 retries to succeed ({len(handlers.succeeded)}/11; cuts "
                          f"{proxy.cuts}; {worker_alive(worker)[1]})")

    async def nothing_pending() -> bool:
        return not await pending(raw, stream)

    await eventually(nothing_pending, timeout_s=5, what="the retried entries to be acked")
    alive, why = worker_alive(worker)
    assert alive, why


async def test_retries_survive_killed_connections(h: Harness) -> None:
    """Issue 10 #3, as an operator would cause it: while 11 retries are pending, the worker's
    own connections (client name ``agentstreams:<consumer>``) are killed again and again with
    CLIENT KILL ID for 1.5 s. All retries must eventually run and succeed."""
    server = h.server("valkey")
    stream = new_stream()
    raw = h.raw(server.url)
    handlers = FlakyHandlers()
    worker = h.worker(server.url, stream, concurrency=4, max_deliveries=20, retry_delay_s=0.2,
                      consumer_name="flaky-worker")
    worker.add_handler(handlers.handle)
    await worker.start()
    ids = await publish(h.coordinator(server.url, stream), "flaky", 11)
    await eventually(lambda: len(handlers.first_failed) == 11, timeout_s=5,
                     what="11 first attempts to fail")
    name = f"agentstreams:{worker.consumer}"
    killed = 0
    chaos_until = time.monotonic() + 1.5
    while time.monotonic() < chaos_until:
        clients: Any = await raw.client_list()
        for info in clients:
            if info.get("name") == name:  # only this worker's connections, never others'
                killed += int(await raw.client_kill_filter(_id=info["id"]))
        await asyncio.sleep(0.003)
    assert killed, "no connection of the worker was found to kill"
    await eventually(lambda: all(i in handlers.succeeded for i in ids), timeout_s=10,
                     what=lambda: f"all 11 retries to succeed after {killed} killed connections "
                          f"({len(handlers.succeeded)}/11; {worker_alive(worker)[1]})")

    async def nothing_pending() -> bool:
        return not await pending(raw, stream)

    await eventually(nothing_pending, timeout_s=5, what="the retried entries to be acked")
    alive, why = worker_alive(worker)
    assert alive, why


# --------------------------------------------------------------------------- 5: stuck worker


async def test_a_stuck_workers_queued_entries_are_claimed_by_a_replica(h: Harness) -> None:
    """Issue 10 (leases): worker A's only runner hangs on one event while 5 more sit in its
    prefetch. Leases must be renewed only for the running entry, so replica B claims the 5
    within visibility timeout + reclaim interval (+ margin), and never the running one."""
    server = h.server("valkey")
    stream = new_stream()
    raw = h.raw(server.url)
    never = asyncio.Event()
    hanging: set[str] = set()
    handled_a: set[str] = set()

    async def handle_a(event: Event) -> None:
        if event.type == "hang":
            hanging.add(event.msg_id)
            await never.wait()  # a tool call that never returns
        handled_a.add(event.msg_id)

    worker_a = h.worker(server.url, stream, concurrency=1, prefetch=10, consumer_name="stuck-a")
    worker_a.add_handler(handle_a)
    await worker_a.start()
    publisher = h.coordinator(server.url, stream)
    (hang_id,) = await publish(publisher, "hang", 1)
    await eventually(lambda: hang_id in hanging, timeout_s=5, what="A to start the hanging event")
    queued = await publish(publisher, "ok", 5, start=1)

    async def all_held_by_a() -> bool:
        held = await pending(raw, stream)
        return all(held.get(i) == "stuck-a" for i in [hang_id, *queued])

    # Today A prefetches the 5 behind its stuck handler. A worker that does not (it leaves them
    # in the stream for others) passes too: B must then read them itself, within the bound.
    prefetched = await holds_within(all_held_by_a, 3)

    handled_b: set[str] = set()

    async def handle_b(event: Event) -> None:
        handled_b.add(event.msg_id)

    worker_b = h.worker(server.url, stream, concurrency=4, consumer_name="healthy-b")
    worker_b.add_handler(handle_b)
    started = time.monotonic()
    await worker_b.start()
    bound = VISIBILITY_MS / 1000 + RECLAIM_S + 2.5
    await eventually(lambda: all(i in handled_b for i in queued), timeout_s=bound,
                     what=lambda: f"B to claim and handle the 5 entries queued behind A's "
                          f"stuck handler (B handled {len(handled_b & set(queued))}/5, A handled "
                          f"{len(handled_a)})")
    assert time.monotonic() - started <= bound
    assert hang_id not in handled_b, "B took the entry whose handler is still running on A"
    held = await pending(raw, stream)
    assert held.get(hang_id) == "stuck-a", f"the running entry's lease was not kept: {held}"
    if not prefetched:
        print("note: A did not prefetch the queued events; B read them from the stream")


# --------------------------------------------------------------------------- 6: permanent errors


async def _ok(event: Event) -> None:
    return None


async def acl(raw: aioredis.Redis, *args: str) -> None:
    """Run an ACL subcommand on the server (as the default user)."""
    await raw.execute_command("ACL", *args)  # type: ignore[no-untyped-call]


async def _start_must_raise(worker: Worker, expected: type[BaseException],
                            bound_s: float = 6.0) -> BaseException:
    """``worker.start()`` must raise ``expected`` within ``bound_s`` (not retry forever)."""
    started = time.monotonic()
    error: BaseException | None = None
    try:
        await asyncio.wait_for(worker.start(), bound_s)
    except TimeoutError:
        pytest.fail(f"Worker.start() neither returned nor raised within {bound_s}s: it retries "
                    f"a permanent error (expected {expected.__name__})")
    except Exception as exc:
        error = exc
    if error is None:
        pytest.fail(f"Worker.start() returned; expected {expected.__name__}")
    assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r}"
    assert isinstance(error, ConfigurationError | WrongTypeError)
    assert time.monotonic() - started <= bound_s
    return error


@pytest.mark.parametrize("password", ["wrong", None])
async def test_start_raises_on_bad_credentials(h: Harness, password: str | None) -> None:
    """Issue 10 #4: a wrong or missing password is an AuthenticationError from start()."""
    server = h.server("valkey")
    # Set after start: LocalServer waits for a PING that must not need a password.
    await h.raw(server.url).config_set("requirepass", "s3cret")
    url = f"redis://:{password}@127.0.0.1:{server.port}" if password else server.url
    worker = h.worker(url, new_stream())
    worker.add_handler(_ok)
    await _start_must_raise(worker, AuthenticationError)


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_start_raises_when_xreadgroup_is_denied(h: Harness, kind: str) -> None:
    """Issue 10 #4: an ACL user that may not XREADGROUP gets PermissionDeniedError from
    start() (today the read loop logs and retries forever, and start() never returns)."""
    server = h.server(kind)
    raw = h.raw(server.url)
    await acl(raw, "SETUSER", "noread", "on", ">pw", "~*", "&*", "+@all", "-xreadgroup")
    worker = h.worker(f"redis://noread:pw@127.0.0.1:{server.port}", new_stream())
    worker.add_handler(_ok)
    exc = await _start_must_raise(worker, PermissionDeniedError)
    assert isinstance(exc, PermissionDeniedError)
    assert exc.command == "XREADGROUP" or "XREADGROUP" in str(exc).upper(), exc


async def test_start_raises_when_the_key_is_not_a_stream(h: Harness) -> None:
    """Issue 10 #4: the stream key holds a string: WrongTypeError from start()."""
    server = h.server("valkey")
    raw = h.raw(server.url)
    stream = new_stream()
    await raw.set(stream, "not a stream")
    worker = h.worker(server.url, stream)
    worker.add_handler(_ok)
    await _start_must_raise(worker, WrongTypeError)


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_run_raises_when_a_permission_is_revoked(h: Harness, kind: str) -> None:
    """Issue 10 #4: XREADGROUP revoked from a running worker's ACL user: ``run()`` ends with
    PermissionDeniedError within seconds instead of spinning on the denied command."""
    server = h.server(kind)
    raw = h.raw(server.url)
    await acl(raw, "SETUSER", "agent", "on", ">pw", "~*", "&*", "+@all")
    stream = new_stream()
    handled: set[str] = set()

    async def handle(event: Event) -> None:
        handled.add(event.msg_id)

    worker = h.worker(f"redis://agent:pw@127.0.0.1:{server.port}", stream)
    worker.add_handler(handle)
    run = h.spawn(worker.run(install_signal_handlers=False), "worker-run")
    (first,) = await publish(h.coordinator(server.url, stream), "ok", 1)
    await eventually(lambda: first in handled, timeout_s=5, what="the worker to handle an event")

    await acl(raw, "SETUSER", "agent", "-xreadgroup")
    done, _ = await asyncio.wait([run], timeout=6)
    assert done, "run() still running 6 s after XREADGROUP was revoked: it spins on NOPERM"
    exc = run.exception()
    assert isinstance(exc, PermissionDeniedError), f"run() ended with {exc!r}"


# --------------------------------------------------------------------------- 7, 8: bounds


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_first_publish_after_a_restart_lands_and_is_handled(
        h: Harness, kind: str) -> None:
    """Issue 10 (held-out probe "the first publish after a server restart"): a coordinator and
    a worker connected before a kill -9 + AOF restart; the first publish afterwards succeeds
    without the caller retrying, and the same worker handles it within 2 s + backoff."""
    server = h.server(kind, appendonly=True)
    stream = new_stream()
    handled: set[str] = set()

    async def handle(event: Event) -> None:
        handled.add(event.msg_id)

    worker = h.worker(server.url, stream)
    worker.add_handler(handle)
    await worker.start()
    coordinator = h.coordinator(server.url, stream)
    (before,) = await publish(coordinator, "ok", 1)
    await eventually(lambda: before in handled, timeout_s=5, what="the first event handled")
    server.restart()
    msg_id = await asyncio.wait_for(coordinator.publish("ok", {"n": 1}), 10)
    await eventually(lambda: msg_id in handled, timeout_s=5,
                     what=lambda: f"the first event after the restart to be handled "
                                  f"({worker_alive(worker)[1]})")


@pytest.mark.parametrize("when", ["before", "during"])
async def test_bounded_subscribe_ends_while_the_server_is_down(h: Harness, when: str) -> None:
    """Issue 10 #6: ``subscribe(max_events=1, timeout_ms=1000)`` with the server killed (and not
    restarted) raises ConnectionLostError within its timeout + a small constant."""
    server = h.server("valkey")
    coordinator = h.coordinator(server.url, new_stream(), consumer_group=GROUP)
    await coordinator.initialize()
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in coordinator.subscribe(max_events=1, timeout_ms=1000):
            got.append(event)

    if when == "before":
        server.kill()
    started = time.monotonic()
    task = h.spawn(consume(), "subscribe")
    if when == "during":
        await asyncio.sleep(0.2)  # the blocking read is in flight
        server.kill()
    done, _ = await asyncio.wait([task], timeout=10)
    elapsed = time.monotonic() - started
    assert done, "subscribe(max_events=1, timeout_ms=1000) still retrying 10 s into the outage"
    assert isinstance(task.exception(), ConnectionLostError), f"ended with {task.exception()!r}"
    assert elapsed <= 1.0 + 2.5, f"took {elapsed:.1f}s for a 1 s timeout"
    assert not got


async def test_stop_returns_within_its_timeout_while_the_server_is_frozen(h: Harness) -> None:
    """Issue 10 #8: ``stop(timeout_s=1)`` with the server frozen (SIGSTOP), two handlers still
    running and two just finished (their acks cannot reach the server) returns within
    timeout_s + 1.5 s."""
    server = h.server("valkey")
    stream = new_stream()
    gates: dict[str, asyncio.Event] = {}

    async def handle(event: Event) -> None:
        gate = gates.setdefault(event.msg_id, asyncio.Event())
        await gate.wait()

    worker = h.worker(server.url, stream, concurrency=4)
    worker.add_handler(handle)
    await worker.start()
    ids = await publish(h.coordinator(server.url, stream), "slow", 4)
    await eventually(lambda: all(i in gates for i in ids), timeout_s=5,
                     what="4 handlers to be running")

    server.pause()
    gates[ids[0]].set()  # these two finish: their acks meet the frozen server
    gates[ids[1]].set()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(worker.stop(timeout_s=1), 30)
    elapsed = time.monotonic() - started
    assert elapsed <= 1 + 1.5, f"stop(timeout_s=1) took {elapsed:.1f}s with the server frozen"


# --------------------------------------------------------------------------- 9: documented limits


@pytest.mark.parametrize("reason", ["malformed", "rejected"])
async def test_dead_letters_keep_every_original_field(h: Harness, reason: str) -> None:
    """Issue 10 #9: README says a dead letter keeps the original fields unchanged. An entry
    with 5,000 fields that is malformed (or rejected by its handler) lands in the DLQ with all
    5,000, and leaves the pending list."""
    server = h.server("valkey")
    stream = new_stream()
    raw = h.raw(server.url)

    async def handle(event: Event) -> None:
        raise Reject("not for us")

    fields = dict(MALFORMED) if reason == "malformed" else good_fields(0, "reject")
    for i in range(5000 - len(fields)):
        fields[f"f{i:04d}".encode()] = f"value-{i}".encode()
    assert len(fields) == 5000
    added: Any = await raw.xadd(stream, fields)  # type: ignore[arg-type]
    msg_id = added.decode()

    worker = h.worker(server.url, stream)
    worker.add_handler(handle)
    await worker.start()

    async def dead_lettered() -> bool:
        return msg_id in await dead_letters(raw, stream)

    await eventually(dead_lettered, timeout_s=5,
                     what=lambda: f"the 5,000-field entry to be dead-lettered (stats "
                          f"{worker.stats.as_dict()})")
    letter = (await dead_letters(raw, stream))[msg_id]
    assert letter[b"reason"] == reason.encode()
    missing = [k for k, v in fields.items() if letter.get(k) != v]
    assert not missing, (f"the dead letter lost {len(missing)} of 5000 original fields "
                         f"(it has {len(letter)} fields; first missing {missing[:3]})")
    assert msg_id not in await pending(raw, stream)


async def test_one_size_rule_for_publishing_and_consuming(h: Harness) -> None:
    """Issue 10 #9: the size limit is one rule on both sides. Every event near the limit is
    either refused by ``publish`` (PayloadTooLargeError) or handled by a worker with the same
    ``max_event_bytes``: never accepted by one and dead-lettered as malformed by the other."""
    server = h.server("valkey")
    stream = new_stream()
    raw = h.raw(server.url)
    limit = 2000
    handled: set[str] = set()

    async def handle(event: Event) -> None:
        handled.add(event.msg_id)

    worker = h.worker(server.url, stream, max_event_bytes=limit)
    worker.add_handler(handle)
    await worker.start()
    coordinator = h.coordinator(server.url, stream, max_event_bytes=limit)
    accepted: list[str] = []
    refused = 0
    for size in range(limit - 300, limit + 40, 7):
        try:
            accepted.append(await coordinator.publish("sized", {"blob": "x" * size}))
        except PayloadTooLargeError:
            refused += 1
    assert refused, "nothing was refused: the test did not reach the limit"
    assert accepted, "everything was refused: the test did not start below the limit"

    async def settled() -> bool:
        dead = await dead_letters(raw, stream)
        return all(i in handled or i in dead for i in accepted)

    await eventually(settled, timeout_s=5, what="every accepted event handled or dead-lettered")
    dead = await dead_letters(raw, stream)
    rejected = {i: dead[i].get(b"error", b"").decode() for i in accepted if i in dead}
    assert not rejected, (f"{len(rejected)} events accepted by publish were dead-lettered by "
                          f"the worker: {next(iter(rejected.values()))}")

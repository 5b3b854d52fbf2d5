"""``Worker``: runs handlers for a consumer group with at-least-once delivery.

What it guarantees, and how:

* An event is acknowledged only after its handler returned (acks are batched: while one XACK
  round trip is in flight the next ones accumulate, so an idle worker adds no latency).
* A handler that raises is retried with exponential backoff; every attempt is counted by the
  server (the retry re-claims the entry with XCLAIM, which raises its delivery count). After
  ``max_deliveries`` attempts the entry moves to ``{stream}:dlq`` atomically with the error.
* At start-up the worker finishes its own pending entries first. In the background it claims
  entries other consumers have held longer than ``visibility_timeout_ms`` (XAUTOCLAIM,
  following the cursor), and removes consumers that are long gone and own nothing.
* While a handler runs, the lease on its entry is renewed (XCLAIM JUSTID, not a delivery), so a
  slow handler is never stolen by the reclaimer of another worker.
* Reads are bytes, decoded per entry: one bad entry is dead-lettered as ``malformed`` and the
  rest of the batch goes on. Lost connections are retried with jittered backoff; a blocking read
  always returns before the socket timeout, so a half-open connection is noticed.
* ``stop()`` / SIGTERM / SIGINT: stop reading, let in-flight handlers finish up to a deadline,
  acknowledge them, exit. What did not finish stays pending for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from agentstreams import _scripts as scripts
from agentstreams._codec import decode_entry
from agentstreams._connection import Backoff, ConnectionSettings, Redis, call, create_client
from agentstreams._constants import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_VISIBILITY_TIMEOUT_MS,
    DLQ_REASON_MALFORMED,
    DLQ_REASON_MAX_DELIVERIES,
    DLQ_REASON_REJECTED,
    SOCKET_TIMEOUT_MARGIN_S,
)
from agentstreams._dlq import dead_letter, format_error
from agentstreams._events import Event, EventType
from agentstreams._lifecycle import serve_until_stopped
from agentstreams._observe import Observer, get_observer
from agentstreams._streams import (
    RawEntry,
    autoclaim_all,
    delivery_counts,
    ensure_group,
    entries_from_read_reply,
    first_field,
    to_str,
    validate_name,
)
from agentstreams.errors import (
    AgentStreamsError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    MalformedEventError,
    Reject,
    Retry,
)
from agentstreams.tracing import NO_SPAN, handler_span

__all__ = ["Handler", "Worker", "WorkerStats"]

logger = logging.getLogger("agentstreams.worker")

Handler = Callable[[Event], Awaitable[Any]]

#: Handler key for "every event type".
_ANY = "*"
#: How many XACK ids go into one command at most.
ACK_BATCH_MAX = 1000
#: Delay before the first reconnect attempt; grows to RECONNECT_CAP_S.
RECONNECT_BASE_S = 0.05
RECONNECT_CAP_S = 5.0


#: With the default prefetch, while handlers are fast the worker may hold up to this much
#: estimated queued work (seconds per concurrency slot) beyond the running handlers, up to
#: ``read_count`` entries: cheap events then cost one read and one ack per batch, and a replica
#: still never sits on more than a moment's work that another replica could have taken.
PREFETCH_WORK_BUDGET_S = 0.05
#: Weight of the newest handler duration in the running average that sizes the prefetch.
HANDLER_TIME_EWMA = 0.05


#: How long stop() waits for a cancelled background task before giving up on it. redis-py can
#: turn a cancellation into a connection error; the loops then notice the stop flag instead.
TASK_SETTLE_TIMEOUT_S = 5.0


async def _settle(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for cancelled tasks to finish, without hanging on one that swallowed its cancel."""
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=TASK_SETTLE_TIMEOUT_S)
    for task in pending:
        logger.warning("background task %s did not stop in time", task.get_name(),
                       extra={"task": task.get_name()})
        task.cancel()


def _entries_fast(reply: Any) -> list[RawEntry] | None:
    """The entries of a RESP2 XREADGROUP reply on one stream from a bytes client, without
    copying their field dicts; None when the reply has another shape (use the general path)."""
    if not reply:
        return []
    if type(reply) is not list or len(reply) != 1:
        return None
    out: list[RawEntry] = []
    for msg_id, fields in reply[0][1]:
        if type(msg_id) is not bytes or (fields and type(fields) is not dict):
            return None
        out.append((msg_id.decode(), fields or None))
    if out and out[0][1] is not None:
        first_key = next(iter(out[0][1]))  # a decode_responses client gives str: general path
        if type(first_key) is not bytes:
            return None
    return out


#: (server, warning) pairs already logged by this process: see Worker._probe_server.
_SERVER_WARNINGS_LOGGED: set[tuple[str, str]] = set()


@dataclass(slots=True)
class WorkerStats:
    """Counters since the worker started."""

    delivered: int = 0
    acked: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    unhandled: int = 0
    claimed: int = 0
    lost: int = 0
    reconnects: int = 0
    leases_renewed: int = 0
    leases_lost: int = 0
    consumers_removed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass(slots=True)
class _InFlight:
    event: Event
    #: monotonic time of the delivery or of the last lease renewal
    leased_at: float
    #: True while a handler runs it (False while queued or waiting for a retry)
    running: bool = False


class Worker:
    """Consumes one stream in one consumer group and runs your handlers.

    A consumer group is the unit of subscription: every event of the stream reaches the group
    once, and event types no handler of this worker takes are acknowledged and counted as
    ``unhandled`` (give each kind of work its own group, or its own stream).
    """

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379",
        stream_name: str = "agent_events",
        consumer_group: str = "workers",
        consumer_name: str | None = None,
        *,
        client: Redis | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        block_ms: int = 2000,
        prefetch: int | None = None,
        read_count: int = 500,
        lease_renewal: bool = True,
        lease_interval_ms: int | None = None,
        reclaim_interval_ms: int | None = None,
        retry_delay_s: float = 1.0,
        retry_delay_max_s: float = 60.0,
        handler_timeout_s: float | None = None,
        shutdown_timeout_s: float = 30.0,
        consumer_cleanup_idle_ms: int | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        group_start_id: str = "0",
        probe_server: bool = True,
        observer: Observer | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.stream = validate_name("stream_name", stream_name)
        self.group = validate_name("consumer_group", consumer_group)
        self.consumer = (validate_name("consumer_name", consumer_name) if consumer_name
                         else f"worker-{uuid.uuid4().hex[:10]}")
        for name, value, minimum in (
            ("concurrency", concurrency, 1), ("visibility_timeout_ms", visibility_timeout_ms, 1),
            ("max_deliveries", max_deliveries, 1), ("block_ms", block_ms, 1),
            ("max_event_bytes", max_event_bytes, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, "
                                           f"got {value!r}")
        if retry_delay_s < 0 or retry_delay_max_s < retry_delay_s:
            raise InvalidArgumentError("need 0 <= retry_delay_s <= retry_delay_max_s")
        if handler_timeout_s is not None and handler_timeout_s <= 0:
            raise InvalidArgumentError("handler_timeout_s must be positive (or None)")
        if shutdown_timeout_s < 0:
            raise InvalidArgumentError("shutdown_timeout_s must be >= 0")
        self.concurrency = concurrency
        self.visibility_timeout_ms = visibility_timeout_ms
        self.max_deliveries = max_deliveries
        self.block_ms = block_ms
        #: entries held locally beyond the running ones; small keeps replicas load-balanced.
        #: The default also widens (up to read_count) while handlers are fast; an explicit
        #: prefetch is a hard bound.
        self.prefetch = prefetch if prefetch is not None else max(concurrency, 32)
        self._adaptive_prefetch = prefetch is None
        #: running average of handler durations (seconds), None until the first one
        self._handler_avg_s: float | None = None
        if self.prefetch < 0 or read_count < 1:
            raise InvalidArgumentError("prefetch must be >= 0 and read_count >= 1")
        self.read_count = read_count
        self.lease_renewal = lease_renewal
        self.lease_interval_s = (lease_interval_ms or max(visibility_timeout_ms // 3, 50)) / 1000
        if lease_renewal and self.lease_interval_s * 1000 >= visibility_timeout_ms:
            raise InvalidArgumentError("lease_interval_ms must be shorter than "
                                       "visibility_timeout_ms, or leases expire between renewals")
        self.reclaim_interval_s = (reclaim_interval_ms
                                   or max(min(visibility_timeout_ms // 2, 30_000), 50)) / 1000
        self.retry_delay_s = retry_delay_s
        self.retry_delay_max_s = retry_delay_max_s
        self.handler_timeout_s = handler_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.consumer_cleanup_idle_ms = consumer_cleanup_idle_ms or max(
            visibility_timeout_ms * 10, 600_000)
        self.max_event_bytes = max_event_bytes
        self.group_start_id = group_start_id
        self.probe_server = probe_server
        self.observer = observer
        #: serve Prometheus metrics on this port from start() to stop() (extra ``metrics``)
        self.metrics_port = metrics_port
        self._metrics: Any = None
        #: how many entries may be held locally (running + queued + waiting to retry)
        self.max_in_flight = concurrency + self.prefetch

        self._external_client = client
        self._settings = None if client is not None else ConnectionSettings(
            url=redis_url,
            socket_timeout_s=block_ms / 1000 + SOCKET_TIMEOUT_MARGIN_S,
            # Our loops retry with backoff; redis-py's own retries would multiply the time a
            # read hangs on a half-open connection.
            command_retries=0,
            client_name=f"agentstreams:{self.consumer}",
        )
        self._client: Redis | None = None
        self._handlers: dict[str, Handler] = {}
        self.stats = WorkerStats()
        #: What the start-up probe found risky about the server (durability, eviction).
        self.server_warnings: list[str] = []
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        #: set once in-flight work is over: the acker and lease renewer may end too
        self._closing = False
        #: Events decoded and waiting for a runner. Runners drain it in a loop: a handler that
        #: never suspends costs no task switch per event, and one that awaits I/O lets the
        #: other runners take the next events (at most ``concurrency`` run at once).
        self._ready: deque[Event] = deque()
        #: Futures of runners waiting for work (woken one per new event, see _wake_runners).
        self._idle_runners: list[asyncio.Future[None]] = []
        self._in_flight: dict[str, _InFlight] = {}
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._ack_pending: list[str] = []
        #: ids acknowledged while a re-read of pending entries (or a reclaim) was in flight;
        #: such a read may still return them, and they must not run twice (see _settled_ids)
        self._acked_while_reading: set[str] = set()
        self._rereads = 0
        self._ack_wakeup = asyncio.Event()
        self._ack_lock = asyncio.Lock()
        self._retry_heap: list[tuple[float, int, str]] = []
        self._retry_wakeup = asyncio.Event()
        self._retry_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[asyncio.Task[None]] = []
        self._started = False
        self._lease_script: Any = None
        self._cleanup_script: Any = None

    # ---------------------------------------------------------------- handlers

    def handler(self, *event_types: str | EventType) -> Callable[[Handler], Handler]:
        """Decorator: register an async handler for these event types (none = every type)."""

        def register(fn: Handler) -> Handler:
            self.add_handler(fn, *event_types)
            return fn

        return register

    def add_handler(self, fn: Handler, *event_types: str | EventType) -> None:
        """Register ``fn`` for ``event_types`` (none = every type without its own handler)."""
        if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)):  # noqa: B004 - async callables are allowed
            raise InvalidArgumentError(f"handler {fn!r} must be an async function (async def)")
        keys = [t.value if isinstance(t, EventType) else t for t in event_types] or [_ANY]
        for key in keys:
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError(f"event types must be non-empty strings, got {key!r}")
            if key in self._handlers:
                raise InvalidArgumentError(f"a handler for {key!r} is already registered")
            self._handlers[key] = fn

    # ---------------------------------------------------------------- lifecycle

    @property
    def client(self) -> Redis:
        """The Redis client (after start)."""
        if self._client is None:
            raise AgentStreamsError("the worker has not been started")
        return self._client

    def _obs(self) -> Observer:
        return self.observer or get_observer()

    def _log_extra(self, **more: Any) -> dict[str, Any]:
        return {"stream": self.stream, "group": self.group, "consumer": self.consumer, **more}

    async def start(self) -> None:
        """Connect, create the group, start the loops; returns once the first read is issued."""
        if self._started:
            return
        if not self._handlers:
            raise InvalidArgumentError("register at least one handler before starting the worker")
        self._started = True
        if self.metrics_port is not None:
            from agentstreams.metrics import attach_worker_metrics

            self._metrics = attach_worker_metrics(
                self, self.metrics_port,
                redis_url=self._settings.url if self._settings is not None else None)
        if self._external_client is not None:
            self._client = self._external_client
        else:
            assert self._settings is not None
            self._client = create_client(self._settings)
        self._lease_script = self._client.register_script(scripts.RENEW_LEASES)
        self._cleanup_script = self._client.register_script(scripts.DELETE_IDLE_CONSUMER)
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        while True:
            try:
                await call(lambda: ensure_group(self.client, self.stream, self.group,
                                                self.group_start_id),
                           stream=self.stream, group=self.group)
                break
            except ConnectionLostError as exc:
                if self._stopping.is_set():
                    raise
                delay = backoff.next_delay()
                logger.warning("cannot reach the server (%s); retrying in %.2fs", exc, delay,
                               extra=self._log_extra())
                await asyncio.sleep(delay)
        if self.probe_server:
            await self._probe_server()
        self._runners = [asyncio.create_task(self._runner(), name=f"agentstreams-runner-{i}")
                         for i in range(self.concurrency)]
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="agentstreams-reader"),
            asyncio.create_task(self._ack_loop(), name="agentstreams-acker"),
            asyncio.create_task(self._retry_loop(), name="agentstreams-retrier"),
            asyncio.create_task(self._reclaim_loop(), name="agentstreams-reclaimer"),
        ]
        if self.lease_renewal:
            self._tasks.append(asyncio.create_task(self._lease_loop(),
                                                   name="agentstreams-leases"))
        ready = asyncio.create_task(self.ready.wait())
        failed = asyncio.create_task(self._stopped.wait())
        await asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        failed.cancel()
        logger.info("worker %s consuming %r as group %r", self.consumer, self.stream, self.group,
                    extra=self._log_extra())

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Start and process events until ``stop()``, SIGTERM or SIGINT; then shut down."""
        await serve_until_stopped(self.start, self.stop, self._stopping,
                                  install_signal_handlers=install_signal_handlers)

    def request_stop(self) -> None:
        """Ask the worker to stop (non-blocking; ``run()`` returns once it has)."""
        self._stopping.set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop reading, give in-flight handlers up to ``timeout_s`` to finish, ack, close."""
        self._stopping.set()
        if not self._started or self._stopped.is_set():
            self._stopped.set()
            return
        deadline = time.monotonic() + (self.shutdown_timeout_s if timeout_s is None
                                       else timeout_s)
        for task in self._tasks:
            if task.get_name() in ("agentstreams-reader", "agentstreams-reclaimer",
                                   "agentstreams-retrier"):
                task.cancel()
        # Queued but unstarted events are released: they stay pending for the others.
        while self._ready:
            self._release(self._ready.popleft().msg_id)
        self._retry_heap.clear()
        for msg_id in [m for m, f in self._in_flight.items() if not f.running]:
            self._release(msg_id)
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(),
                                       timeout=max(0.0, deadline - time.monotonic()))
        unfinished = len(self._in_flight)
        self._closing = True
        for runner in self._runners:
            runner.cancel()
        await _settle(self._runners)
        await self._flush_acks(final=True)
        for task in self._tasks:
            task.cancel()
        await _settle(self._tasks)
        if unfinished:
            logger.warning("stopped with %d handlers unfinished; their events stay pending and "
                           "will be redelivered", unfinished, extra=self._log_extra())
        if self._client is not None and self._client is not self._external_client:
            await self._client.aclose()
        self._stopped.set()
        if self._metrics is not None:
            self._metrics.close()
        logger.info("worker %s stopped: %s", self.consumer, self.stats.as_dict(),
                    extra=self._log_extra())

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _probe_server(self) -> None:
        """Warn in plain words when the server's settings can lose events."""
        try:
            appendonly = await self.client.config_get("appendonly")
            policy = await self.client.config_get("maxmemory-policy")
        except Exception as exc:  # CONFIG may be forbidden by ACLs or a managed service
            logger.debug("could not probe the server configuration: %s", exc,
                         extra=self._log_extra())
            return
        aof = to_str(first_field(appendonly, "appendonly"))
        eviction = to_str(first_field(policy, "maxmemory-policy"))
        warnings: list[str] = []
        if aof and aof != "yes":
            warnings.append(
                f"the server has appendonly={aof}: if it crashes, every event written since its "
                "last snapshot is lost. Set 'appendonly yes' (appendfsync everysec or always) "
                "for durable events.")
        if eviction.startswith("allkeys"):
            warnings.append(
                f"the server's maxmemory-policy is {eviction}: under memory pressure it may "
                "evict the stream and its consumer groups. Use 'noeviction'.")
        self.server_warnings = warnings
        # Many workers in one process (an AgentWorker hosts one per agent) share a server:
        # say each thing once per process and server, not once per worker.
        kwargs = self.client.connection_pool.connection_kwargs
        server = repr([kwargs.get(k) for k in ("host", "port", "path", "db")])
        for text in warnings:
            if (server, text) not in _SERVER_WARNINGS_LOGGED:
                _SERVER_WARNINGS_LOGGED.add((server, text))
                logger.warning("%s", text, extra=self._log_extra())

    # ---------------------------------------------------------------- reading

    def _in_flight_limit(self) -> int:
        """How many entries may be held locally now: ``max_in_flight``, or more while the
        default prefetch sees handlers fast enough (see PREFETCH_WORK_BUDGET_S)."""
        average = self._handler_avg_s
        if not self._adaptive_prefetch or average is None:
            return self.max_in_flight
        affordable = int(self.concurrency * PREFETCH_WORK_BUDGET_S / max(average, 1e-7))
        return self.concurrency + max(self.prefetch, min(affordable, self.read_count))

    async def _wait_for_capacity(self, batch: bool = False) -> int:
        """Wait for room to hold more entries; return how many fit.

        With ``batch`` (the read loop), wait until half the room is free, so that a full read
        is not followed by a string of small ones while the batch is being worked off.
        """
        while True:
            limit = self._in_flight_limit()
            free = limit - len(self._in_flight)
            if free >= (max(1, limit // 2) if batch else 1):
                return free
            self._capacity.clear()
            await self._capacity.wait()

    async def _read_loop(self) -> None:
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        pending_cursor: str | None = "0"
        while not self._stopping.is_set():
            try:
                free = await self._wait_for_capacity(batch=True)
                count = min(free, self.read_count)
                if pending_cursor is not None:
                    with self._rereading():
                        entries = await self._xreadgroup(pending_cursor, count, None)
                        if not entries:
                            pending_cursor = None
                            continue
                        pending_cursor = entries[-1][0]
                        entries = self._drop_settled(entries)
                        counts = await delivery_counts(self.client, self.stream, self.group,
                                                       [e[0] for e in entries], self.consumer)
                    await self._accept(entries, counts)
                else:
                    self.ready.set()
                    entries = await self._xreadgroup(">", count, self.block_ms)
                    if entries:
                        await self._accept(entries, None)
                        # Let the runners start on these before the next read is written:
                        # that write would otherwise sit between delivery and the handler.
                        await asyncio.sleep(0)
                backoff.reset()
            except GroupNotFoundError:
                logger.warning("group %r is gone from %r (stream deleted?); re-creating it",
                               self.group, self.stream, extra=self._log_extra())
                with contextlib.suppress(AgentStreamsError):
                    await call(lambda: ensure_group(self.client, self.stream, self.group, "0"),
                               stream=self.stream, group=self.group)
                pending_cursor = "0"
            except ConnectionLostError as exc:
                self.stats.reconnects += 1
                self._obs().on_reconnect(self.stream, self.group)
                delay = backoff.next_delay()
                logger.warning("connection lost (%s); reconnecting in %.2fs", exc, delay,
                               extra=self._log_extra())
                await asyncio.sleep(delay)
                pending_cursor = "0"  # a lost reply may have left entries pending for us
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("unexpected error in the read loop; continuing",
                                 extra=self._log_extra())
                await asyncio.sleep(backoff.next_delay())

    @contextlib.contextmanager
    def _rereading(self) -> Iterator[None]:
        """Record acknowledgements made while entries we may already hold are re-read."""
        self._rereads += 1
        try:
            yield
        finally:
            self._rereads -= 1
            if not self._rereads:
                self._acked_while_reading.clear()

    def _drop_settled(self, entries: Sequence[RawEntry]) -> list[RawEntry]:
        """Leave out re-read entries this worker already holds, handled or not.

        After a lost connection the pending list still names entries whose handler finished
        but whose XACK has not gone through yet (or went through after the read was served).
        Running them again would be a silent duplicate.
        """
        settled = self._acked_while_reading.union(self._ack_pending)
        in_flight = self._in_flight
        return [e for e in entries if e[0] not in in_flight and e[0] not in settled]

    async def _xreadgroup(self, start_id: str, count: int,
                          block_ms: int | None) -> list[RawEntry]:
        reply = await call(
            lambda: self.client.xreadgroup(self.group, self.consumer, {self.stream: start_id},
                                           count=count, block=block_ms),
            stream=self.stream, group=self.group)
        return _entries_fast(reply) or entries_from_read_reply(reply)

    async def _accept(self, entries: Sequence[RawEntry], counts: Mapping[str, int] | None, *,
                      retry: bool = False) -> None:
        """Decode entries and queue them; dead-letter what cannot or must not run."""
        if not retry:
            self.stats.delivered += len(entries)
            self._obs().on_delivered(self.stream, self.group, len(entries))
        unhandled: list[str] = []
        now = time.monotonic()
        for msg_id, fields in entries:
            if msg_id in self._in_flight:
                continue  # already running here (re-read after a reconnect)
            deliveries = 1 if counts is None else counts.get(msg_id, 1)
            if fields is None:
                self.stats.lost += 1
                self._obs().on_lost(self.stream, self.group, 1)
                logger.warning("pending entry %s was deleted or trimmed before it was "
                               "acknowledged; it is lost", msg_id,
                               extra=self._log_extra(msg_id=msg_id))
                unhandled.append(msg_id)
                continue
            if deliveries > self.max_deliveries:
                await self._dead_letter(msg_id, fields, DLQ_REASON_MAX_DELIVERIES,
                                        f"delivered {deliveries} times without being "
                                        "acknowledged (its consumers crashed or timed out)",
                                        deliveries)
                continue
            try:
                event = decode_entry(msg_id, fields, stream=self.stream,
                                     delivery_count=deliveries,
                                     max_event_bytes=self.max_event_bytes)
            except MalformedEventError as exc:
                self.stats.malformed += 1
                self._obs().on_malformed(self.stream, self.group)
                await self._dead_letter(msg_id, fields, DLQ_REASON_MALFORMED, exc.reason,
                                        deliveries)
                continue
            if event.data["type"] not in self._handlers and _ANY not in self._handlers:
                self.stats.unhandled += 1
                self._obs().on_unhandled(self.stream, self.group, event.type)
                unhandled.append(msg_id)
                continue
            self._in_flight[msg_id] = _InFlight(event, now)
            self._ready.append(event)
        if self._in_flight:
            self._drained.clear()
        self._wake_runners()
        if unhandled:
            self._enqueue_acks(unhandled)

    # ---------------------------------------------------------------- running handlers

    def _wake_runners(self) -> None:
        """Wake as many idle runners as there are ready events (no more: a woken runner
        that finds nothing costs a task switch)."""
        idle = self._idle_runners
        for _ in range(min(len(self._ready), len(idle))):
            future = idle.pop()
            if not future.done():
                future.set_result(None)

    async def _runner(self) -> None:
        ready = self._ready
        in_flight = self._in_flight
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not ready:
                future: asyncio.Future[None] = loop.create_future()
                self._idle_runners.append(future)
                try:
                    await future
                finally:
                    if future in self._idle_runners:  # cancelled while idle
                        self._idle_runners.remove(future)
                continue
            event = ready.popleft()
            flight = in_flight.get(event.msg_id)
            if flight is None:
                continue
            flight.running = True
            await self._run_one(event)

    async def _run_one(self, event: Event) -> None:
        event_type: str = event.data["type"]  # a non-empty str: decode_entry checked it
        handler = self._handlers.get(event_type) or self._handlers[_ANY]
        span = handler_span(event, group=self.group, consumer=self.consumer)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            if span is NO_SPAN and self.handler_timeout_s is None:
                await handler(event)  # the common case, without a context manager around it
            else:
                with span:
                    if self.handler_timeout_s is None:
                        await handler(event)
                    else:
                        await asyncio.wait_for(handler(event), self.handler_timeout_s)
        except asyncio.CancelledError:
            # Shutdown deadline passed: leave the entry pending for another consumer.
            self._release(event.msg_id)
            raise
        except Exception as exc:
            error = exc
        duration = time.perf_counter() - started
        average = self._handler_avg_s
        self._handler_avg_s = duration if average is None else (
            average + HANDLER_TIME_EWMA * (duration - average))
        observer = self._obs()
        if type(observer) is not Observer:  # the base class does nothing: skip the call
            observer.on_handler_done(self.stream, self.group, event_type, duration,
                                     error is None)
        if error is None:
            self.stats.succeeded += 1
            self._ack_pending.append(event.msg_id)
            self._ack_wakeup.set()
            self._release(event.msg_id)
            return
        self.stats.failed += 1
        await self._handle_failure(event, error)

    async def _handle_failure(self, event: Event, error: BaseException) -> None:
        if isinstance(error, Reject):
            await self._dead_letter(event.msg_id, None, DLQ_REASON_REJECTED, error.reason,
                                    event.delivery_count, event=event)
            self._release(event.msg_id)
            return
        if event.delivery_count >= self.max_deliveries:
            await self._dead_letter(event.msg_id, None, DLQ_REASON_MAX_DELIVERIES,
                                    format_error(error), event.delivery_count, event=event)
            self._release(event.msg_id)
            return
        if isinstance(error, Retry):
            delay = error.delay_s
        else:
            delay = min(self.retry_delay_max_s,
                        self.retry_delay_s * (2 ** (event.delivery_count - 1)))
            logger.warning("handler for %s %s failed (attempt %d of %d): %s; retrying in %.2fs",
                           event.type, event.msg_id, event.delivery_count, self.max_deliveries,
                           format_error(error), delay,
                           extra=self._log_extra(msg_id=event.msg_id, event_type=event.type))
        self.stats.retried += 1
        self._obs().on_retried(self.stream, self.group, event.type)
        flight = self._in_flight.get(event.msg_id)
        if flight is None or self._stopping.is_set():
            self._release(event.msg_id)
            return
        flight.running = False
        self._retry_seq += 1
        heapq.heappush(self._retry_heap, (time.monotonic() + delay, self._retry_seq,
                                          event.msg_id))
        self._retry_wakeup.set()

    def _release(self, msg_id: str) -> None:
        """Forget an entry locally (acked, dead-lettered, or left pending for others)."""
        if self._in_flight.pop(msg_id, None) is not None:
            self._capacity.set()
            if not self._in_flight:
                self._drained.set()

    async def _retry_loop(self) -> None:
        """Re-claim failed entries when their backoff expires (XCLAIM counts the delivery)."""
        while not self._stopping.is_set():
            if not self._retry_heap:
                self._retry_wakeup.clear()
                await self._retry_wakeup.wait()
                continue
            due_at, _seq, msg_id = self._retry_heap[0]
            now = time.monotonic()
            if due_at > now:
                self._retry_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_wakeup.wait(), timeout=due_at - now)
                continue
            heapq.heappop(self._retry_heap)
            if msg_id not in self._in_flight:
                continue
            try:
                claimed = await call(
                    lambda m=msg_id: self.client.xclaim(  # type: ignore[misc]
                        self.stream, self.group, self.consumer, 0, [m]),
                    stream=self.stream, group=self.group)
            except ConnectionLostError:
                self._retry_seq += 1
                heapq.heappush(self._retry_heap, (time.monotonic() + 0.5, self._retry_seq,
                                                  msg_id))
                continue
            entries = entries_from_read_reply([(self.stream, claimed)]) if claimed else []
            self._release(msg_id)
            if not entries:
                continue  # acknowledged or deleted meanwhile: nothing to retry
            counts = await delivery_counts(self.client, self.stream, self.group, [msg_id],
                                           self.consumer)
            await self._accept(entries, counts, retry=True)

    # ---------------------------------------------------------------- acks and dead letters

    def _enqueue_acks(self, msg_ids: list[str]) -> None:
        self._ack_pending.extend(msg_ids)
        self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        while not self._closing:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            try:
                await self._flush_acks()
                backoff.reset()
            except ConnectionLostError as exc:
                delay = backoff.next_delay()
                logger.warning("could not acknowledge (%s); retrying in %.2fs", exc, delay,
                               extra=self._log_extra())
                await asyncio.sleep(delay)
                self._ack_wakeup.set()

    async def _flush_acks(self, final: bool = False) -> None:
        async with self._ack_lock:  # one XACK in flight at a time; the rest accumulates
            await self._flush_acks_locked(final)

    async def _flush_acks_locked(self, final: bool) -> None:
        while self._ack_pending:
            batch = self._ack_pending[:ACK_BATCH_MAX]
            try:
                await call(lambda b=batch: self.client.xack(  # type: ignore[misc]
                    self.stream, self.group, *b), stream=self.stream, group=self.group)
            except ConnectionLostError:
                if final:
                    logger.warning("could not acknowledge %d events at shutdown; they stay "
                                   "pending and will be redelivered", len(self._ack_pending),
                                   extra=self._log_extra())
                    return
                raise
            del self._ack_pending[:len(batch)]
            if self._rereads:
                self._acked_while_reading.update(batch)
            self.stats.acked += len(batch)
            self._obs().on_acked(self.stream, self.group, len(batch))

    async def _dead_letter(self, msg_id: str, fields: Mapping[bytes, bytes] | None, reason: str,
                           error: str, deliveries: int, *, event: Event | None = None) -> None:
        if fields is None:
            fields = await self._raw_fields(msg_id)
        try:
            dlq_id = await dead_letter(self.client, stream=self.stream, group=self.group,
                                       consumer=self.consumer, msg_id=msg_id, fields=fields,
                                       reason=reason, error=error, deliveries=deliveries)
        except ConnectionLostError:
            logger.warning("could not dead-letter %s now; it stays pending and will come back",
                           msg_id, extra=self._log_extra(msg_id=msg_id))
            return
        if dlq_id is None:
            logger.info("%s was no longer ours to dead-letter (claimed or acknowledged "
                        "elsewhere)", msg_id, extra=self._log_extra(msg_id=msg_id))
            return
        self.stats.dead_lettered += 1
        self._obs().on_dead_lettered(self.stream, self.group, reason)
        logger.warning("dead-lettered %s (%s after %d deliveries): %s", msg_id, reason,
                       deliveries, error,
                       extra=self._log_extra(msg_id=msg_id, dlq_id=dlq_id,
                                             event_type=event.type if event else None))

    async def _raw_fields(self, msg_id: str) -> dict[bytes, bytes] | None:
        rows = await call(lambda: self.client.xrange(self.stream, min=msg_id, max=msg_id,
                                                     count=1), stream=self.stream)
        entries = entries_from_read_reply([(self.stream, rows)]) if rows else []
        return entries[0][1] if entries else None

    # ---------------------------------------------------------------- leases and recovery

    async def _lease_loop(self) -> None:
        """Keep entries whose handlers are still running from looking abandoned."""
        while not self._closing:
            await asyncio.sleep(self.lease_interval_s / 2)
            now = time.monotonic()
            threshold = now - self.lease_interval_s
            ids = [m for m, f in self._in_flight.items() if f.leased_at <= threshold]
            if not ids:
                continue
            for msg_id in ids:
                flight = self._in_flight.get(msg_id)
                if flight is not None:
                    flight.leased_at = now
            try:
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    lost = await call(
                        lambda c=chunk: self._lease_script(  # type: ignore[misc]
                            keys=[self.stream], args=[self.group, self.consumer, *c]),
                        stream=self.stream, group=self.group)
                    self.stats.leases_renewed += len(chunk) - len(lost)
                    if lost:
                        self.stats.leases_lost += len(lost)
                        logger.warning("lost the lease on %d in-flight entries (claimed by "
                                       "another consumer or acknowledged): %s", len(lost),
                                       [to_str(x) for x in lost[:5]], extra=self._log_extra())
            except ConnectionLostError as exc:
                logger.warning("lease renewal failed (%s); retrying", exc,
                               extra=self._log_extra())
            except GroupNotFoundError:
                continue

    async def _reclaim_loop(self) -> None:
        """Claim entries abandoned by other consumers; remove consumers long gone."""
        next_cleanup = time.monotonic() + self.reclaim_interval_s
        while not self._stopping.is_set():
            await asyncio.sleep(self.reclaim_interval_s)
            try:
                await self._reclaim_once()
                if time.monotonic() >= next_cleanup:
                    await self._cleanup_consumers()
                    next_cleanup = time.monotonic() + max(self.reclaim_interval_s * 10, 10.0)
            except (ConnectionLostError, GroupNotFoundError) as exc:
                logger.info("reclaim skipped (%s)", exc, extra=self._log_extra())
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("unexpected error while reclaiming; continuing",
                                 extra=self._log_extra())

    async def _reclaim_once(self) -> int:
        free = await self._wait_for_capacity()
        with self._rereading():
            claimed, deleted = await autoclaim_all(
                self.client, self.stream, self.group, self.consumer,
                min_idle_ms=self.visibility_timeout_ms, count=min(free, 100), limit=free)
            if deleted:
                self.stats.lost += len(deleted)
                self._obs().on_lost(self.stream, self.group, len(deleted))
            if not claimed:
                return 0
            fresh = self._drop_settled(claimed)
        if not fresh:
            return 0
        self.stats.claimed += len(fresh)
        self._obs().on_claimed(self.stream, self.group, len(fresh))
        logger.info("claimed %d entries idle for over %d ms", len(fresh),
                    self.visibility_timeout_ms, extra=self._log_extra())
        counts = await delivery_counts(self.client, self.stream, self.group,
                                       [e[0] for e in fresh], self.consumer)
        await self._accept(fresh, counts)
        return len(fresh)

    async def _cleanup_consumers(self) -> None:
        consumers = await call(lambda: self.client.xinfo_consumers(self.stream, self.group),
                               stream=self.stream, group=self.group)
        for info in consumers:
            name = to_str(first_field(info, "name"))
            pending = int(first_field(info, "pending") or 0)
            idle = int(first_field(info, "idle") or 0)
            if name == self.consumer or pending or idle < self.consumer_cleanup_idle_ms:
                continue
            removed = await call(
                lambda n=name: self._cleanup_script(  # type: ignore[misc]
                    keys=[self.stream],
                    args=[self.group, n, self.consumer_cleanup_idle_ms]),
                stream=self.stream, group=self.group)
            if removed:
                self.stats.consumers_removed += 1
                logger.info("removed consumer %r: idle for %d ms and owning nothing", name, idle,
                            extra=self._log_extra())

"""``Worker``: runs handlers for a consumer group with at-least-once delivery.

What it guarantees, and how:

* An event is acknowledged only after its handler returned (acks are batched: while one XACK
  round trip is in flight the next ones accumulate, so an idle worker adds no latency).
* A handler that raises is retried with exponential backoff; every attempt is counted by the
  server (the retry re-claims the entry with XCLAIM, which raises its delivery count). After
  ``max_deliveries`` attempts the entry moves to ``{stream}:dlq`` atomically with the error.
* Entries arrive through an ``Intake`` (``_intake.py``), the same path the coordinator's
  ``subscribe`` uses: own pending entries first, then new ones; what cannot run is
  dead-lettered after the good entries of its batch were queued.
* In the background it claims entries other consumers have held longer than
  ``visibility_timeout_ms`` (XAUTOCLAIM, following the cursor), and removes consumers that are
  long gone and own nothing.
* Leases are renewed (XCLAIM JUSTID, not a delivery) only for entries whose handler is running,
  so a slow handler is never stolen, and what a stuck worker merely holds is claimable by others.
* No silent stalls: every background task (runners, reader, acker, retrier, reclaimer, lease
  renewer) is supervised. A transient fault (lost connection, restart, OOM) is retried with
  backoff and logged once per episode; an unexpected exception is logged with its traceback and
  the task restarted; a misconfiguration (credentials, ACL, TLS, a key that is not a stream)
  stops the worker, and ``start()``/``run()`` raise it.
* ``stop()`` / SIGTERM / SIGINT: stop reading, let in-flight handlers finish up to a deadline,
  acknowledge them, exit, within the deadline plus ``STOP_GRACE_S``. What did not finish stays
  pending for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Unpack

from agentstreams import _scripts as scripts
from agentstreams._connection import (
    Backoff,
    ConnectionSettings,
    Redis,
    TLSKwargs,
    call,
    create_client,
    is_permanent,
)
from agentstreams._constants import (
    B_FIELD_REPLY_TO,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_VISIBILITY_TIMEOUT_MS,
    DLQ_REASON_MAX_DELIVERIES,
    DLQ_REASON_REJECTED,
    LOCAL_SERVER_DIR_PREFIX,
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_CAP_S,
    SOCKET_TIMEOUT_MARGIN_S,
)
from agentstreams._dlq import format_error, format_traceback
from agentstreams._events import Event, EventType
from agentstreams._intake import DeadLetterRequest, Intake
from agentstreams._lifecycle import serve_until_stopped
from agentstreams._observe import Observer, get_observer
from agentstreams._reply import ReplySender, wire_reply
from agentstreams._signing import SigningKeys, signing_keys_from
from agentstreams._streams import RawEntry, ensure_group, first_field, to_str, validate_name
from agentstreams.errors import (
    AgentStreamsError,
    BackpressureError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    Reject,
    Retry,
    TLSError,
    WorkerFailedError,
)
from agentstreams.tracing import NO_SPAN, handler_span

__all__ = ["Handler", "Worker", "WorkerStats"]

logger = logging.getLogger("agentstreams.worker")

Handler = Callable[[Event], Awaitable[Any]]

#: Handler key for "every event type".
_ANY = "*"
#: How many XACK ids go into one command at most.
ACK_BATCH_MAX = 1000
#: Faults every loop rides out with backoff: the server is unreachable, restarting, out of
#: memory, read-only during a failover, or the group vanished for a moment.
_TRANSIENT = (ConnectionLostError, BackpressureError, GroupNotFoundError)

#: With the default prefetch, while handlers are fast the worker may hold up to this much
#: estimated queued work (seconds per concurrency slot) beyond the running handlers, up to
#: ``read_count`` entries: cheap events then cost one read and one ack per batch, and a replica
#: still never sits on more than a moment's work that another replica could have taken.
PREFETCH_WORK_BUDGET_S = 0.05
#: Weight of the newest handler duration in the running average that sizes the prefetch.
HANDLER_TIME_EWMA = 0.05

#: What stop() may take beyond its drain deadline: cancelling runners, the last XACK, closing.
#: Each step gets what is left of it, so a frozen server cannot stretch a stop.
STOP_GRACE_S = 1.0
#: A background task that fails unexpectedly this many times within the window below cannot
#: recover by restarting: the worker stops and run() raises instead of idling.
TASK_FAILURE_LIMIT = 5
TASK_FAILURE_WINDOW_S = 60.0
#: New connections reset at their first command this many times in a row at start-up: the
#: server speaks TLS and the URL says redis:// (a restarting server refuses, it does not reset).
HANDSHAKE_RESETS_MEAN_TLS = 3
#: Slack for the retry's XCLAIM min-idle check (server and client clocks tick apart).
RETRY_CLAIM_SLACK_MS = 50


async def _settle(tasks: Sequence[asyncio.Task[Any]], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for cancelled tasks to finish; never hang on one."""
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=max(timeout_s, 0.001))
    for task in pending:
        logger.warning("background task %s did not stop in time", task.get_name(),
                       extra={"task": task.get_name()})


#: (server, warning) pairs already logged by this process: see Worker._probe_server.
_SERVER_WARNINGS_LOGGED: set[tuple[str, str]] = set()


@dataclass(slots=True)
class WorkerStats:
    """Counters since the worker started.

    Every entry read is ``delivered`` once per read (a redelivery counts again, a retry of an
    entry still held here does not); each handler run ends ``succeeded`` or ``failed``. A
    failed run is ``retried`` or dead-lettered. ``acked`` counts XACKs of succeeded runs and of
    entries settled without a run (``unhandled`` types, ``lost`` entries); dead letters are
    acknowledged by their own move. So, once the worker is idle, ``acked`` is ``succeeded +
    unhandled`` (plus lost entries it acknowledged), and ``failed`` is ``retried`` plus the
    runs that were dead-lettered; ``dead_lettered`` also counts entries that never ran
    (``malformed``, ``unauthenticated``, too many deliveries).
    """

    #: entries read from the stream (first deliveries, own pending re-reads, claims)
    delivered: int = 0
    #: entries acknowledged (XACK)
    acked: int = 0
    #: handler runs that returned
    succeeded: int = 0
    #: handler runs that raised (retried or dead-lettered)
    failed: int = 0
    #: failed runs scheduled for another delivery
    retried: int = 0
    #: entries moved to the dead-letter stream (failed runs and entries that never ran)
    dead_lettered: int = 0
    #: dead-letter moves that failed for now (the entry stayed pending and comes back)
    dead_letter_failures: int = 0
    #: entries that could not be decoded (dead-lettered as ``malformed``)
    malformed: int = 0
    #: entries refused by signature verification (dead-lettered as ``unauthenticated``)
    unauthenticated: int = 0
    #: events of a type no handler takes (acknowledged without running)
    unhandled: int = 0
    #: entries taken over from consumers that held them past the visibility timeout
    claimed: int = 0
    #: pending entries deleted or trimmed before anyone acknowledged them
    lost: int = 0
    #: times the reader lost its connection
    reconnects: int = 0
    #: lease renewals of running handlers' entries, and renewals that found the entry gone
    leases_renewed: int = 0
    leases_lost: int = 0
    #: consumers removed from the group (idle for long and owning nothing)
    consumers_removed: int = 0
    #: background tasks restarted after an unexpected exception
    task_restarts: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass(slots=True)
class _InFlight:
    event: Event
    #: the entry as read: a failed handler's dead letter keeps exactly these fields
    fields: dict[bytes, bytes]
    #: monotonic time the server last touched the entry for us, at the latest (the reply to
    #: its delivery or to a lease renewal came back then)
    leased_at: float
    #: True while a handler runs it (False while queued or waiting for a retry)
    running: bool = False


class _Episode:
    """Logs a run of transient failures once (its start and its end), not every retry."""

    def __init__(self, what: str, extra: dict[str, Any]) -> None:
        self.what = what
        self.extra = extra
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: BaseException, delay_s: float) -> None:
        if self.failures == 0:
            self.since = time.monotonic()
            logger.warning("%s failed (%s); retrying with backoff (next in %.2fs)", self.what,
                           exc, delay_s, extra=self.extra)
        else:
            logger.debug("%s failed again (%s); retrying in %.2fs", self.what, exc, delay_s,
                         extra=self.extra)
        self.failures += 1

    def recovered(self) -> None:
        if self.failures:
            logger.info("%s works again after %d failed attempts (%.1fs)", self.what,
                        self.failures, time.monotonic() - self.since, extra=self.extra)
            self.failures = 0


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
        signing_keys: SigningKeys | Mapping[str, bytes | str] | None = None,
        **tls: Unpack[TLSKwargs],
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
        #: With keys, every entry is verified before decoding; failures are dead-lettered as
        #: ``unauthenticated`` and never reach a handler
        self.signing_keys = signing_keys_from(signing_keys)
        self.group_start_id = group_start_id
        self.probe_server = probe_server
        #: receives what the worker does (``agentstreams.metrics.attach_worker_metrics`` sets
        #: a Prometheus one); None: the process-wide observer
        self.observer = observer
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
            **tls,
        )
        self._client: Redis | None = None
        self._handlers: dict[str, Handler] = {}
        self.stats = WorkerStats()
        #: What the start-up probe found risky about the server (durability, eviction).
        self.server_warnings: list[str] = []
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        #: a second stop request: do not wait for running handlers
        self._force_stop = asyncio.Event()
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
        self._stop_started = False
        #: what made the worker stop on its own (a misconfiguration, a task that kept failing)
        self._failure: BaseException | None = None
        self._intake: Intake | None = None
        #: answers requests (``Event.reply``); made on the first request seen
        self._reply_sender: ReplySender | None = None
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

    @property
    def running(self) -> bool:
        """True from a successful ``start()`` until a stop was asked for or the worker failed."""
        return self._started and self.ready.is_set() and not self._stopping.is_set()

    @property
    def failure(self) -> BaseException | None:
        """Why the worker stopped on its own (``run()`` raises it), or None."""
        return self._failure

    def _obs(self) -> Observer:
        return self.observer or get_observer()

    def _log_extra(self, **more: Any) -> dict[str, Any]:
        return {"stream": self.stream, "group": self.group, "consumer": self.consumer, **more}

    async def start(self) -> None:
        """Connect, create the group, start the loops; returns once the first read is issued.

        Raises a ``ConfigurationError`` (credentials, ACL, TLS) or ``WrongTypeError`` at once;
        an unreachable or restarting server is waited for, with backoff.
        """
        if self._started:
            if self._failure is not None:
                raise self._failure
            return
        if not self._handlers:
            raise InvalidArgumentError("register at least one handler before starting the worker")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop(timeout_s=0)
            raise
        logger.info("worker %s consuming %r as group %r", self.consumer, self.stream, self.group,
                    extra=self._log_extra())

    async def _start(self) -> None:
        if self._external_client is not None:
            self._client = self._external_client
        else:
            assert self._settings is not None
            self._client = create_client(self._settings)
        client = self._client
        self._lease_script = client.register_script(scripts.RENEW_LEASES)
        self._cleanup_script = client.register_script(scripts.DELETE_IDLE_CONSUMER)
        self._intake = Intake(client, self.stream, self.group, self.consumer,
                              max_deliveries=self.max_deliveries,
                              max_event_bytes=self.max_event_bytes, counters=self.stats,
                              observer=self._obs, signing_keys=self.signing_keys)
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("creating the consumer group", self._log_extra())
        resets = 0
        while True:
            try:
                await call(lambda: ensure_group(client, self.stream, self.group,
                                                self.group_start_id),
                           stream=self.stream, group=self.group)
                episode.recovered()
                break
            except (ConnectionLostError, BackpressureError) as exc:
                if self._stopping.is_set():
                    raise
                # A TLS port addressed as plain text accepts the connection and resets it at
                # the first bytes, every time; a restarting server refuses connections.
                resets = resets + 1 if "reset by peer" in str(exc) else 0
                if resets >= HANDSHAKE_RESETS_MEAN_TLS:
                    raise TLSError(
                        f"the server reset {resets} new connections in a row at their first "
                        "command: is this a TLS port addressed with redis://? Use rediss:// "
                        f"({exc})", stream=self.stream, group=self.group) from exc
                delay = backoff.next_delay()
                episode.failed(exc, delay)
                await asyncio.sleep(delay)
        if self.probe_server:
            await self._probe_server()
        self._runners = [self._spawn(f"runner-{i}", self._runner)
                         for i in range(self.concurrency)]
        self._tasks = [
            self._spawn("reader", self._read_loop),
            self._spawn("acker", self._ack_loop),
            self._spawn("retrier", self._retry_loop),
            self._spawn("reclaimer", self._reclaim_loop),
        ]
        if self.lease_renewal:
            self._tasks.append(self._spawn("leases", self._lease_loop))
        ready = asyncio.ensure_future(self.ready.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopping.cancel()
        if self._failure is not None:
            raise self._failure

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Start and process events until ``stop()``, SIGTERM or SIGINT; then shut down.

        Raises what made the worker stop on its own (see ``failure``), so a process that runs
        a worker exits non-zero instead of idling.
        """
        await serve_until_stopped(self.start, self.stop, self._stopping,
                                  install_signal_handlers=install_signal_handlers,
                                  force_stop=lambda: self.request_stop(force=True))
        if self._failure is not None:
            raise self._failure

    def request_stop(self, *, force: bool = False) -> None:
        """Ask the worker to stop (non-blocking; ``run()`` returns once it has). With
        ``force``, a stop in progress stops waiting for running handlers (their entries stay
        pending and are redelivered): what a second Ctrl-C does."""
        self._stopping.set()
        if force:
            self._force_stop.set()

    async def wait_stop_requested(self) -> None:
        """Return once a stop was asked for, or the worker stopped on its own (``failure``)."""
        await self._stopping.wait()

    def _fail(self, exc: BaseException) -> None:
        """Stop the worker because of ``exc``; ``run()`` raises it."""
        if self._failure is None:
            self._failure = exc
            logger.error("worker %s stops: %s", self.consumer, exc, extra=self._log_extra())
        self._stopping.set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop reading, give in-flight handlers up to ``timeout_s`` to finish, ack, close.

        Returns within ``timeout_s`` (default ``shutdown_timeout_s``) plus ``STOP_GRACE_S``,
        whatever the server does.
        """
        self._stopping.set()
        if not self._started or self._stopped.is_set():
            self._stopped.set()
            return
        if self._stop_started:  # another caller is stopping it: wait for that
            await self._stopped.wait()
            return
        self._stop_started = True
        drain_deadline = time.monotonic() + (self.shutdown_timeout_s if timeout_s is None
                                             else timeout_s)
        for task in self._tasks:
            if task.get_name().endswith(("reader", "reclaimer", "retrier")):
                task.cancel()
        # Queued but unstarted events are released: they stay pending for the others.
        while self._ready:
            self._release(self._ready.popleft().msg_id)
        self._retry_heap.clear()
        for msg_id in [m for m, f in self._in_flight.items() if not f.running]:
            self._release(msg_id)
        if self._in_flight and not self._force_stop.is_set():
            logger.warning("waiting for %d running handlers (up to %.0f s); Ctrl-C again to "
                           "stop now", len(self._in_flight),
                           max(0.0, drain_deadline - time.monotonic()), extra=self._log_extra())
            drained = asyncio.ensure_future(self._drained.wait())
            forced = asyncio.ensure_future(self._force_stop.wait())
            try:
                await asyncio.wait({drained, forced},
                                   timeout=max(0.0, drain_deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                drained.cancel()
                forced.cancel()
        unfinished = len(self._in_flight)
        self._closing = True
        grace_deadline = max(drain_deadline, time.monotonic()) + STOP_GRACE_S

        def left(share: float = 1.0) -> float:
            return max(0.0, (grace_deadline - time.monotonic()) * share)

        for runner in self._runners:
            runner.cancel()
        await _settle(self._runners, left(0.25))
        try:
            async with asyncio.timeout(left(0.5)):
                await self._flush_acks(final=True)
        except TimeoutError:
            logger.warning("could not acknowledge %d events at shutdown (no reply in time); "
                           "they stay pending and will be redelivered", len(self._ack_pending),
                           extra=self._log_extra())
        for task in self._tasks:
            task.cancel()
        await _settle(self._tasks, left(0.5))
        if unfinished:
            logger.warning("stopped with %d handlers unfinished; their events stay pending and "
                           "will be redelivered", unfinished, extra=self._log_extra())
        if self._client is not None and self._client is not self._external_client:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(left(), 0.05)):
                    await self._client.aclose()
        self._stopped.set()
        logger.info("worker %s stopped: %s", self.consumer, self.stats.as_dict(),
                    extra=self._log_extra())

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # ---------------------------------------------------------------- supervision

    def _spawn(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]
               ) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervised(name, loop), name=f"agentstreams-{name}")

    async def _supervised(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]
                          ) -> None:
        """Run one of the worker's loops for as long as the worker runs.

        Loops handle transient faults themselves. What escapes them is either permanent (the
        worker stops: see ``_fail``) or unexpected: then it is logged with its traceback and
        the loop restarted with backoff, unless it keeps failing (then the worker stops too).
        """
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        failures: deque[float] = deque()
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_permanent(exc):
                    self._fail(exc)
                    return
                if self._closing:
                    return
                now = time.monotonic()
                failures.append(now)
                while failures and failures[0] < now - TASK_FAILURE_WINDOW_S:
                    failures.popleft()
                self.stats.task_restarts += 1
                self._obs().on_task_restarted(self.stream, self.group, name)
                if len(failures) >= TASK_FAILURE_LIMIT:
                    logger.error("worker task %s failed %d times within %.0fs", name,
                                 len(failures), TASK_FAILURE_WINDOW_S, exc_info=exc,
                                 extra=self._log_extra(task=name))
                    error = WorkerFailedError(
                        f"worker task {name!r} keeps failing ({type(exc).__name__}: {exc})",
                        stream=self.stream, group=self.group)
                    error.__cause__ = exc
                    self._fail(error)
                    return
                delay = backoff.next_delay()
                logger.error("worker task %s failed; restarting it in %.2fs", name, delay,
                             exc_info=exc, extra=self._log_extra(task=name))
                await asyncio.sleep(delay)

    # ---------------------------------------------------------------- reading

    async def _probe_server(self) -> None:
        """Warn in plain words when the server's settings can lose events."""
        try:
            appendonly = await self.client.config_get("appendonly")
            policy = await self.client.config_get("maxmemory-policy")
            directory = to_str(first_field(await self.client.config_get("dir"), "dir"))
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
        # A development server this library started (``agentstreams.server``, the demo, the
        # examples) is volatile on purpose: no need to alarm anyone about it.
        development = os.path.basename(directory).startswith(LOCAL_SERVER_DIR_PREFIX)
        # Many workers in one process (an AgentWorker hosts one per agent) share a server:
        # say each thing once per process and server, not once per worker.
        kwargs = self.client.connection_pool.connection_kwargs
        server = repr([kwargs.get(k) for k in ("host", "port", "path", "db")])
        for text in warnings:
            if (server, text) not in _SERVER_WARNINGS_LOGGED:
                _SERVER_WARNINGS_LOGGED.add((server, text))
                logger.log(logging.DEBUG if development else logging.WARNING, "%s%s", text,
                           " (a development server started by agentstreams: fine here)"
                           if development else "", extra=self._log_extra())

    # ---------------------------------------------------------------- capacity

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
        intake = self._intake
        assert intake is not None
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("reading from the stream", self._log_extra())
        while not self._stopping.is_set():
            try:
                free = await self._wait_for_capacity(batch=True)
                count = min(free, self.read_count)
                if intake.reading_pending:
                    with self._rereading():
                        entries, counts = await intake.read(count, None)
                        entries = self._drop_settled(entries)
                    if entries:
                        await self._accept(entries, counts)
                else:
                    self.ready.set()
                    entries, _ = await intake.read(count, self.block_ms)
                    if entries:
                        await self._accept(entries, None)
                        # Let the runners start on these before the next read is written:
                        # that write would otherwise sit between delivery and the handler.
                        await asyncio.sleep(0)
                backoff.reset()
                episode.recovered()
            except _TRANSIENT as exc:
                if isinstance(exc, ConnectionLostError):
                    self.stats.reconnects += 1
                    self._obs().on_reconnect(self.stream, self.group)
                delay = backoff.next_delay()
                episode.failed(exc, delay)
                await asyncio.sleep(delay)
                if isinstance(exc, GroupNotFoundError):
                    with contextlib.suppress(*_TRANSIENT):
                        await intake.recreate_group()
                intake.restart_pending()  # a lost reply may have left entries pending for us

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
        """Leave out re-read or re-claimed entries this worker already holds, handled or not.

        After a lost connection the pending list still names entries whose handler finished
        but whose XACK has not gone through yet (or went through after the read was served).
        Running them again would be a silent duplicate. An entry still held here was just
        touched on the server by that read: its lease is as good as renewed.
        """
        settled = self._acked_while_reading.union(self._ack_pending)
        in_flight = self._in_flight
        now = time.monotonic()
        out: list[RawEntry] = []
        for entry in entries:
            flight = in_flight.get(entry[0])
            if flight is not None:
                flight.leased_at = now
            elif entry[0] not in settled:
                out.append(entry)
        return out

    async def _accept(self, entries: Sequence[RawEntry], counts: dict[str, int] | None, *,
                      retry: bool = False) -> None:
        """Queue the events of a batch for the runners; then settle what must not run.

        The good events are queued (and runners woken) before any dead-letter move is
        attempted, so an entry that cannot be dead-lettered now never holds up its batch.
        """
        intake = self._intake
        assert intake is not None
        batch = intake.sort(entries, counts, redelivery=retry)
        settle = batch.settle
        now = time.monotonic()
        in_flight = self._in_flight
        handlers = self._handlers
        for event, fields in zip(batch.events, batch.fields, strict=True):
            if event.msg_id in in_flight:
                continue  # already running here (re-read after a reconnect)
            event_type = event.data["type"]
            if event_type not in handlers and _ANY not in handlers:
                self.stats.unhandled += 1
                self._obs().on_unhandled(self.stream, self.group, event_type)
                settle.append(event.msg_id)
                continue
            if B_FIELD_REPLY_TO in fields:  # a request: event.reply() answers it
                wire_reply(event, fields, self._reply_sender or self._new_reply_sender())
            in_flight[event.msg_id] = _InFlight(event, fields, now)
            self._ready.append(event)
        if in_flight:
            self._drained.clear()
        self._wake_runners()
        if settle:
            self._enqueue_acks(settle)
        for request in batch.dead:
            await intake.dead_letter(request)

    def _new_reply_sender(self) -> ReplySender:
        assert self._client is not None
        self._reply_sender = ReplySender(self._client, self.stream,
                                         signing_keys=self.signing_keys,
                                         max_event_bytes=self.max_event_bytes)
        return self._reply_sender

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
            try:
                if (time.monotonic() - flight.leased_at > self.lease_interval_s
                        and not await self._still_ours(flight)):
                    continue
                flight.running = True
                await self._run_one(event, flight)
            except BaseException:
                # Cancelled at shutdown, or a bug: leave the entry pending for a consumer
                # that can finish it (nobody renews its lease any more).
                self._release(event.msg_id)
                raise

    async def _still_ours(self, flight: _InFlight) -> bool:
        """Renew the lease of an entry that waited here longer than a lease interval before a
        runner took it (queued leases are not renewed): False if another consumer has it."""
        msg_id = flight.event.msg_id
        try:
            lost = await self._renew_leases([msg_id])
        except _TRANSIENT:
            return True  # cannot tell now; running it is what a healthy worker would do
        if lost:
            self._release(msg_id)
            return False
        flight.leased_at = time.monotonic()
        return True

    async def _run_one(self, event: Event, flight: _InFlight) -> None:
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
        await self._handle_failure(event, flight, error)

    async def _handle_failure(self, event: Event, flight: _InFlight,
                              error: BaseException) -> None:
        """Dead-letter, or schedule a retry. A failed dead-letter move leaves the entry
        pending (the reclaimer brings it back); it never stops this runner."""
        reason = None
        if isinstance(error, Reject):
            reason, text = DLQ_REASON_REJECTED, error.reason
        elif event.delivery_count >= self.max_deliveries:
            reason, text = DLQ_REASON_MAX_DELIVERIES, format_error(error)
        if reason is not None:
            assert self._intake is not None
            try:
                await self._intake.dead_letter(
                    DeadLetterRequest(event.msg_id, flight.fields, reason, text,
                                      event.delivery_count, format_traceback(error)),
                    event_type=event.type)
            finally:
                self._release(event.msg_id)
            return
        if isinstance(error, Retry):
            delay = error.delay_s
        else:
            delay = min(self.retry_delay_max_s,
                        self.retry_delay_s * (2 ** (event.delivery_count - 1)))
            logger.warning("handler for %s %s failed (attempt %d of %d): %s; retrying in %.2fs",
                           event.type, event.msg_id, event.delivery_count, self.max_deliveries,
                           format_error(error), delay, exc_info=error,
                           extra=self._log_extra(msg_id=event.msg_id, event_type=event.type))
        self.stats.retried += 1
        self._obs().on_retried(self.stream, self.group, event.type)
        if self._in_flight.get(event.msg_id) is not flight or self._stopping.is_set():
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
        """Claim failed entries back when their backoff expires (XCLAIM counts the delivery).

        Their leases are not renewed while they wait, so another consumer may take one over
        meanwhile; the claim then asks for an idle time it no longer has, and leaves it alone.
        """
        intake = self._intake
        assert intake is not None
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("claiming an entry back for its retry", self._log_extra())
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
            flight = self._in_flight.get(msg_id)
            if flight is None:
                continue
            idle_ms = int((time.monotonic() - flight.leased_at) * 1000) - RETRY_CLAIM_SLACK_MS
            try:
                entries, counts = await intake.claim_back(msg_id, idle_ms)
            except _TRANSIENT as exc:
                delay = backoff.next_delay()
                episode.failed(exc, delay)
                self._retry_seq += 1
                heapq.heappush(self._retry_heap, (time.monotonic() + delay, self._retry_seq,
                                                  msg_id))
                continue
            backoff.reset()
            episode.recovered()
            self._release(msg_id)
            if entries:  # else: acknowledged, deleted or taken over meanwhile
                await self._accept(entries, counts, retry=True)

    # ---------------------------------------------------------------- acks

    def _enqueue_acks(self, msg_ids: list[str]) -> None:
        self._ack_pending.extend(msg_ids)
        self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("acknowledging", self._log_extra())
        while not self._closing:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            try:
                await self._flush_acks()
                backoff.reset()
                episode.recovered()
            except _TRANSIENT as exc:
                delay = backoff.next_delay()
                episode.failed(exc, delay)
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
            except _TRANSIENT:
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

    # ---------------------------------------------------------------- leases and recovery

    async def _renew_leases(self, ids: list[str]) -> list[str]:
        """Reset the idle time of entries we still own; returns the ids that are not ours."""
        lost: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            reply = await call(
                lambda c=chunk: self._lease_script(  # type: ignore[misc]
                    keys=[self.stream], args=[self.group, self.consumer, *c]),
                stream=self.stream, group=self.group)
            lost.extend(to_str(x) for x in reply)
            self.stats.leases_renewed += len(chunk) - len(reply)
        return lost

    async def _lease_loop(self) -> None:
        """Keep entries whose handlers are running from looking abandoned.

        Only running ones: what waits in the queue or for a retry is not renewed, so entries
        a stuck worker merely holds are claimable by the other replicas.
        """
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("renewing leases", self._log_extra())
        while not self._closing:
            await asyncio.sleep(self.lease_interval_s / 2)
            threshold = time.monotonic() - self.lease_interval_s
            ids = [m for m, f in self._in_flight.items() if f.running and f.leased_at <= threshold]
            if not ids:
                continue
            try:
                lost = await self._renew_leases(ids)
            except _TRANSIENT as exc:
                episode.failed(exc, backoff.next_delay())
                continue
            backoff.reset()
            episode.recovered()
            now = time.monotonic()
            lost_set = set(lost)
            for msg_id in ids:
                flight = self._in_flight.get(msg_id)
                if flight is not None and msg_id not in lost_set:
                    flight.leased_at = now
            if lost:
                self.stats.leases_lost += len(lost)
                logger.warning("lost the lease on %d in-flight entries (claimed by another "
                               "consumer or acknowledged): %s", len(lost), lost[:5],
                               extra=self._log_extra())

    async def _reclaim_loop(self) -> None:
        """Claim entries abandoned by other consumers; remove consumers long gone."""
        next_cleanup = time.monotonic() + self.reclaim_interval_s
        backoff = Backoff(RECONNECT_BACKOFF_BASE_S, RECONNECT_BACKOFF_CAP_S)
        episode = _Episode("reclaiming abandoned entries", self._log_extra())
        while not self._stopping.is_set():
            await asyncio.sleep(self.reclaim_interval_s)
            try:
                await self._reclaim_once()
                if time.monotonic() >= next_cleanup:
                    await self._cleanup_consumers()
                    next_cleanup = time.monotonic() + max(self.reclaim_interval_s * 10, 10.0)
                backoff.reset()
                episode.recovered()
            except _TRANSIENT as exc:
                episode.failed(exc, self.reclaim_interval_s)

    async def _reclaim_once(self) -> int:
        intake = self._intake
        assert intake is not None
        free = await self._wait_for_capacity()
        with self._rereading():
            claimed, counts = await intake.claim_idle(
                self.visibility_timeout_ms, count=min(free, 100), limit=free,
                skip=self._drop_settled)
        if not claimed:
            return 0
        logger.info("claimed %d entries idle for over %d ms", len(claimed),
                    self.visibility_timeout_ms, extra=self._log_extra())
        await self._accept(claimed, counts)
        return len(claimed)

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

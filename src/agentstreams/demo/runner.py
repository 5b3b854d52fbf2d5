"""Orchestration of ``agentstreams demo``: server, worker processes, sessions, the kill, shutdown.

The runner starts one OS process per worker (triage, two research replicas, writer: each an
``AgentWorker``), waits until each announced itself on the shared event stream, then asks every
session's question concurrently through an ``AgentClient``. It watches the event stream the
whole time; once a research replica is inside its search tool, it ``kill -9``s that replica, and
the other replica re-claims the abandoned hop after the visibility timeout. At the end it stops
the workers (SIGTERM, then SIGKILL after a timeout) and reports. It never sleeps for a fixed
time: every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agentstreams._codec import decode_entry
from agentstreams._connection import ConnectionSettings, Redis, call, create_client, redact_url
from agentstreams._constants import SCAN_BATCH, SOCKET_TIMEOUT_MARGIN_S
from agentstreams._coordinator import AgentCoordinator
from agentstreams._events import Event
from agentstreams._streams import dlq_key, entries_from_read_reply
from agentstreams.demo.team import AGENT_NAMES, SEARCH_S, prompt_for
from agentstreams.demo.timeline import KILLED_EVENT, DemoSummary, DemoTracker, TimelineEntry
from agentstreams.demo.worker import TOOL_STARTED_EVENT, process_main
from agentstreams.errors import AgentStreamsError, InvalidArgumentError, MalformedEventError
from agentstreams.integrations.openai_agents import (
    AgentClient,
    AgentRunError,
    AgentRunTimeoutError,
    Keys,
)
from agentstreams.server import LocalServer

__all__ = [
    "VISIBILITY_TIMEOUT_MS",
    "WORKERS",
    "DemoConfig",
    "DemoDisplay",
    "new_namespace",
    "run",
    "run_demo",
]

#: The worker processes: name -> the agent it hosts. Two research replicas share that inbox,
#: so the one left standing can take over what the killed one held.
WORKERS: dict[str, str] = {"triage-1": "triage", "research-1": "research",
                           "research-2": "research", "writer-1": "writer"}
#: The agent whose replica is killed.
KILL_AGENT = "research"
#: A hop held this long by a dead worker goes to another replica (short, so recovery shows).
VISIBILITY_TIMEOUT_MS = 1000
#: Block time of one read of the event stream (bounds how long a stop takes to be noticed).
FEED_BLOCK_MS = 200
#: Workers get this long to exit after SIGTERM before they are killed.
WORKER_STOP_TIMEOUT_S = 10.0
#: After the last answer, how long to wait for the runs' final events to reach the log.
FINAL_EVENTS_WAIT_S = 5.0
#: Lines of a worker's stderr shown when it failed.
WORKER_LOG_TAIL_LINES = 15
#: How long the worker processes get to start and announce themselves (not part of --timeout).
STARTUP_TIMEOUT_S = 120.0
#: How a worker that is not to blame for a failed run ended.
_CLEAN_EXITS = ("ok", "killed (-9)", "stopped during start-up")
#: Keys deleted per DEL when a generated namespace is removed.
DELETE_BATCH = 500


def new_namespace() -> str:
    """A fresh key namespace for one demo run (repeated runs never mix)."""
    return f"demo-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What to run; rejects impossible values when built."""

    tasks: int = 3
    #: Key namespace; None = a fresh ``demo-<hex>`` (deleted afterwards on a given server).
    namespace: str | None = None
    #: Multiplier of the search tool's time (0 = instant; the kill then may find no hop).
    pace: float = 1.0
    #: Deadline for the sessions, counted from when every worker is ready.
    timeout_s: float = 60.0
    #: Deadline for the worker processes to start and announce themselves.
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    #: Keep the generated namespace's keys on a given server afterwards.
    keep: bool = False
    #: ``kill -9`` a research replica inside its first search.
    kill: bool = True
    #: The SDK's default OpenAI model instead of the scripted one (needs OPENAI_API_KEY).
    live_model: bool = False
    visibility_ms: int = VISIBILITY_TIMEOUT_MS

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, int) or not 1 <= self.tasks <= 10_000:
            raise InvalidArgumentError(f"tasks must be between 1 and 10000, got {self.tasks!r}")
        if self.pace < 0:
            raise InvalidArgumentError(f"pace must be >= 0, got {self.pace!r}")
        if self.timeout_s <= 0:
            raise InvalidArgumentError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if self.startup_timeout_s <= 0:
            raise InvalidArgumentError("startup_timeout_s must be positive, got "
                                       f"{self.startup_timeout_s!r}")
        if self.namespace is not None:
            Keys(self.namespace)  # validates it
        if self.visibility_ms < 100:
            raise InvalidArgumentError("visibility_ms must be >= 100")


class DemoDisplay(Protocol):
    """Where the run is shown: a header, timeline rows, progress notes and the summary."""

    def header(self, info: dict[str, Any], tracker: DemoTracker) -> None:
        """The run is about to start (server, namespace, model, workers); ``tracker`` holds
        the live state of sessions and workers."""

    def event(self, entry: TimelineEntry) -> None:
        """One observed event."""

    def progress(self, text: str) -> None:
        """What the run is waiting for now (may be ignored)."""

    def summary(self, summary: DemoSummary, worker_logs: dict[str, str]) -> None:
        """The closing numbers; ``worker_logs`` holds the stderr tail of failed workers."""

    def close(self) -> None:
        """Release the terminal (stop any animation); called even after an error."""


def model_label(live_model: bool) -> str:
    """What the agents think with, for the header and summary."""
    if not live_model:
        return "scripted offline model (no network, no API key)"
    from agents.models import get_default_model

    return f"OpenAI {get_default_model()} (live, OPENAI_API_KEY)"


class _Process:
    """One worker process forked by the forkserver, watched from the event loop."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: the signal that ended it), None while it runs."""
        return self._process.exitcode

    def terminate(self) -> None:
        """SIGTERM."""
        self._process.terminate()

    def kill(self) -> None:
        """SIGKILL."""
        self._process.kill()

    async def wait(self) -> int:
        """Wait for the process to end; its exit status."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        sentinel = self._process.sentinel

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(sentinel, readable)
        try:
            if self._process.exitcode is None:
                await ended
        finally:
            loop.remove_reader(sentinel)
        self._process.join()
        code = self._process.exitcode
        return -1 if code is None else code


@dataclass(slots=True)
class _Worker:
    name: str
    agent: str
    process: _Process
    log_path: Path
    exited: asyncio.Task[int]


def _forkserver() -> multiprocessing.context.BaseContext:
    """Worker processes are forked from one server process that imported the worker module
    (and the SDK) once, instead of four interpreters importing it side by side."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["agentstreams.demo.worker"])
    return context


def warm_up() -> None:
    """Start the forkserver (and its one import of the SDK) now, e.g. while the server starts.

    It is started with SIGINT ignored (inherited across exec, and Python then installs no
    KeyboardInterrupt handler): Ctrl-C in the terminal must reach only the runner, which stops
    the workers itself; a forkserver killed mid-import would leave a traceback and no workers.
    """
    from multiprocessing import forkserver

    _forkserver()
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


async def _start_workers(url: str, namespace: str, config: DemoConfig, log_dir: Path,
                         on_exit: Callable[[], None], workers: dict[str, _Worker]) -> None:
    """Start every worker process into ``workers`` (filled as they start, so a failure half
    way still leaves the started ones to be reaped)."""
    context = _forkserver()
    started: list[tuple[str, str, multiprocessing.process.BaseProcess, Path]] = []

    def start_all() -> None:
        for name, agent in WORKERS.items():
            log_path = log_dir / f"{name}.log"
            process = context.Process(  # type: ignore[attr-defined]
                target=process_main, name=f"agentstreams-demo-{name}",
                args=(url, namespace, agent, name),
                kwargs={"visibility_ms": config.visibility_ms,
                        "search_s": SEARCH_S * config.pace, "live_model": config.live_model,
                        "log_path": str(log_path)},
                daemon=False)
            process.start()
            started.append((name, agent, process, log_path))

    try:
        # start() waits for the forkserver (its first use imports the SDK): not on the loop.
        await asyncio.to_thread(start_all)
    finally:
        for name, agent, process, log_path in started:
            proc = _Process(process)
            exited = asyncio.create_task(proc.wait(), name=f"demo-exit-{name}")
            exited.add_done_callback(lambda _task: on_exit())
            workers[name] = _Worker(name, agent, proc, log_path, exited)


class _EventFeed:
    """Reads the shared event stream from a given id on (plain XREAD: observing takes nothing
    from anyone and needs no group)."""

    def __init__(self, url: str, stream: str) -> None:
        self.stream = stream
        self.client: Redis = create_client(ConnectionSettings(
            url=url, socket_timeout_s=FEED_BLOCK_MS / 1000 + SOCKET_TIMEOUT_MARGIN_S,
            client_name="agentstreams:demo-observer"))
        self.last_id = "0-0"

    async def start_here(self) -> None:
        """Skip what the stream already holds (a reused namespace's old events)."""
        rows: Any = await call(lambda: self.client.xrevrange(self.stream, count=1),
                               stream=self.stream)
        if rows:
            raw = rows[0][0]
            self.last_id = raw.decode() if isinstance(raw, bytes) else str(raw)

    async def read(self, block_ms: int | None) -> list[Event]:
        """The next events (waits up to ``block_ms`` for one; None = do not wait)."""
        reply: Any = await call(lambda: self.client.xread(
            {self.stream: self.last_id}, count=200, block=block_ms), stream=self.stream)
        events: list[Event] = []
        for msg_id, fields in entries_from_read_reply(reply):
            self.last_id = msg_id
            if fields is None:
                continue
            with contextlib.suppress(MalformedEventError):
                events.append(decode_entry(msg_id, fields, stream=self.stream))
        return events

    async def aclose(self) -> None:
        """Close the connection."""
        await self.client.aclose()


class _Scene:
    """One run in progress: the workers, the observer, the sessions, the kill."""

    def __init__(self, url: str, keys: Keys, config: DemoConfig, tracker: DemoTracker,
                 display: DemoDisplay, announcer: AgentCoordinator) -> None:
        self.url = url
        self.keys = keys
        self.config = config
        self.tracker = tracker
        self.display = display
        self.announcer = announcer
        self.workers: dict[str, _Worker] = {}
        self.victim: str | None = None
        self.stopping = False
        self.interrupted = False
        self.changed = asyncio.Event()
        self._stop_observing = False

    # ---------------------------------------------------------------- observing

    async def observe(self, feed: _EventFeed) -> None:
        """Render every event until told to stop, then drain what is left."""
        while True:
            final = self._stop_observing
            events = await feed.read(None if final else FEED_BLOCK_MS)
            # The whole batch first: what the victim holds must include the hops it claimed
            # after the search that makes it the victim, if they are in the same batch.
            for event in events:
                entry = self.tracker.record(event, time.time())
                if entry is not None:
                    self.display.event(entry)
            for event in events:
                if event.type == TOOL_STARTED_EVENT:
                    await self._maybe_kill(event)
            self.changed.set()
            if final:
                return

    async def finish_observing(self, task: asyncio.Task[None]) -> None:
        """Let the observer read what is left, then end it."""
        self._stop_observing = True
        done, _ = await asyncio.wait([task], timeout=FEED_BLOCK_MS / 1000 * 10)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _maybe_kill(self, event: Event) -> None:
        """``kill -9`` the first research replica seen inside its search tool."""
        name = str(event.get("worker") or "")
        worker = self.workers.get(name)
        if (not self.config.kill or self.victim is not None or worker is None
                or worker.agent != KILL_AGENT or worker.process.returncode is not None):
            return
        self.victim = name
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()  # SIGKILL: no cleanup, no ack, nothing
        killed_at = time.time()
        held = [s.label for s in self.tracker.held_by(name)]
        with contextlib.suppress(AgentStreamsError):
            await self.announcer.publish(KILLED_EVENT, {
                "worker": name, "pid": worker.process.pid, "held": held,
                "timestamp": killed_at})

    # ---------------------------------------------------------------- waiting

    def interrupt(self) -> None:
        """Ctrl-C: end the run through the normal path (stop workers, clean up, report)."""
        self.interrupted = True
        self.changed.set()

    def trouble(self) -> str | None:
        """Ctrl-C, or a worker that died on its own while it should be running."""
        if self.interrupted:
            return "interrupted (Ctrl-C)"
        if self.stopping:
            return None
        for worker in self.workers.values():
            if worker.exited.done() and worker.name != self.victim:
                return f"worker {worker.name} exited early with code {worker.exited.result()}"
        return None

    async def until(self, predicate: Callable[[], bool], deadline: float,
                    observer: asyncio.Task[None]) -> str | None:
        """Wait for ``predicate``; returns why it failed ("timeout", a dead worker...)."""
        while True:
            self.changed.clear()
            problem = self.trouble()
            if problem is not None:
                return problem
            if predicate():
                return None
            if observer.done():
                observer.result()  # a dead server or a bug: let it surface
                return "the observer stopped"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    # ---------------------------------------------------------------- sessions

    async def run_sessions(self, client: AgentClient, deadline: float) -> None:
        """Ask every session's question at once; record each result as it comes."""
        async def one(session_id: str, prompt: str) -> None:
            self.tracker.submitted(session_id, time.time())
            timeout_s = max(0.1, deadline - time.monotonic())
            try:
                result = await client.run("triage", prompt, session_id=session_id,
                                          timeout_s=timeout_s)
            except AgentRunError as exc:
                self.tracker.answered(session_id, time.time(),
                                      error=f"{exc.agent}: {exc.error_type}: "
                                            f"{exc.error_message}")
            except AgentRunTimeoutError:
                pass  # no answer: counted as lost
            else:
                self.tracker.answered(session_id, time.time(), answer=str(result.final_output))
                summary = self.tracker.summary
                summary.handoffs += max(0, len(result.chain) - 1)
                summary.tokens += int(result.usage.get("total_tokens", 0))
            finally:
                self.changed.set()

        await asyncio.gather(*(one(s.session_id, s.prompt)
                               for s in self.tracker.sessions.values()))

    # ---------------------------------------------------------------- shutdown

    def _never_ready(self, worker: _Worker) -> bool:
        view = self.tracker.workers.get(worker.name)
        return view is not None and view.state == "starting"

    async def stop_workers(self) -> dict[str, str]:
        """SIGTERM every worker still running; SIGKILL the ones that outlive the timeout."""
        self.stopping = True

        async def stop(worker: _Worker) -> str:
            process = worker.process
            if worker.name == self.victim:
                await worker.exited
                return "killed (-9)"
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            try:
                code = await asyncio.wait_for(asyncio.shield(worker.exited),
                                              WORKER_STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await worker.exited
                return "did not stop (killed)"
            if code in (0, -signal.SIGTERM) and self._never_ready(worker):
                return "stopped during start-up"  # SIGTERM may come before its handler
            return "ok" if code == 0 else f"exit {code}"

        codes = await asyncio.gather(*(stop(w) for w in self.workers.values()))
        return dict(zip(self.workers, codes, strict=True))


async def _server_label(url: str, embedded: bool) -> str:
    client = create_client(ConnectionSettings(url=url))
    try:
        info = await call(lambda: client.info("server"))
    finally:
        await client.aclose()
    if "valkey_version" in info:
        name = f"Valkey {info['valkey_version']!s}"
    else:
        name = f"Redis {info.get('redis_version', '?')!s}"
    return f"{name}{' (embedded)' if embedded else ''} at {redact_url(url)}"


async def _dead_letters(url: str, keys: Keys) -> int:
    client = create_client(ConnectionSettings(url=url))
    try:
        async def count() -> int:
            return sum([int(await client.xlen(dlq_key(keys.inbox(agent))))
                        for agent in AGENT_NAMES])

        return await call(count)
    finally:
        await client.aclose()


async def _delete_namespace(url: str, namespace: str) -> None:
    """Remove every key of the namespace, hash-tagged side keys (``{ns:…}:…``) included."""
    client = create_client(ConnectionSettings(url=url))
    try:
        async def delete() -> None:
            for pattern in (f"{namespace}:*", f"{{{namespace}:*"):
                batch: list[Any] = []
                async for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
                    batch.append(key)
                    if len(batch) >= DELETE_BATCH:
                        await client.delete(*batch)
                        batch.clear()
                if batch:
                    await client.delete(*batch)

        await call(delete)
    finally:
        await client.aclose()


@contextlib.contextmanager
def _on_sigint(handler: Callable[[], None]) -> Iterator[None]:
    """Route Ctrl-C to ``handler`` while the block runs (main thread only; the workers, in the
    same process group, get it too and stop gracefully)."""
    loop = asyncio.get_running_loop()
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, handler)
            installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-WORKER_LOG_TAIL_LINES:])


async def run_demo(url: str, config: DemoConfig, display: DemoDisplay, *,
                   embedded: bool = False) -> DemoSummary:
    """Run the demo against the server at ``url`` and return its summary (never raises for a
    run that merely failed: the summary says what went wrong)."""
    warm_up()
    if not config.live_model:
        from agents import set_tracing_disabled

        set_tracing_disabled(True)
    namespace = config.namespace or new_namespace()
    keys = Keys(namespace)
    server = await _server_label(url, embedded)
    model = model_label(config.live_model)
    summary = DemoSummary(namespace=namespace, server=server, model=model)
    run_tag = uuid.uuid4().hex[:6]
    sessions = {f"s{i}-{run_tag}": prompt_for(i) for i in range(1, config.tasks + 1)}
    tracker = DemoTracker(summary, sessions, WORKERS, time.time())
    recovery = (f"visibility timeout {config.visibility_ms / 1000:g} s; kill -9 of a "
                f"{KILL_AGENT} replica inside its first search" if config.kill
                else f"visibility timeout {config.visibility_ms / 1000:g} s; no kill (--no-kill)")
    interrupted = asyncio.Event()
    scene: _Scene | None = None

    def on_ctrl_c() -> None:
        interrupted.set()
        if scene is not None:
            scene.interrupt()

    worker_logs: dict[str, str] = {}
    feed = _EventFeed(url, keys.events)
    # Ctrl-C from here on ends the run through the normal path: no traceback, a summary.
    with _on_sigint(on_ctrl_c):
        display.header({"server": server, "namespace": namespace, "model": model,
                        "recovery": recovery, "sessions": config.tasks,
                        "chain": list(AGENT_NAMES), "workers": dict(WORKERS),
                        "events": keys.events}, tracker)
        # Start-up has its own bound; --timeout counts from when every worker is ready.
        startup_deadline = time.monotonic() + config.startup_timeout_s
        try:
            await feed.start_here()
            async with AgentCoordinator(url, keys.events) as announcer, \
                    AgentClient(url, namespace=namespace) as client:
                scene = _Scene(url, keys, config, tracker, display, announcer)
                if interrupted.is_set():
                    scene.interrupt()
                observer = asyncio.create_task(scene.observe(feed), name="demo-observer")
                with tempfile.TemporaryDirectory(prefix="agentstreams-demo-") as log_dir:
                    try:
                        display.progress(f"starting {len(WORKERS)} worker processes")
                        await _start_workers(url, namespace, config, Path(log_dir),
                                             scene.changed.set, scene.workers)
                        summary.failure, deadline = await _play(scene, client,
                                                                startup_deadline, observer)
                        if summary.failure is None:
                            # The answers are in; let the log catch up with the final events.
                            await scene.until(
                                lambda: tracker.all_final_seen,
                                min(deadline, time.monotonic() + FINAL_EVENTS_WAIT_S), observer)
                        summary.duplicates += client.stats.late_or_duplicate_replies
                        display.progress("stopping the workers (SIGTERM)")
                        summary.worker_exits = await scene.stop_workers()
                    finally:
                        for worker in scene.workers.values():  # after an exception only
                            if worker.process.returncode is None:
                                with contextlib.suppress(ProcessLookupError):
                                    worker.process.kill()
                                await worker.exited
                        await scene.finish_observing(observer)
                    for name, worker in scene.workers.items():
                        tail = _log_tail(worker.log_path)
                        if tail and summary.worker_exits.get(name) not in _CLEAN_EXITS:
                            worker_logs[name] = tail
            with contextlib.suppress(AgentStreamsError):
                summary.dead_letters = await _dead_letters(url, keys)
        finally:
            await feed.aclose()
            if not embedded and config.namespace is None and not config.keep:
                with contextlib.suppress(AgentStreamsError):
                    await _delete_namespace(url, namespace)
    summary.interrupted = interrupted.is_set()
    display.summary(summary, worker_logs)
    return summary


async def _play(scene: _Scene, client: AgentClient, startup_deadline: float,
                observer: asyncio.Task[None]) -> tuple[str | None, float]:
    """Workers ready (by ``startup_deadline``), then every session answered within the
    run's timeout; returns what failed (None: all answered) and the run's deadline."""
    tracker, config = scene.tracker, scene.config
    problem = await scene.until(lambda: tracker.all_ready, startup_deadline, observer)
    if problem is not None:
        never = f"{count_sessions(config.tasks)} never started"
        if problem == "timeout":
            missing = [w.name for w in tracker.workers.values() if w.state == "starting"]
            return (f"timed out after {config.startup_timeout_s:g}s waiting for workers "
                    f"{', '.join(missing)} to start; {never}"), startup_deadline
        if scene.interrupted:
            return f"interrupted (Ctrl-C) while the workers started; {never}", \
                startup_deadline
        return f"{problem}; {never}", startup_deadline
    deadline = time.monotonic() + config.timeout_s
    scene.display.progress(f"{config.tasks} sessions running")
    sessions = asyncio.create_task(scene.run_sessions(client, deadline), name="demo-sessions")
    sessions.add_done_callback(lambda _task: scene.changed.set())
    try:
        problem = await scene.until(sessions.done, deadline, observer)
    finally:
        if not sessions.done():
            sessions.cancel()
        await asyncio.gather(sessions, return_exceptions=True)
    error = sessions.exception() if sessions.done() and not sessions.cancelled() else None
    if error is not None:
        raise error
    answered = sum(1 for s in tracker.sessions.values() if s.answers)
    if problem == "timeout":
        return f"timed out after {config.timeout_s:g}s with {answered} of {config.tasks} " \
               "sessions answered", deadline
    if problem is not None and scene.interrupted:
        return f"interrupted (Ctrl-C) with {answered} of {config.tasks} sessions " \
               "answered", deadline
    return problem, deadline


def count_sessions(n: int) -> str:
    """``1 session``, ``3 sessions``."""
    return f"{n} session{'' if n == 1 else 's'}"


def run(config: DemoConfig, display: DemoDisplay, url: str | None = None) -> DemoSummary:
    """Run the demo; without ``url``, on an embedded Valkey started and stopped here."""
    if url is not None:
        warm_up()
        return asyncio.run(run_demo(url, config, display))
    warm_up()  # the workers' one import runs while the server starts
    display.progress("starting the embedded Valkey")
    with LocalServer("valkey") as server:
        return asyncio.run(run_demo(server.url, config, display, embedded=True))

"""``AgentWorker``: hosts SDK agents in this process and runs the hops addressed to them.

Each hosted agent has its own inbox stream, read through the shared consumer group
``workers`` by one ``agentstreams.Worker``: a task reaches only workers that host its agent,
and replicas of an agent share the work. For every task the worker

1. claims the hop in the run's status (refused if the hop or the run is already finished:
   a redelivery of work that was done is acknowledged without running anything again);
2. runs the agent with ``Runner.run`` on the conversation it received, with
   ``CoordinatorHooks`` publishing lifecycle events to the shared event stream;
3. if the agent ended with a ``remote_handoff``, publishes the next hop to the target's inbox
   (idempotently, keyed by run and hop) and marks this hop completed; otherwise replies to the
   caller (idempotently) and marks the run completed;
4. if the agent raised, replies ``failed`` with the agent, exception type and message, publishes
   an ``error`` event, and marks the run failed.

Only then does the Worker acknowledge the entry. A crash anywhere before that leaves the entry
pending; another replica claims it after the visibility timeout and re-runs this hop (and only
this hop). While a hop runs, its lease is renewed, so a long LLM call is not taken away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Unpack, cast

from agents import Agent, RunConfig, RunHooks, Runner

from agentstreams._connection import ConnectionSettings, Redis, TLSKwargs, create_client
from agentstreams._constants import DEFAULT_MAX_EVENT_BYTES, DEFAULT_VISIBILITY_TIMEOUT_MS
from agentstreams._coordinator import AgentCoordinator
from agentstreams._events import Event, EventType
from agentstreams._lifecycle import serve_until_stopped
from agentstreams._publisher import Publisher, StreamCap
from agentstreams._signing import SigningKeys, signing_keys_from
from agentstreams._worker import Worker
from agentstreams.errors import ClosedError, InvalidArgumentError, Reject
from agentstreams.integrations.openai_agents._context import (
    TaskInfo,
    reset_current_task,
    set_current_task,
)
from agentstreams.integrations.openai_agents._handoff import (
    is_remote_stand_in,
    pending_remote_handoff,
)
from agentstreams.integrations.openai_agents._hooks import (
    DEFAULT_PUBLISH_TIMEOUT_S,
    CoordinatorHooks,
    compose_hooks,
)
from agentstreams.integrations.openai_agents._status import StatusStore
from agentstreams.integrations.openai_agents._wire import (
    CLAIMED,
    COMPLETED,
    DEFAULT_EVENTS_MAXLEN,
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    DEFAULT_STATUS_TTL_S,
    FAILED,
    OFFERED,
    REPLY_EVENT,
    REPLY_STREAM_TTL_S,
    TASK_EVENT,
    ChainLink,
    Keys,
    MalformedTaskError,
    RunReply,
    TaskEnvelope,
    add_usage,
    to_jsonable,
    usage_dict,
)

__all__ = ["AgentWorker", "AgentWorkerStats"]

logger = logging.getLogger("agentstreams.agents.worker")

DEFAULT_MAX_TURNS = 10
#: Error messages in replies and events are cut to this length.
ERROR_MESSAGE_CHARS = 2000


@dataclass(slots=True)
class AgentWorkerStats:
    """Counters of one ``AgentWorker``."""

    hops_run: int = 0
    completed: int = 0
    handed_off: int = 0
    failed: int = 0
    #: redelivered hops that were already finished (acknowledged without running)
    already_done: int = 0
    expired: int = 0
    #: hops that ran again after a crash or a retry (delivery count > 1)
    reruns: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class AgentWorker:
    """Hosts ``agents`` in this process: runs every hop addressed to them.

    Args:
        agents: the agents to host (names must be unique across the deployment's agents).
        redis_url: the server (ignored when ``client`` is given).
        client: an existing bytes-mode client (its socket timeout must exceed ``block_ms``).
        namespace: key prefix shared with clients and other workers.
        worker_name: this process's consumer name (unique by default; reported in results).
        concurrency: hops run at once, per hosted agent.
        visibility_timeout_ms: a hop held this long by a dead worker goes to another replica.
        hooks: your own ``RunHooks``, called after the publishing ones.
        run_config: base ``RunConfig`` (``model`` must stay unset; trace ids are per run).
        max_turns: default turn limit of a hop (the caller may pass its own).
        events_maxlen: approximate cap of the shared event stream (None: no cap). Inboxes are
            never capped: trim them with ``AgentCoordinator.trim_stream`` (it keeps pending).
        signing_keys: key id -> secret (ordered: the first signs, all verify), the same as the
            clients'. Tasks are verified before they are decoded: an unsigned or forged task is
            dead-lettered as ``unauthenticated`` and no agent runs. Handoffs, replies and
            lifecycle events are signed.
    """

    def __init__(
        self,
        agents: Sequence[Agent[Any]],
        redis_url: str = "redis://localhost:6379",
        *,
        client: Redis | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        group: str = DEFAULT_GROUP,
        worker_name: str | None = None,
        concurrency: int = 8,
        visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS,
        max_deliveries: int = 5,
        block_ms: int = 2000,
        hooks: RunHooks[Any] | None = None,
        run_config: RunConfig | None = None,
        max_turns: int = DEFAULT_MAX_TURNS,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
        status_ttl_s: float = DEFAULT_STATUS_TTL_S,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        shutdown_timeout_s: float = 30.0,
        events_maxlen: int | None = DEFAULT_EVENTS_MAXLEN,
        signing_keys: SigningKeys | Mapping[str, bytes | str] | None = None,
        **tls: Unpack[TLSKwargs],
    ) -> None:
        if isinstance(agents, Agent) or not agents:
            raise InvalidArgumentError("agents must be a non-empty list of Agent objects")
        self.agents: dict[str, Agent[Any]] = {}
        for agent in agents:
            if not isinstance(agent, Agent) or is_remote_stand_in(agent):
                raise InvalidArgumentError(f"cannot host {agent!r}: pass SDK Agent objects")
            if agent.name in self.agents:
                raise InvalidArgumentError(f"two hosted agents are named {agent.name!r}")
            self.agents[agent.name] = agent
        if run_config is not None and run_config.model is not None:
            raise InvalidArgumentError(
                "run_config.model overrides every agent's model, including the stand-ins of "
                "remote handoffs; set the model on each Agent instead")
        if max_turns < 1:
            raise InvalidArgumentError("max_turns must be >= 1")
        self.keys = Keys(namespace)
        self.group = group
        self.name = worker_name or _default_worker_name()
        self.user_hooks = hooks
        self.run_config = run_config or RunConfig()
        self.max_turns = max_turns
        self.publish_timeout_s = publish_timeout_s
        self.max_event_bytes = max_event_bytes
        self.events_cap = StreamCap(value=events_maxlen) if events_maxlen is not None else None
        #: With keys: tasks read from the inboxes are verified (a forged one is dead-lettered
        #: ``unauthenticated`` and no agent runs); handoffs, replies and events are signed
        self.signing_keys = signing_keys_from(signing_keys)
        self.stats = AgentWorkerStats()
        self._external = client
        self._settings = None if client is not None else ConnectionSettings(url=redis_url,
                                                                             **tls)
        self._status_ttl_s = status_ttl_s
        self._client: Redis | None = None
        self._status: StatusStore | None = None
        self._events: AgentCoordinator | None = None
        self._stop_requested = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.workers: dict[str, Worker] = {}
        for name in self.agents:
            worker = Worker(
                redis_url, self.keys.inbox(name), group, self.name, client=client,
                concurrency=concurrency, visibility_timeout_ms=visibility_timeout_ms,
                max_deliveries=max_deliveries, block_ms=block_ms,
                # no prefetch: an idle replica, not a busy one, should take the next hop
                prefetch=0, max_event_bytes=max_event_bytes,
                shutdown_timeout_s=shutdown_timeout_s, signing_keys=self.signing_keys)
            worker.add_handler(self._handle, TASK_EVENT)
            self.workers[name] = worker

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect and start consuming every hosted agent's inbox; returns once reading."""
        if self._client is None:
            if self._external is not None:
                self._client = self._external
            else:
                assert self._settings is not None
                self._client = create_client(self._settings)
            self._status = StatusStore(self._client, self.keys, self._status_ttl_s)
            self._events = AgentCoordinator(client=self._client, stream_name=self.keys.events,
                                            max_event_bytes=self.max_event_bytes,
                                            cap=self.events_cap,
                                            signing_keys=self.signing_keys)
        await asyncio.gather(*(w.start() for w in self.workers.values()))
        # One hosted agent's worker stopping on its own (a misconfiguration, a task that
        # kept failing) stops them all: run() then raises its failure.
        self._watcher = asyncio.create_task(self._watch_workers(),
                                            name=f"agentstreams-agent-worker-{self.name}")
        logger.info("agent worker %s hosting %s", self.name, sorted(self.agents))

    async def _watch_workers(self) -> None:
        waits = [asyncio.ensure_future(w.wait_stop_requested()) for w in self.workers.values()]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.failure is not None:
            self._stop_requested.set()

    @property
    def failure(self) -> BaseException | None:
        """Why a hosted agent's worker stopped on its own (``run()`` raises it), or None."""
        return next((w.failure for w in self.workers.values() if w.failure is not None), None)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking hops, let running ones finish (up to the timeout), close."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await asyncio.gather(*(w.stop(timeout_s) for w in self.workers.values()))
        if self._client is not None and self._client is not self._external:
            await self._client.aclose()
        self._client = None

    def request_stop(self, *, force: bool = False) -> None:
        """Ask ``run()`` to return (non-blocking); ``force``: do not wait for running hops."""
        self._stop_requested.set()
        if force:
            for worker in self.workers.values():
                worker.request_stop(force=True)

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Host the agents until ``request_stop()``, SIGTERM or SIGINT (twice: without waiting
        for running hops). Raises what made a hosted agent's worker stop on its own."""
        await serve_until_stopped(self.start, self.stop, self._stop_requested,
                                  install_signal_handlers=install_signal_handlers,
                                  force_stop=lambda: self.request_stop(force=True))
        if self.failure is not None:
            raise self.failure

    async def __aenter__(self) -> AgentWorker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _connected(self) -> tuple[Redis, StatusStore, AgentCoordinator]:
        if self._client is None or self._status is None or self._events is None:
            raise ClosedError("the AgentWorker is not started (or was stopped)")
        return self._client, self._status, self._events

    # ---------------------------------------------------------------- one hop

    def _hooks(self, task: TaskEnvelope) -> CoordinatorHooks:
        _, _, events = self._connected()
        return CoordinatorHooks(events, session_id=task.session_id,
                                publish_timeout_s=self.publish_timeout_s,
                                extra_fields={"run_id": task.run_id, "hop": task.hop,
                                              "worker": self.name})

    async def _lifecycle(self, hooks: CoordinatorHooks, hop: int, agent: str, status: str,
                         **more: Any) -> None:
        """A ``state_changed`` event for observers (the status hash is the record)."""
        await hooks.publish(EventType.STATE_CHANGED, {
            "agent": agent, "changes": {"status": status, "hop": hop, "agent": agent, **more}})

    async def _handle(self, event: Event) -> None:
        try:
            task = TaskEnvelope.from_event(event)
        except MalformedTaskError as exc:
            raise Reject(f"not a task this worker understands: {exc}") from exc
        agent = self.agents.get(task.agent)
        if agent is None or event.stream != self.keys.inbox(task.agent):
            raise Reject(f"task for agent {task.agent!r} arrived in {event.stream!r}, which is "
                         f"not its inbox on this worker")
        if not self.keys.is_reply_stream(task.reply_to):
            raise Reject(f"task names {task.reply_to!r} as its reply stream, which is not a "
                         f"reply stream of namespace {self.keys.namespace!r}; nothing is "
                         "written there")
        _, status, _ = self._connected()
        hooks = self._hooks(task)
        if task.deadline is not None and time.time() > task.deadline:
            self.stats.expired += 1
            await self._fail(task, hooks, task.agent, "DeadlineExceeded",
                             "the caller's timeout passed before the hop started",
                             event.delivery_count)
            return
        record = {"agent": task.agent, "worker": self.name, "from_agent": task.from_agent,
                  "delivery_count": event.delivery_count}
        if not await status.transition(task.run_id, task.hop, CLAIMED, record):
            self.stats.already_done += 1
            logger.info("hop %s is already finished; acknowledging the redelivery",
                        task.task_id)
            await self._resend_final_reply(task)
            return
        if event.delivery_count > 1:
            self.stats.reruns += 1
        self.stats.hops_run += 1
        await self._lifecycle(hooks, task.hop, task.agent, CLAIMED,
                              delivery_count=event.delivery_count)
        info = TaskInfo(run_id=task.run_id, session_id=task.session_id, hop=task.hop,
                        agent=task.agent, worker=self.name, delivery_count=event.delivery_count)
        run_config = dataclasses.replace(
            self.run_config, trace_id=task.trace_id or self.run_config.trace_id,
            group_id=task.session_id)
        token = set_current_task(info)
        started = time.perf_counter()
        try:
            result = await Runner.run(
                agent, cast(Any, task.input), context=task.context,
                max_turns=task.max_turns or self.max_turns,
                hooks=compose_hooks(hooks, self.user_hooks), run_config=run_config)
        except Exception as exc:  # the agent failed: the run ends, it is not retried
            logger.warning("agent %r failed in session %r: %s: %s",
                           hooks.current_agent or task.agent, task.session_id,
                           type(exc).__name__, exc)
            await self._fail(task, hooks, hooks.current_agent or task.agent,
                             type(exc).__name__, str(exc), event.delivery_count)
            return
        finally:
            reset_current_task(token)
        hop_usage = usage_dict(result.context_wrapper.usage)
        request = pending_remote_handoff(result)
        if request is not None:  # the stand-in's scripted turn is not a real model request
            hop_usage["requests"] = max(0, hop_usage["requests"] - 1)
        link = ChainLink(hop=task.hop, agent=task.agent, worker=self.name,
                         agents=tuple(hooks.agents_started) or (task.agent,),
                         delivery_count=event.delivery_count,
                         duration_ms=round((time.perf_counter() - started) * 1000, 3),
                         usage=hop_usage, handed_off_to=request.target if request else None)
        chain = (*task.chain, link)
        usage = add_usage(task.usage, hop_usage)
        if request is not None:
            await self._hand_off(task, hooks, request.target, request.input or [], chain, usage)
        else:
            await self._complete(task, hooks, result.final_output, result.last_agent.name,
                                 chain, usage)

    async def _hand_off(self, task: TaskEnvelope, hooks: CoordinatorHooks, target: str,
                        conversation: list[dict[str, Any]], chain: tuple[ChainLink, ...],
                        usage: Mapping[str, int]) -> None:
        client, status, _ = self._connected()
        from_agent = hooks.current_agent or task.agent
        following = dataclasses.replace(task, hop=task.hop + 1, agent=target,
                                        from_agent=from_agent, input=conversation,
                                        usage=usage, chain=chain)
        # "offered" is recorded and announced before the task exists, so nobody can see the
        # next hop claimed before it was offered (refused by the status script if it was).
        await status.transition(task.run_id, following.hop, OFFERED,
                                {"agent": target, "from_agent": from_agent})
        await self._lifecycle(hooks, following.hop, target, OFFERED,
                              from_agent=from_agent)
        # Idempotent: if this hop is re-run after a crash, the next hop is not offered twice.
        await Publisher(client, self.keys.inbox(target), max_event_bytes=self.max_event_bytes,
                        signing_keys=self.signing_keys).publish(
            TASK_EVENT, following.to_fields(), idempotency_key=following.task_id)
        await status.transition(task.run_id, task.hop, COMPLETED,
                                {"agent": task.agent, "worker": self.name,
                                 "from_agent": task.from_agent, "handed_off_to": target})
        self.stats.handed_off += 1
        await self._lifecycle(hooks, task.hop, task.agent, COMPLETED, handed_off_to=target)

    async def _reply(self, task: TaskEnvelope, reply: RunReply) -> None:
        client, _, _ = self._connected()
        # Idempotent: a re-run of the final hop cannot answer the caller twice.
        await Publisher(client, task.reply_to, max_event_bytes=self.max_event_bytes,
                        signing_keys=self.signing_keys).publish(
            REPLY_EVENT, reply.to_fields(), idempotency_key=f"{task.run_id}:reply")
        await client.expire(task.reply_to, int(REPLY_STREAM_TTL_S))

    async def _finish(self, task: TaskEnvelope, reply: RunReply,
                      record: Mapping[str, Any]) -> bool:
        """Make the run final, then answer the caller; False if it was already final.

        The status is written first so that a caller holding the reply always sees the run
        finished. A crash between the two is repaired by the redelivery: the hop is refused as
        finished and the stored reply is sent (once: the reply is idempotent).
        """
        _, status, _ = self._connected()
        applied = await status.transition(task.run_id, task.hop, reply.status, record,
                                          reply=reply)
        if applied:
            await self._reply(task, reply)
        else:
            await self._resend_final_reply(task)
        return applied

    async def _resend_final_reply(self, task: TaskEnvelope) -> None:
        _, status, _ = self._connected()
        stored = await status.final_reply(task.run_id)
        if stored is not None:
            await self._reply(task, stored)

    async def _complete(self, task: TaskEnvelope, hooks: CoordinatorHooks, output: Any,
                        last_agent: str, chain: tuple[ChainLink, ...],
                        usage: Mapping[str, int]) -> None:
        reply = RunReply(run_id=task.run_id, session_id=task.session_id, status=COMPLETED,
                         final_output=to_jsonable(output), last_agent=last_agent, chain=chain,
                         usage=usage)
        if not await self._finish(task, reply, {"agent": task.agent, "worker": self.name,
                                                "from_agent": task.from_agent}):
            return
        self.stats.completed += 1
        await self._lifecycle(hooks, task.hop, task.agent, COMPLETED,
                              last_agent=last_agent)

    async def _fail(self, task: TaskEnvelope, hooks: CoordinatorHooks, agent: str,
                    error_type: str, message: str, delivery_count: int) -> None:
        error = {"agent": agent, "error_type": error_type,
                 "error_message": message[:ERROR_MESSAGE_CHARS]}
        reply = RunReply(run_id=task.run_id, session_id=task.session_id, status=FAILED,
                         chain=task.chain, usage=task.usage, error=error)
        if not await self._finish(task, reply, {"agent": task.agent, "worker": self.name,
                                                "from_agent": task.from_agent,
                                                "delivery_count": delivery_count,
                                                "error": error}):
            return
        self.stats.failed += 1
        await hooks.publish(EventType.ERROR, {"agent_name": agent, "error_type": error_type,
                                              "error_message": error["error_message"]})
        await self._lifecycle(hooks, task.hop, task.agent, FAILED, error=error)

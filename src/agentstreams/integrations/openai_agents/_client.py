"""``AgentClient``: start a distributed run and get its result back (request/reply on streams).

The request goes to the first agent's inbox with a correlation id (the run id) and the name of
this client's reply stream; whichever worker finishes the run writes one reply there. A
background reader (XREAD on that private stream) resolves the waiting call. Results never travel
over Pub/Sub, so a reply written while the client is briefly disconnected is still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Unpack

import orjson
from agents.tracing import gen_trace_id

from agentstreams._codec import decode_entry
from agentstreams._connection import ConnectionSettings, Redis, TLSKwargs, create_client
from agentstreams._constants import (
    DEFAULT_MAX_EVENT_BYTES,
    REPLY_BLOCK_MS,
    SOCKET_TIMEOUT_MARGIN_S,
)
from agentstreams._events import EventType
from agentstreams._publisher import Publisher, StreamCap
from agentstreams._reply import ReplyReader
from agentstreams._signing import SigningKeys, signing_keys_from
from agentstreams.errors import (
    ClosedError,
    InvalidArgumentError,
    MalformedEventError,
    SerializationError,
)
from agentstreams.integrations.openai_agents._errors import AgentRunError, AgentRunTimeoutError
from agentstreams.integrations.openai_agents._status import RunStatus, StatusStore
from agentstreams.integrations.openai_agents._wire import (
    DEFAULT_EVENTS_MAXLEN,
    DEFAULT_NAMESPACE,
    DEFAULT_STATUS_TTL_S,
    FAILED,
    OFFERED,
    TASK_EVENT,
    ChainLink,
    Keys,
    MalformedTaskError,
    RunReply,
    TaskEnvelope,
    new_run_id,
)

__all__ = ["AgentClient", "AgentRunResult", "ClientStats"]

logger = logging.getLogger("agentstreams.agents.client")


@dataclass(frozen=True, slots=True)
class AgentRunResult:
    """The outcome of ``AgentClient.run``."""

    session_id: str
    run_id: str
    #: the final output as JSON data (a pydantic ``output_type`` arrives as a dict)
    final_output: Any
    #: name of the agent that produced it
    last_agent: str | None
    #: one link per hop: agent(s), worker, delivery count, duration, usage
    chain: tuple[ChainLink, ...] = ()
    #: tokens of the whole run, every hop included
    usage: Mapping[str, int] = field(default_factory=dict)

    @property
    def agents(self) -> list[str]:
        """Every agent that ran, in order."""
        return [name for link in self.chain for name in (link.agents or (link.agent,))]

    @property
    def workers(self) -> list[str]:
        """The worker of each hop, in order."""
        return [link.worker for link in self.chain]


@dataclass(slots=True)
class ClientStats:
    """Counters of one client."""

    submitted: int = 0
    replies: int = 0
    #: replies for runs nobody waits for any more (timed out) or already answered
    late_or_duplicate_replies: int = 0
    malformed_replies: int = 0
    #: replies refused by signature verification (unsigned, forged, copied): never resolve a run
    unauthenticated_replies: int = 0


class AgentClient:
    """Starts runs on remote agents and waits for their results.

    Args:
        redis_url: the server (ignored when ``client`` is given).
        client: an existing bytes-mode ``redis.asyncio.Redis`` (not closed by ``close()``).
        namespace: key prefix shared with the workers.
        client_id: names this client's reply stream (unique by default).
        signing_keys: key id -> secret (ordered: the first signs, all verify), the same as the
            workers'. Tasks (and events) are signed; a reply whose signature does not verify
            is dropped, counted in ``stats.unauthenticated_replies`` and never resolves a run.
    """

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379",
        *,
        client: Redis | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        client_id: str | None = None,
        status_ttl_s: float = DEFAULT_STATUS_TTL_S,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        events_maxlen: int | None = DEFAULT_EVENTS_MAXLEN,
        signing_keys: SigningKeys | Mapping[str, bytes | str] | None = None,
        **tls: Unpack[TLSKwargs],
    ) -> None:
        self.keys = Keys(namespace)
        self.signing_keys = signing_keys_from(signing_keys)
        self.client_id = client_id or uuid.uuid4().hex[:16]
        self.reply_stream = self.keys.replies(self.client_id)
        self._external = client
        self._settings = None if client is not None else ConnectionSettings(
            url=redis_url,
            socket_timeout_s=REPLY_BLOCK_MS / 1000 + SOCKET_TIMEOUT_MARGIN_S,
            client_name=f"agentstreams:client:{self.client_id}", **tls)
        self._status_ttl_s = status_ttl_s
        self._max_event_bytes = max_event_bytes
        self._events_cap = StreamCap(value=events_maxlen) if events_maxlen is not None else None
        self._verifier = (self.signing_keys.verifier(self.reply_stream)
                          if self.signing_keys is not None else None)
        self._client: Redis | None = None
        self._status: StatusStore | None = None
        self._pending: dict[str, asyncio.Future[RunReply]] = {}
        #: the core's reply reader (XREAD with short blocks, XDEL of what was read)
        self._reader: ReplyReader | None = None
        self._closed = False
        self.stats = ClientStats()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect and start reading replies (``run`` calls it for you)."""
        if self._closed:
            raise ClosedError("this AgentClient was closed; create a new one")
        if self._reader is not None:
            return
        if self._client is None:
            if self._external is not None:
                self._client = self._external
            else:
                assert self._settings is not None
                self._client = create_client(self._settings)
        self._status = StatusStore(self._client, self.keys, self._status_ttl_s)
        self._reader = ReplyReader(self._client, self.reply_stream, self._dispatch,
                                   block_ms=REPLY_BLOCK_MS)
        self._reader.start()

    async def close(self) -> None:
        """Stop reading, fail waiting calls, delete the reply stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            await self._reader.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClosedError("the AgentClient was closed"))
                # A caller whose wait() was cancelled no longer looks: no "never retrieved".
                future.exception()
        self._pending.clear()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.delete(self.reply_stream)
            if self._client is not self._external:
                await self._client.aclose()
        self._client = None

    async def __aenter__(self) -> AgentClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _connected(self) -> tuple[Redis, StatusStore]:
        if self._client is None or self._status is None:
            raise ClosedError("the AgentClient is not started (or was closed)")
        return self._client, self._status

    # ---------------------------------------------------------------- requests

    async def submit(
        self,
        agent: str,
        input: str | Sequence[Mapping[str, Any]],
        *,
        session_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        max_turns: int | None = None,
    ) -> str:
        """Offer a run to ``agent``'s inbox; returns the run id (``wait`` for its result).

        ``timeout_s`` also becomes the run's deadline: workers drop hops that start after it.
        """
        if not isinstance(agent, str) or not agent:
            raise InvalidArgumentError("agent must be the name of a hosted agent")
        items: str | list[dict[str, Any]]
        if isinstance(input, str):
            items = input
        else:
            if not all(isinstance(item, Mapping) for item in input):
                raise InvalidArgumentError("input must be a string or a list of SDK input items")
            items = [dict(item) for item in input]
        if context is not None:
            if not isinstance(context, Mapping):
                raise InvalidArgumentError("context must be a JSON object (a mapping) or None")
            try:
                orjson.dumps(context)
            except TypeError as exc:
                raise SerializationError(f"context is not JSON-serialisable: {exc}") from exc
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidArgumentError("timeout_s must be positive (or None)")
        await self.start()
        client, status = self._connected()
        run_id = new_run_id()
        session_id = session_id or uuid.uuid4().hex
        task = TaskEnvelope(
            run_id=run_id, session_id=session_id, hop=0, agent=agent, from_agent=None,
            reply_to=self.reply_stream, input=items,
            context=dict(context) if context is not None else None, trace_id=gen_trace_id(),
            deadline=time.time() + timeout_s if timeout_s is not None else None,
            max_turns=max_turns)
        self._pending[run_id] = asyncio.get_running_loop().create_future()
        try:
            # Recorded and announced before the task exists: nobody sees it claimed first.
            await status.start_run(run_id=run_id, session_id=session_id,
                                   reply_to=self.reply_stream)
            await status.transition(run_id, 0, OFFERED, {"agent": agent, "from_agent": None})
            with contextlib.suppress(Exception):  # observers only; the hash is the record
                await Publisher(client, self.keys.events, cap=self._events_cap,
                                signing_keys=self.signing_keys).publish(
                    EventType.STATE_CHANGED, {
                        "session_id": session_id, "run_id": run_id, "hop": 0, "agent": agent,
                        "changes": {"status": OFFERED, "hop": 0, "agent": agent},
                        "timestamp": time.time()})
            inbox = Publisher(client, self.keys.inbox(agent),
                              max_event_bytes=self._max_event_bytes,
                              signing_keys=self.signing_keys)
            await inbox.publish(TASK_EVENT, task.to_fields(), idempotency_key=task.task_id)
        except BaseException:
            self._pending.pop(run_id, None)
            raise
        self.stats.submitted += 1
        return run_id

    async def wait(self, run_id: str, timeout_s: float | None = None) -> AgentRunResult:
        """Wait for the result of a run this client submitted."""
        future = self._pending.get(run_id)
        if future is None:
            raise InvalidArgumentError(f"run {run_id!r} was not submitted by this client (or "
                                       "its result was already taken)")
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            self._pending.pop(run_id, None)
            future.cancel()
            _, store = self._connected()
            run_status = await store.get(run_id)
            raise AgentRunTimeoutError(
                session_id=run_status.session_id if run_status else "", run_id=run_id,
                timeout_s=timeout_s or 0.0, status=run_status) from None
        self._pending.pop(run_id, None)
        if reply.status == FAILED:
            error = reply.error or {}
            raise AgentRunError(agent=error.get("agent"),
                                error_type=str(error.get("error_type", "Error")),
                                error_message=str(error.get("error_message", "")),
                                session_id=reply.session_id, run_id=reply.run_id)
        return AgentRunResult(session_id=reply.session_id, run_id=reply.run_id,
                              final_output=reply.final_output, last_agent=reply.last_agent,
                              chain=reply.chain, usage=reply.usage)

    async def run(
        self,
        agent: str,
        input: str | Sequence[Mapping[str, Any]],
        *,
        session_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        timeout_s: float | None = 60.0,
        max_turns: int | None = None,
    ) -> AgentRunResult:
        """Run ``agent`` (hosted by some ``AgentWorker``) on ``input`` and return the result.

        Raises ``AgentRunError`` when an agent of the chain failed, ``AgentRunTimeoutError`` when
        no result came within ``timeout_s``.
        """
        run_id = await self.submit(agent, input, session_id=session_id, context=context,
                                   timeout_s=timeout_s, max_turns=max_turns)
        return await self.wait(run_id, timeout_s)

    async def status(self, session_id: str) -> RunStatus | None:
        """Lifecycle of the session's latest run (None when the session is unknown)."""
        await self.start()
        _, store = self._connected()
        run_id = await store.latest_run(session_id)
        return await store.get(run_id) if run_id is not None else None

    async def run_status(self, run_id: str) -> RunStatus | None:
        """Lifecycle of one run."""
        await self.start()
        _, store = self._connected()
        return await store.get(run_id)

    # ---------------------------------------------------------------- replies

    def _dispatch(self, msg_id: str, fields: dict[bytes, bytes]) -> None:
        if self._verifier is not None:  # before anything decodes the entry
            problem = self._verifier.problem(fields)
            if problem is not None:
                self.stats.unauthenticated_replies += 1
                logger.warning("ignored an unauthenticated reply %s: %s", msg_id, problem,
                               extra={"stream": self.reply_stream})
                return
        try:
            event = decode_entry(msg_id, fields, stream=self.reply_stream)
            reply = RunReply.from_mapping(event)
        except (MalformedEventError, MalformedTaskError) as exc:
            self.stats.malformed_replies += 1
            logger.warning("ignored a malformed reply %s: %s", msg_id, exc,
                           extra={"stream": self.reply_stream})
            return
        future = self._pending.get(reply.run_id)
        if future is None or future.done():
            self.stats.late_or_duplicate_replies += 1
            logger.info("reply for run %s arrived late or twice; ignored", reply.run_id)
            return
        self.stats.replies += 1
        future.set_result(reply)

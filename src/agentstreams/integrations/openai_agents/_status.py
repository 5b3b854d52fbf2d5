"""The lifecycle of a run, kept in one hash per run so callers and observers can ask for it.

A run is a chain of hops. Each hop goes ``offered`` (in the target's inbox) -> ``claimed`` (a
worker runs it) -> ``completed`` (final output, or handed off to the next hop) or ``failed``.
The run's status is the state of its latest hop; ``completed``/``failed`` with the final reply
are terminal. Transitions are applied by one server-side script, so a late or duplicate writer
(a redelivered hop, a slow replica) can never move a hop or a finished run backwards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agentstreams._connection import Redis, call
from agentstreams._streams import to_str
from agentstreams.integrations.openai_agents._wire import (
    COMPLETED,
    FAILED,
    Keys,
    RunReply,
    to_jsonable,
)

__all__ = ["HopStatus", "RunStatus", "StatusStore"]

#: KEYS: run hash. ARGV: hop, state, hop record JSON, ttl ms, final status ('' = not final),
#: reply JSON. Returns 1 when applied, 0 when the hop or the run was already further along.
_TRANSITION: Final = """
local rank = {offered = 0, claimed = 1, completed = 2, failed = 2}
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
local hop = ARGV[1]
local old = redis.call('HGET', KEYS[1], 'hop:' .. hop .. ':state')
if old and (rank[old] == 2 or rank[ARGV[2]] < rank[old]) then return 0 end
redis.call('HSET', KEYS[1], 'hop:' .. hop .. ':state', ARGV[2], 'hop:' .. hop, ARGV[3])
local top = tonumber(redis.call('HGET', KEYS[1], 'hop') or '-1')
if tonumber(hop) >= top then
  redis.call('HSET', KEYS[1], 'hop', hop, 'status', ARGV[2], 'updated_at', ARGV[7])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'final', ARGV[5], 'status', ARGV[5], 'reply', ARGV[6],
             'updated_at', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass(frozen=True, slots=True)
class HopStatus:
    """One hop's lifecycle record."""

    hop: int
    agent: str
    state: str
    worker: str | None = None
    from_agent: str | None = None
    handed_off_to: str | None = None
    delivery_count: int | None = None
    updated_at: float | None = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What ``AgentClient.status(session_id)`` returns: where the session's latest run stands."""

    session_id: str
    run_id: str
    #: offered, claimed, completed or failed
    status: str
    #: agent of the latest hop, and the worker running (or that ran) it
    agent: str | None
    worker: str | None
    hop: int
    hops: tuple[HopStatus, ...]
    created_at: float | None = None
    updated_at: float | None = None
    #: set once the run is finished
    reply: RunReply | None = None

    @property
    def done(self) -> bool:
        """True when the run completed or failed (its reply is then in ``reply``)."""
        return self.reply is not None

    @property
    def final_output(self) -> Any:
        """The final output of a completed run (None otherwise)."""
        return self.reply.final_output if self.reply is not None else None

    @property
    def error(self) -> Mapping[str, Any] | None:
        """``{"agent", "error_type", "error_message"}`` of a failed run."""
        return self.reply.error if self.reply is not None else None


def _decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {to_str(k): to_str(v) for k, v in raw.items()}


class StatusStore:
    """Reads and writes run status hashes (shared by clients and workers)."""

    def __init__(self, client: Redis, keys: Keys, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self._transition = client.register_script(_TRANSITION)

    async def start_run(self, *, run_id: str, session_id: str, reply_to: str) -> None:
        """Record a new run and point its session at it."""
        key = self.keys.run(run_id)
        now = time.time()

        async def write() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"run_id": run_id, "session_id": session_id,
                                        "reply_to": reply_to, "created_at": repr(now)})
                pipe.pexpire(key, self.ttl_ms)
                pipe.set(self.keys.session(session_id), run_id, px=self.ttl_ms)
                await pipe.execute()

        await call(write, stream=key)

    async def transition(self, run_id: str, hop: int, state: str, record: Mapping[str, Any], *,
                         reply: RunReply | None = None) -> bool:
        """Move ``hop`` to ``state``; with ``reply`` the run becomes final. False when refused
        (the hop or the run is already further along: someone else did this work)."""
        key = self.keys.run(run_id)
        body = {**record, "hop": hop, "state": state, "updated_at": time.time()}
        args: list[str | int] = [hop, state, orjson.dumps(to_jsonable(body)).decode(), self.ttl_ms,
                reply.status if reply is not None else "",
                reply.to_json() if reply is not None else "", repr(time.time())]
        applied = await call(lambda: self._transition(keys=[key], args=args), stream=key)
        return bool(applied)

    async def final_reply(self, run_id: str) -> RunReply | None:
        """The reply of a finished run (None while it runs)."""
        key = self.keys.run(run_id)
        value = await call(lambda: self.client.hget(key, "reply"), stream=key)
        return RunReply.from_mapping(orjson.loads(value)) if value else None

    async def latest_run(self, session_id: str) -> str | None:
        """Id of the session's latest run."""
        key = self.keys.session(session_id)
        value = await call(lambda: self.client.get(key), stream=key)
        return to_str(value) if value is not None else None

    async def get(self, run_id: str) -> RunStatus | None:
        """The run's status, or None when unknown (or expired)."""
        key = self.keys.run(run_id)
        raw = await call(lambda: self.client.hgetall(key), stream=key)
        if not raw:
            return None
        fields = _decode_hash(raw)
        hops: list[HopStatus] = []
        for name, value in fields.items():
            if not name.startswith("hop:") or name.endswith(":state"):
                continue
            record = orjson.loads(value)
            hops.append(HopStatus(
                hop=int(record["hop"]), agent=str(record.get("agent")),
                state=str(record["state"]), worker=record.get("worker"),
                from_agent=record.get("from_agent"), handed_off_to=record.get("handed_off_to"),
                delivery_count=record.get("delivery_count"),
                updated_at=record.get("updated_at"), error=record.get("error")))
        hops.sort(key=lambda h: h.hop)
        top = int(fields.get("hop", "-1"))
        latest = next((h for h in hops if h.hop == top), None)
        reply = RunReply.from_mapping(orjson.loads(fields["reply"])) if "reply" in fields \
            else None
        status = fields.get("status", "offered")
        if reply is not None and reply.status in (COMPLETED, FAILED):
            status = reply.status
        return RunStatus(
            session_id=fields.get("session_id", ""), run_id=run_id, status=status,
            agent=latest.agent if latest else None, worker=latest.worker if latest else None,
            hop=top, hops=tuple(hops),
            created_at=float(fields["created_at"]) if "created_at" in fields else None,
            updated_at=float(fields["updated_at"]) if "updated_at" in fields else None,
            reply=reply)

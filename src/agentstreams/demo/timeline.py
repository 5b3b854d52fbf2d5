"""What the demo's observer makes of the events it sees: timeline rows and the closing numbers.

Pure bookkeeping (no Redis, no terminal), so the runner and every display share one truth.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentstreams.demo.agent import READY_EVENT, STOP_EVENT
from agentstreams.events import EventType

__all__ = ["DemoSummary", "RunTracker", "TimelineEntry", "percentile", "session_id_for"]

#: Longest detail text shown on one timeline row.
DETAIL_CHARS = 64


def session_id_for(run_id: str, index: int) -> str:
    """Session id of demo task ``index``: unique per run, so a reused stream cannot confuse us."""
    return f"task-{index}-{run_id}"


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _short(text: object, limit: int = DETAIL_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One row of the live timeline."""

    offset_s: float
    session: str
    type: str
    actor: str
    detail: str
    session_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``)."""
        return {"t": round(self.offset_s, 4), "session": self.session_id or None,
                "type": self.type, "actor": self.actor, "detail": self.detail}


@dataclass(slots=True)
class DemoSummary:
    """The closing numbers of one demo run."""

    stream: str
    server: str
    sessions_started: int = 0
    sessions_completed: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    handoffs: int = 0
    duplicates: int = 0
    tokens_used: int = 0
    wall_s: float | None = None
    delivery_ms: list[float] = field(default_factory=list)
    pickup_ms: list[float] = field(default_factory=list)
    session_ms: list[float] = field(default_factory=list)
    dead_letters: int | None = None
    agent_exit_codes: dict[str, int | None] = field(default_factory=dict)
    failure: str | None = None

    @property
    def lost(self) -> int:
        """Sessions started but never completed."""
        return self.sessions_started - self.sessions_completed

    @property
    def problem(self) -> str | None:
        """Why the run failed, or None when every session completed, no error event was
        published, nothing was dead-lettered and every agent exited cleanly."""
        errors = self.events_by_type.get(EventType.ERROR.value, 0)
        unclean = [name for name, code in self.agent_exit_codes.items() if code != 0]
        if self.failure:
            return self.failure
        if self.sessions_started == 0:
            return "no task was started"
        if self.lost:
            return f"{self.lost} of {self.sessions_started} tasks never completed"
        if errors:
            return f"{errors} error events"
        if self.dead_letters:
            return f"{self.dead_letters} events dead-lettered"
        if unclean:
            return f"agents did not exit cleanly: {', '.join(unclean)}"
        return None

    @property
    def ok(self) -> bool:
        """True when there is no ``problem``."""
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``)."""
        def ms(values: list[float], pct: float) -> float | None:
            value = percentile(values, pct)
            return None if value is None else round(value, 3)

        return {
            "ok": self.ok, "failure": self.problem, "stream": self.stream,
            "server": self.server, "sessions_started": self.sessions_started,
            "sessions_completed": self.sessions_completed, "lost": self.lost,
            "events_by_type": dict(self.events_by_type), "events": sum(
                self.events_by_type.values()), "handoffs": self.handoffs,
            "duplicates": self.duplicates, "tokens_used": self.tokens_used,
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            "handoff_delivery_ms": {"p50": ms(self.delivery_ms, 50),
                                    "p99": ms(self.delivery_ms, 99)},
            "handoff_pickup_ms": {"p50": ms(self.pickup_ms, 50), "p99": ms(self.pickup_ms, 99)},
            "session_ms": {"p50": ms(self.session_ms, 50), "max": ms(self.session_ms, 100)},
            "dead_letters": self.dead_letters, "agent_exit_codes": self.agent_exit_codes,
        }


class RunTracker:
    """Follows one demo run through the events the observer receives.

    ``record`` turns an event into a timeline row (None for events of other runs) and updates
    the counters: readiness of the agents, sessions completed, latencies, duplicates.
    """

    def __init__(self, run_id: str, stream: str, server: str, tasks: int,
                 agents: tuple[str, ...], started_at: float) -> None:
        self.run_id = run_id
        self.started_at = started_at
        self.agents = agents
        self.summary = DemoSummary(stream=stream, server=server)
        self.session_labels = {session_id_for(run_id, i): f"task-{i}"
                               for i in range(1, tasks + 1)}
        self.ready: dict[str, int] = {}
        self.tasks_published_at: float | None = None
        self._completed: set[str] = set()
        self._seen_event_ids: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._handoff_ts: dict[tuple[str, str], float] = {}
        self._first_ts: dict[str, float] = {}

    @property
    def all_ready(self) -> bool:
        """Every agent of the chain announced itself."""
        return all(name in self.ready for name in self.agents)

    @property
    def done(self) -> bool:
        """Every task of this run reached its final state."""
        return len(self._completed) == len(self.session_labels)

    @property
    def completed(self) -> int:
        """Sessions completed so far."""
        return len(self._completed)

    def tasks_published(self, at: float) -> None:
        """Note that the tasks went out (the start of the measured wall time)."""
        self.tasks_published_at = at
        self.summary.sessions_started = len(self.session_labels)

    def record(self, event: dict[str, Any], received_at: float) -> TimelineEntry | None:
        """Account for one observed event; returns its timeline row, or None if not ours."""
        kind = str(event.get("type"))
        session_id = event.get("session_id")
        if kind in (READY_EVENT, STOP_EVENT):
            if event.get("run_id") != self.run_id:
                return None
        elif not isinstance(session_id, str) or session_id not in self.session_labels:
            return None
        event_id = event.get("_event_id")
        if isinstance(event_id, str):
            if event_id in self._seen_event_ids:
                self.summary.duplicates += 1
                return None
            self._seen_event_ids.add(event_id)
        self._counts[kind] += 1
        self.summary.events_by_type = dict(self._counts)
        ts = _number(event.get("timestamp")) or received_at
        label = self.session_labels.get(str(session_id), "")
        actor, detail = self._describe(kind, event, ts, received_at)
        return TimelineEntry(ts - self.started_at, label, kind, actor, _short(detail),
                             str(session_id) if session_id else "")

    def _describe(self, kind: str, event: dict[str, Any], ts: float,
                  received_at: float) -> tuple[str, str]:
        session = str(event.get("session_id"))
        agent = str(event.get("agent_name", ""))
        summary = self.summary
        if kind == READY_EVENT:
            self.ready[agent] = int(event.get("pid", 0))
            return agent, f"ready (pid {event.get('pid')})"
        if kind == STOP_EVENT:
            return "demo", "stop"
        if kind == EventType.HANDOFF_READY.value:
            source, target = str(event.get("from_agent")), str(event.get("to_agent"))
            summary.handoffs += 1
            summary.delivery_ms.append(max(0.0, (received_at - ts) * 1000))
            self._handoff_ts[(session, target)] = ts
            self._first_ts.setdefault(session, ts)
            context = event.get("context") or {}
            return f"{source} → {target}", _handoff_detail(source, context)
        if kind == EventType.AGENT_STARTED.value:
            handed = self._handoff_ts.get((session, agent))
            if handed is not None:
                summary.pickup_ms.append(max(0.0, (ts - handed) * 1000))
            return agent, f"started: {event.get('input_summary', '')}"
        if kind == EventType.TOOL_RESULT.value:
            result = event.get("result")
            shown = result.get("finding", result) if isinstance(result, dict) else result
            elapsed = _number(event.get("execution_time_ms")) or 0.0
            return f"tool {event.get('tool_name')}", f"{elapsed:.0f} ms: {shown}"
        if kind == EventType.AGENT_COMPLETED.value:
            tokens = int(_number(event.get("tokens_used")) or 0)
            summary.tokens_used += tokens
            duration = _number(event.get("duration_ms")) or 0.0
            return agent, f"done in {duration:.0f} ms, {tokens} tokens: " \
                          f"{event.get('output_summary', '')}"
        if kind == EventType.STATE_CHANGED.value:
            changes = event.get("changes") or {}
            status = str(changes.get("status", "")) if isinstance(changes, dict) else ""
            if status == "completed" and session not in self._completed:
                self._completed.add(session)
                summary.sessions_completed = len(self._completed)
                first = self._first_ts.get(session)
                if first is not None:
                    summary.session_ms.append((ts - first) * 1000)
                if self.tasks_published_at is not None:
                    summary.wall_s = max(summary.wall_s or 0.0, ts - self.tasks_published_at)
            result = changes.get("result", "") if isinstance(changes, dict) else ""
            by = changes.get("completed_by", "") if isinstance(changes, dict) else ""
            return str(by or "session"), f"{status}: {result}"
        if kind == EventType.ERROR.value:
            return agent or "?", f"{event.get('error_type')}: {event.get('error_message')}"
        return agent or "?", ""


def _handoff_detail(source: str, context: object) -> str:
    if not isinstance(context, dict):
        return ""
    if source == "user":
        return str(context.get("task", ""))
    if "notes" in context:
        return f"{len(context['notes'])} findings"
    if "plan" in context:
        return "plan: " + "; ".join(str(step) for step in context["plan"])
    return ", ".join(sorted(context))

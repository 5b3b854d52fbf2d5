"""What the demo makes of the events it observes: timeline rows, per-session state, the summary.

Pure bookkeeping (no Redis, no terminal), so the runner and every display share one truth.
The input is the shared event stream of the agents (``<namespace>:events``): lifecycle events
from ``AgentWorker``/``CoordinatorHooks``, ``state_changed`` hop transitions, and the demo's own
worker announcements; the caller's view (results of ``AgentClient.run``) is added by the runner.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentstreams._events import EventType
from agentstreams.demo.worker import READY_EVENT, STOPPED_EVENT, TOOL_STARTED_EVENT

__all__ = [
    "KILLED_EVENT",
    "DemoSummary",
    "DemoTracker",
    "KillReport",
    "SessionView",
    "TimelineEntry",
    "WorkerView",
    "percentile",
]

#: Published by the runner right after it killed a worker (what it held, when).
KILLED_EVENT = "demo_worker_killed"
#: Longest detail text shown on one timeline row.
DETAIL_CHARS = 72
#: Session states that mean a worker is holding the session's current hop.
_HELD = ("claimed", "searching")


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


def _tool_result(result: object) -> str:
    """A search result as "3 notes: first note"; anything else as it is."""
    try:
        data = json.loads(result) if isinstance(result, str) else result
    except ValueError:
        return str(result)
    notes = data.get("notes") if isinstance(data, Mapping) else None
    if isinstance(notes, list) and notes:
        return f"{len(notes)} notes: {notes[0]}; …"
    return str(result)


def _int(value: object, default: int = 0) -> int:
    number = _number(value)
    return int(number) if number is not None else default


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One row of the event log."""

    offset_s: float
    #: short session label (``s1``), "" for worker-level rows
    session: str
    #: what happened, as shown (``hop claimed``, ``tool_result``, ``KILL -9`` ...)
    kind: str
    agent: str
    worker: str
    detail: str
    #: the event's type on the stream
    type: str
    #: styling hint for the terminal: "", "handoff", "kill", "recovery", "done", "error"
    tone: str = ""
    session_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``)."""
        return {"t": round(self.offset_s, 4), "session": self.session_id or None,
                "type": self.type, "kind": self.kind, "agent": self.agent or None,
                "worker": self.worker or None, "detail": self.detail}


@dataclass(slots=True)
class WorkerView:
    """One worker process as the demo sees it."""

    name: str
    agent: str
    pid: int | None = None
    #: starting, ready, killed, stopped
    state: str = "starting"
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class SessionView:
    """Where one session stands (from events, then from the caller's result)."""

    session_id: str
    label: str
    prompt: str
    #: waiting, offered, claimed, searching, orphaned, completed, failed
    status: str = "waiting"
    hop: int = -1
    agent: str = ""
    worker: str = ""
    delivery: int = 0
    #: (agent, worker, delivery count) of each hop's latest claim
    hops: dict[int, tuple[str, str, int]] = field(default_factory=dict)
    submitted_at: float | None = None
    answered_at: float | None = None
    #: results the caller received for this session (exactly 1 is right)
    answers: int = 0
    answer: str | None = None
    error: str | None = None
    #: the run's final ``state_changed`` was observed
    final_seen: bool = False

    @property
    def chain(self) -> str:
        """The worker of each hop: ``triage-1 → research-2 (delivery 2) → writer-1``."""
        parts = []
        for hop in sorted(self.hops):
            _agent, worker, delivery = self.hops[hop]
            parts.append(worker + (f" (delivery {delivery})" if delivery > 1 else ""))
        return " → ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"session": self.session_id, "label": self.label, "status": self.status,
                "answers": self.answers, "hops": [
                    {"hop": hop, "agent": a, "worker": w, "delivery_count": d}
                    for hop, (a, w, d) in sorted(self.hops.items())],
                "answer": self.answer, "error": self.error}


@dataclass(slots=True)
class KillReport:
    """The kill scene: who died, what it held, who took it over, how fast."""

    worker: str
    pid: int
    at: float
    #: labels of the sessions whose hop the victim held
    held: list[str] = field(default_factory=list)
    reclaimed_by: str | None = None
    #: kill -> first re-claim of a held hop by another worker
    recovery_s: float | None = None
    #: each held session's re-claim: label -> (worker, seconds after the kill)
    reclaims: dict[str, tuple[str, float]] = field(default_factory=dict)

    def reclaim_text(self) -> str:
        """``research-1 re-claimed s1 0.84 s later, s2 1.35 s later`` ("" before any)."""
        if not self.reclaims:
            return ""
        by: dict[str, list[str]] = {}
        for label in sorted(self.reclaims, key=_label_key):
            worker, after = self.reclaims[label]
            by.setdefault(worker, []).append(
                f"{'it' if len(self.held) == 1 else label} {after:.2f} s later")
        return "; ".join(f"{worker} re-claimed {', '.join(parts)}" for worker, parts in by.items())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"worker": self.worker, "pid": self.pid, "held": self.held,
                "reclaimed_by": self.reclaimed_by,
                "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 3),
                "reclaims": {label: {"worker": w, "after_s": round(after, 3)}
                             for label, (w, after) in self.reclaims.items()}}


def _label_key(label: str) -> tuple[int, str]:
    digits = label[1:]
    return (int(digits), label) if digits.isdigit() else (1 << 30, label)


@dataclass(slots=True)
class DemoSummary:
    """The closing numbers of one demo run."""

    namespace: str
    server: str
    model: str
    #: sessions the run was to send
    sessions_planned: int = 0
    #: sessions whose request was sent
    sessions_started: int = 0
    sessions_completed: int = 0
    sessions_failed: int = 0
    #: results the caller received beyond the first per session (must be 0)
    duplicates: int = 0
    handoffs: int = 0
    #: hops claimed with a delivery count above 1 (re-runs after the kill)
    redeliveries: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    kill: KillReport | None = None
    dead_letters: int | None = None
    wall_s: float | None = None
    handoff_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    worker_exits: dict[str, str] = field(default_factory=dict)
    sessions: list[SessionView] = field(default_factory=list)
    failure: str | None = None
    #: the run was ended by Ctrl-C
    interrupted: bool = False

    @property
    def never_started(self) -> int:
        """Sessions whose request was never sent (start-up failed or was interrupted)."""
        return max(0, self.sessions_planned - self.sessions_started)

    @property
    def lost(self) -> int:
        """Sessions submitted that never got a result (neither an answer nor an error)."""
        return max(0, self.sessions_started - self.sessions_completed - self.sessions_failed)

    @property
    def sample_answer(self) -> str | None:
        """The first session's answer."""
        return next((s.answer for s in self.sessions if s.answer), None)

    @property
    def problem(self) -> str | None:
        """Why the run failed, or None: every session completed exactly once, nothing lost,
        no error event, nothing dead-lettered, every worker not killed on purpose stopped
        cleanly."""
        errors = self.events_by_type.get(EventType.ERROR.value, 0)
        unclean = [name for name, how in self.worker_exits.items()
                   if how not in ("ok", "killed (-9)", "stopped during start-up")]
        if self.failure:
            return self.failure
        if self.sessions_started == 0:
            return "no session was started"
        if self.sessions_failed:
            return f"{self.sessions_failed} of {self.sessions_started} sessions failed"
        if self.lost:
            return f"{self.lost} of {self.sessions_started} sessions never completed"
        if self.duplicates:
            return f"the caller received {self.duplicates} duplicate results"
        if errors:
            return f"{errors} error events"
        if self.dead_letters:
            return f"{self.dead_letters} hops dead-lettered"
        if unclean:
            return f"workers did not stop cleanly: {', '.join(unclean)}"
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
            "ok": self.ok, "failure": self.problem, "namespace": self.namespace,
            "server": self.server, "model": self.model,
            "interrupted": self.interrupted,
            "sessions_planned": self.sessions_planned,
            "sessions_started": self.sessions_started,
            "never_started": self.never_started,
            "sessions_completed": self.sessions_completed,
            "sessions_failed": self.sessions_failed, "lost": self.lost,
            "duplicates": self.duplicates, "handoffs": self.handoffs,
            "redeliveries": self.redeliveries,
            "kill": self.kill.to_dict() if self.kill else None,
            "dead_letters": self.dead_letters,
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            "handoff_latency_ms": {"p50": ms(self.handoff_ms, 50),
                                   "p99": ms(self.handoff_ms, 99)},
            "tokens": self.tokens, "events": sum(self.events_by_type.values()),
            "events_by_type": dict(self.events_by_type), "worker_exits": self.worker_exits,
            "sessions": [s.to_dict() for s in self.sessions],
        }


class DemoTracker:
    """Follows one demo run through the events on its stream.

    ``record`` turns an event into a timeline row and updates the sessions, the workers and the
    counters; the runner adds what only it knows (submissions, results, exits).
    """

    def __init__(self, summary: DemoSummary, sessions: Mapping[str, str],
                 workers: Mapping[str, str], started_at: float) -> None:
        """``sessions``: session id -> prompt (labelled s1, s2, …); ``workers``: name -> agent."""
        self.summary = summary
        self.started_at = started_at
        self.sessions = {sid: SessionView(sid, f"s{i}", prompt)
                         for i, (sid, prompt) in enumerate(sessions.items(), 1)}
        self.workers = {name: WorkerView(name, agent) for name, agent in workers.items()}
        summary.sessions = list(self.sessions.values())
        summary.sessions_planned = len(self.sessions)
        summary.sessions_started = 0
        self._seen_event_ids: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._offered_at: dict[tuple[str, int], float] = {}
        self._claimed: set[tuple[str, int]] = set()

    # ---------------------------------------------------------------- conditions

    @property
    def all_ready(self) -> bool:
        """Every worker announced that it consumes its inbox."""
        return all(w.state != "starting" for w in self.workers.values())

    @property
    def all_final_seen(self) -> bool:
        """The final transition of every answered session's run has been observed."""
        return all(s.final_seen for s in self.sessions.values() if s.answers)

    def held_by(self, worker: str) -> list[SessionView]:
        """Sessions whose current hop ``worker`` holds (claimed, maybe inside its tool)."""
        return [s for s in self.sessions.values()
                if s.worker == worker and s.status in _HELD]

    # ---------------------------------------------------------------- caller's view

    def submitted(self, session_id: str, at: float) -> None:
        """The caller sent the session's request."""
        session = self.sessions[session_id]
        if session.submitted_at is None:
            self.summary.sessions_started += 1
        session.submitted_at = at

    def answered(self, session_id: str, at: float, answer: str | None = None,
                 error: str | None = None) -> None:
        """The caller got the session's result (an answer, or the error it raised)."""
        session = self.sessions[session_id]
        session.answers += 1
        if session.answers > 1:
            self.summary.duplicates += 1
            return
        session.answered_at = at
        if error is None:
            session.answer = answer
            session.status = "completed"
            self.summary.sessions_completed += 1
        else:
            session.error = error
            session.status = "failed"
            self.summary.sessions_failed += 1
        start = min((s.submitted_at for s in self.sessions.values()
                     if s.submitted_at is not None), default=None)
        if start is not None:
            self.summary.wall_s = max(self.summary.wall_s or 0.0, at - start)

    # ---------------------------------------------------------------- events

    def record(self, event: Mapping[str, Any], received_at: float) -> TimelineEntry | None:
        """Account for one observed event; its timeline row (None if not this run's)."""
        kind = str(event.get("type"))
        session_id = event.get("session_id")
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        worker_name = str(event.get("worker") or "")
        if session is None and worker_name not in self.workers:
            return None
        event_id = getattr(event, "event_id", None) or event.get("_event_id")
        if isinstance(event_id, str):
            if event_id in self._seen_event_ids:
                return None  # the stream never repeats an event; a re-read would
            self._seen_event_ids.add(event_id)
        self._counts[kind] += 1
        self.summary.events_by_type = dict(self._counts)
        ts = _number(event.get("timestamp")) or received_at
        row = self._describe(kind, event, session, worker_name, ts)
        if row is None:
            return None
        shown, agent, detail, tone = row
        return TimelineEntry(ts - self.started_at, session.label if session else "", shown,
                             agent, worker_name, _short(detail), kind, tone,
                             session.session_id if session else "")

    def _describe(self, kind: str, event: Mapping[str, Any], session: SessionView | None,
                  worker_name: str, ts: float) -> tuple[str, str, str, str] | None:
        """(shown kind, agent, detail, tone) of one event, updating the state on the way."""
        agent = str(event.get("agent_name") or event.get("agent") or "")
        worker = self.workers.get(worker_name)
        if kind == READY_EVENT and worker is not None:
            worker.state, worker.pid = "ready", _int(event.get("pid"))
            return "worker ready", worker.agent, f"consuming the {worker.agent} inbox " \
                                                 f"(pid {worker.pid})", ""
        if kind == STOPPED_EVENT and worker is not None:
            worker.state = "stopped"
            stats = event.get("stats")
            worker.stats = {k: _int(v) for k, v in stats.items()} \
                if isinstance(stats, Mapping) else {}
            runs, reruns = worker.stats.get("hops_run", 0), worker.stats.get("reruns", 0)
            return "worker stopped", worker.agent, \
                f"after SIGTERM: ran {runs} hops, {reruns} of them re-runs", ""
        if kind == KILLED_EVENT and worker is not None:
            worker.state = "killed"
            # Every event the victim published precedes this one on the stream, so what the
            # tracker says it holds now is complete; the runner's list is kept too.
            held = sorted({str(x) for x in event.get("held") or []}
                          | {s.label for s in self.held_by(worker_name)}, key=_label_key)
            self.summary.kill = KillReport(worker_name, _int(event.get("pid")), ts, held)
            for sid in self.sessions.values():
                if sid.label in held:
                    sid.status = "orphaned"
            if not held:
                what = "holding no hop"
            elif len(held) == 1:
                what = f"holding {held[0]}: its hop stays pending in the inbox group"
            else:
                what = f"holding {', '.join(held)}: their hops stay pending in the inbox group"
            return "KILL -9", worker.agent, f"pid {event.get('pid')}, {what}", "kill"
        if session is None:
            return None
        if kind == EventType.STATE_CHANGED.value:
            return self._transition(event, session, worker_name, ts)
        if kind == TOOL_STARTED_EVENT:
            session.status = "searching"
            delivery = _int(event.get("delivery_count"), 1)
            return "tool started", agent or "research", \
                f"search({event.get('topic')!r}), delivery {delivery}", ""
        if kind == EventType.AGENT_STARTED.value:
            return "agent started", agent, str(event.get("input_summary") or ""), ""
        if kind == EventType.TOOL_RESULT.value:
            elapsed = _number(event.get("execution_time_ms")) or 0.0
            return "tool result", agent, f"{event.get('tool_name')} in {elapsed:.0f} ms: " \
                                         f"{_tool_result(event.get('result'))}", ""
        if kind == EventType.AGENT_COMPLETED.value:
            duration = _number(event.get("duration_ms")) or 0.0
            tokens = _int(event.get("tokens_used"))
            target = event.get("handed_off_to")
            outcome = f"handed off to {target}" if target else \
                f"answer: {event.get('output_summary')}"
            return "agent done", agent, f"{duration:.0f} ms, {tokens} tokens, {outcome}", ""
        if kind == EventType.HANDOFF_READY.value:
            source, target = event.get("from_agent"), event.get("to_agent")
            return "handoff", f"{source}→{target}", "remote handoff through the " \
                                                    f"{target} inbox", "handoff"
        if kind == EventType.ERROR.value:
            return "ERROR", agent, f"{event.get('error_type')}: " \
                                   f"{event.get('error_message')}", "error"
        return kind, agent, "", ""

    def _transition(self, event: Mapping[str, Any], session: SessionView, worker_name: str,
                    ts: float) -> tuple[str, str, str, str]:
        changes = event.get("changes")
        changes = changes if isinstance(changes, Mapping) else {}
        status = str(changes.get("status", ""))
        hop = _int(changes.get("hop", event.get("hop")), -1)
        agent = str(changes.get("agent") or event.get("agent") or "")
        key = (session.session_id, hop)
        if hop >= session.hop:
            session.hop, session.agent = hop, agent
        current = hop == session.hop
        final = session.status in ("completed", "failed")  # the caller's answer came first
        if status == "offered":
            self._offered_at.setdefault(key, ts)
            if current and key not in self._claimed:
                session.worker, session.delivery = "", 0
                if not final:
                    session.status = "offered"
            source = changes.get("from_agent")
            return "hop offered", agent, f"hop {hop} in the {agent} inbox" + (
                f", from {source}" if source else f": {session.prompt!r}"), ""
        if status == "claimed":
            delivery = _int(changes.get("delivery_count"), 1)
            session.hops[hop] = (agent, worker_name, delivery)
            if current:
                session.worker, session.delivery = worker_name, delivery
                if not final:
                    session.status = "claimed"
            if key not in self._claimed:
                self._claimed.add(key)
                offered = self._offered_at.get(key)
                if hop >= 1 and offered is not None:
                    self.summary.handoff_ms.append(max(0.0, (ts - offered) * 1000))
            if delivery > 1:
                self.summary.redeliveries += 1
                kill = self.summary.kill
                taken_over = kill is not None and worker_name != kill.worker
                if (kill is not None and taken_over and session.label in kill.held
                        and session.label not in kill.reclaims):
                    kill.reclaims[session.label] = (worker_name, ts - kill.at)
                    if kill.reclaimed_by is None:
                        kill.reclaimed_by = worker_name
                        kill.recovery_s = ts - kill.at
                after = f", {ts - kill.at:.2f} s after the kill" if taken_over and kill else ""
                return "hop RECLAIMED", agent, f"hop {hop} redelivered to {worker_name} " \
                                               f"(delivery {delivery}){after}", "recovery"
            return "hop claimed", agent, f"hop {hop} by {worker_name}", ""
        if status == "completed":
            last = changes.get("last_agent")
            if last is not None:
                session.final_seen = True
                return "run completed", agent, f"final answer by {last}", "done"
            return "hop completed", agent, f"hop {hop} handed off to " \
                                           f"{changes.get('handed_off_to')}", ""
        if status == "failed":
            session.final_seen = True
            error = changes.get("error")
            detail = f"{error.get('error_type')}: {error.get('error_message')}" \
                if isinstance(error, Mapping) else "failed"
            return "run FAILED", agent, detail, "error"
        return f"hop {status}", agent, "", ""

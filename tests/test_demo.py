"""``agentstreams demo``: the real command in a subprocess (worker processes, kill -9, recovery),
the demo's agent team in-process, and the bookkeeping behind the summary."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from agents import set_tracing_disabled

from agentstreams.demo.team import build_team, notes_for, prompt_for
from agentstreams.demo.timeline import KILLED_EVENT, DemoSummary, DemoTracker
from agentstreams.demo.worker import READY_EVENT
from agentstreams.integrations.openai_agents import AgentClient, AgentWorker
from agentstreams.server import LocalServer

set_tracing_disabled(True)

#: A demo run in these tests must end well within this (it normally takes 8-12 s on 2 CPUs,
#: most of it four processes importing the SDK).
DEMO_TIMEOUT_S = 90


def _demo_command(*args: str) -> list[str]:
    """The installed console script next to this interpreter (``python -m`` without one)."""
    script = Path(sys.executable).with_name("agentstreams")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "agentstreams.cli.main"]
    return [*base, "demo", *args]


def _run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = env if env is not None else {k: v for k, v in os.environ.items()
                                       if k not in ("REDIS_URL", "OPENAI_API_KEY")}
    return subprocess.run(_demo_command(*args), capture_output=True, text=True, env=env,
                          timeout=DEMO_TIMEOUT_S, check=False)


def _summary_value(output: str, label: str) -> str:
    match = re.search(rf"^\|\s*{re.escape(label)}\s*\|\s*(.+?)\s*\|$", output, re.MULTILINE)
    assert match, f"no {label!r} row in the summary:\n{output}"
    return match.group(1)


async def _namespace_keys(url: str, namespace: str) -> list[Any]:
    client = aioredis.Redis.from_url(url)
    try:
        return [k for pattern in (f"{namespace}:*", f"{{{namespace}:*")
                async for k in client.scan_iter(match=pattern)]
    finally:
        await client.aclose()


async def test_demo_plain_kills_a_worker_and_every_session_completes_once(
        valkey_server: LocalServer) -> None:
    result = await asyncio.to_thread(_run_demo, "--redis-url", valkey_server.url, "--tasks",
                                     "3", "--plain")
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert _summary_value(output, "sessions completed") == "3/3"
    assert _summary_value(output, "handoffs") == "6"
    assert int(_summary_value(output, "redeliveries")) >= 1
    assert _summary_value(output, "duplicates seen by the caller") == "0"
    assert _summary_value(output, "lost") == "0"
    assert _summary_value(output, "dead letters") == "0"
    assert re.match(r"research-[12] \(pid \d+\) holding s\d.*; research-[12] re-claimed",
                    _summary_value(output, "killed")), output
    assert "killed (-9)" in _summary_value(output, "workers")
    assert "OK: every session completed exactly once, nothing lost" in output
    assert "\x1b[" not in output  # plain output is for logs
    # The timeline shows the kill, then the hop re-claimed by the other replica.
    kill_row = next(line for line in output.splitlines() if " KILL -9 " in line)
    victim = re.search(r"research-[12]", kill_row)
    assert victim, kill_row
    reclaimed = [line for line in output.splitlines() if " hop RECLAIMED " in line]
    assert reclaimed, output
    assert "(delivery 2)" in reclaimed[0]
    assert "redelivered to research-" in reclaimed[0]
    assert f"redelivered to {victim.group(0)}" not in reclaimed[0]
    assert output.index(kill_row) < output.index(reclaimed[0])
    # Both remote handoffs of every session appear.
    for step in ("triage→research", "research→writer"):
        assert sum(f" {step} " in line for line in output.splitlines()) == 3, output


async def test_demo_json_on_a_given_server_reports_the_recovery_and_cleans_up(
        valkey_server: LocalServer) -> None:
    result = await asyncio.to_thread(_run_demo, "--redis-url", valkey_server.url, "--tasks",
                                     "2", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    header, summary = lines[0]["header"], lines[-1]["summary"]
    assert header["workers"] == {"triage-1": "triage", "research-1": "research",
                                 "research-2": "research", "writer-1": "writer"}
    assert summary["ok"] is True, summary
    assert summary["sessions_started"] == summary["sessions_completed"] == 2
    assert summary["lost"] == summary["duplicates"] == summary["dead_letters"] == 0
    assert summary["handoffs"] == 4
    assert summary["redeliveries"] >= 1
    kill = summary["kill"]
    assert kill["held"], kill  # the victim was inside its search
    assert kill["reclaimed_by"] in ("research-1", "research-2")
    assert kill["reclaimed_by"] != kill["worker"]
    assert 0 < kill["recovery_s"] < 10
    assert summary["worker_exits"][kill["worker"]] == "killed (-9)"
    assert [v for k, v in summary["worker_exits"].items() if k != kill["worker"]] == ["ok"] * 3
    # The caller got one answer per session; a held session's research hop ran on the other
    # replica with delivery count 2.
    by_label = {s["label"]: s for s in summary["sessions"]}
    for session in summary["sessions"]:
        assert session["answers"] == 1
        assert session["answer"].startswith("Brief on ")
        assert [h["agent"] for h in session["hops"]] == ["triage", "research", "writer"]
    research_hop = by_label[kill["held"][0]]["hops"][1]
    assert research_hop == {"hop": 1, "agent": "research", "worker": kill["reclaimed_by"],
                            "delivery_count": 2}
    assert summary["handoff_latency_ms"]["p50"] is not None
    events = [line["event"] for line in lines if "event" in line]
    assert len(events) == summary["events"]
    assert [e["type"] for e in events].count(KILLED_EVENT) == 1
    # A generated namespace on the user's server is removed, side keys included.
    assert await _namespace_keys(valkey_server.url, summary["namespace"]) == []


async def test_demo_that_cannot_finish_exits_1(valkey_server: LocalServer) -> None:
    # --timeout counts from when the workers are ready (their start-up takes longer than 1 s
    # on any machine, and does not count); a 16 s search cannot finish within it.
    result = await asyncio.to_thread(_run_demo, "--redis-url", valkey_server.url, "--tasks",
                                     "1", "--plain", "--timeout", "1", "--pace", "20",
                                     "--no-kill")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: timed out after 1s with 0 of 1 sessions answered" in result.stdout
    assert _summary_value(result.stdout, "lost") == "1"
    assert _summary_value(result.stdout, "sessions completed") == "0/1"


async def test_ctrl_c_during_start_up_reports_sessions_never_started(
        valkey_server: LocalServer) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) while the workers start: no
    tracebacks, a summary that says it was interrupted and that no session was sent."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "OPENAI_API_KEY")}
    proc = await asyncio.create_subprocess_exec(
        *_demo_command("--redis-url", valkey_server.url, "--tasks", "3", "--json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        start_new_session=True)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), DEMO_TIMEOUT_S)
    assert "header" in json.loads(first)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rest, err = await asyncio.wait_for(proc.communicate(), DEMO_TIMEOUT_S)
    output = first.decode() + rest.decode()
    assert proc.returncode == 1, output + err.decode()
    assert "Traceback" not in output + err.decode()
    assert "KeyboardInterrupt" not in output + err.decode()
    summary = json.loads(output.splitlines()[-1])["summary"]
    assert summary["interrupted"] is True
    assert summary["failure"] == ("interrupted (Ctrl-C) while the workers started; "
                                  "3 sessions never started")
    assert (summary["never_started"], summary["sessions_started"], summary["lost"]) == (3, 0, 0)
    assert all(how in ("ok", "stopped during start-up")
               for how in summary["worker_exits"].values()), summary["worker_exits"]
    assert summary["worker_logs"] == {}


def test_live_model_without_an_api_key_exits_2() -> None:
    result = _run_demo("--live-model", "--plain")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--live-model needs OPENAI_API_KEY" in result.stderr
    assert result.stdout == ""


async def test_team_answers_from_the_search_through_remote_handoffs(
        valkey_server: LocalServer) -> None:
    """The demo's agents in one process (three AgentWorkers): the writer's brief is built
    from the notes the research agent's search returned, two handoffs away."""
    namespace = f"demotest-{uuid.uuid4().hex[:8]}"
    searches: list[tuple[str, str]] = []

    async def on_search(topic: str, key: str) -> None:
        searches.append((topic, key))

    team = build_team(search_s=0.0, on_tool_start=on_search)
    workers = [AgentWorker([agent], valkey_server.url, namespace=namespace, block_ms=200)
               for agent in team.values()]
    try:
        for worker in workers:
            await worker.start()
        async with AgentClient(valkey_server.url, namespace=namespace) as client:
            result = await client.run("triage", prompt_for(2), session_id="d1", timeout_s=20)
    finally:
        for worker in workers:
            await worker.stop()
    topic = "crash recovery with XAUTOCLAIM"
    assert result.final_output == f"Brief on {topic}: {'; '.join(notes_for(topic))}."
    assert result.agents == ["triage", "research", "writer"]
    assert [link.handed_off_to for link in result.chain] == ["research", "writer", None]
    assert [t for t, _ in searches] == [topic]
    assert searches[0][1].startswith(f"{result.run_id}:1:search:")  # the stable call key
    keys = await _namespace_keys(valkey_server.url, namespace)
    if keys:
        raw = aioredis.Redis.from_url(valkey_server.url)
        await raw.delete(*keys)
        await raw.aclose()


def _event(kind: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "timestamp": at, "_event_id": uuid.uuid4().hex, **fields}


def _claimed(session: str, hop: int, agent: str, worker: str, at: float,
             delivery: int = 1) -> dict[str, Any]:
    return _event("state_changed", at, session_id=session, worker=worker, changes={
        "status": "claimed", "hop": hop, "agent": agent, "delivery_count": delivery})


def _offered(session: str, hop: int, agent: str, at: float) -> dict[str, Any]:
    return _event("state_changed", at, session_id=session,
                  changes={"status": "offered", "hop": hop, "agent": agent})


def test_tracker_counts_the_kill_the_recovery_and_handoff_latency() -> None:
    summary = DemoSummary(namespace="ns", server="test", model="scripted")
    tracker = DemoTracker(summary, {"a": "Write a short brief on x"},
                          {"research-1": "research", "research-2": "research"}, 100.0)
    for name in ("research-1", "research-2"):
        tracker.record(_event(READY_EVENT, 100.0, worker=name, pid=1), 100.0)
    assert tracker.all_ready
    tracker.submitted("a", 100.5)
    tracker.record(_offered("a", 1, "research", 101.0), 101.0)
    tracker.record(_claimed("a", 1, "research", "research-1", 101.004), 101.004)
    assert [s.label for s in tracker.held_by("research-1")] == ["s1"]
    entry = tracker.record(_event(KILLED_EVENT, 101.1, worker="research-1", pid=7,
                                  held=["s1"]), 101.1)
    assert entry is not None
    assert (entry.kind, entry.tone) == ("KILL -9", "kill")
    assert tracker.sessions["a"].status == "orphaned"
    entry = tracker.record(_claimed("a", 1, "research", "research-2", 102.3, delivery=2), 102.3)
    assert entry is not None
    assert entry.kind == "hop RECLAIMED"
    assert "(delivery 2)" in entry.detail
    tracker.answered("a", 103.5, answer="done")
    tracker.answered("a", 103.6, answer="done again")  # a second result for one session
    assert summary.redeliveries == 1
    assert summary.kill is not None
    assert summary.kill.reclaimed_by == "research-2"
    assert abs((summary.kill.recovery_s or 0) - 1.2) < 1e-6
    assert len(summary.handoff_ms) == 1
    assert abs(summary.handoff_ms[0] - 4.0) < 1e-3
    assert summary.sessions_completed == 1
    assert summary.duplicates == 1
    assert summary.lost == 0
    assert summary.wall_s == 3.0
    assert summary.problem == "the caller received 1 duplicate results"
    # Events of sessions and workers that are not this run's are ignored.
    assert tracker.record(_claimed("other", 0, "triage", "elsewhere", 104.0), 104.0) is None


def test_summary_is_not_ok_when_a_session_is_lost() -> None:
    summary = DemoSummary(namespace="ns", server="test", model="scripted")
    tracker = DemoTracker(summary, {"a": "p", "b": "q"}, {}, 0.0)
    assert (summary.sessions_planned, summary.sessions_started, summary.lost) == (2, 0, 0)
    assert summary.never_started == 2
    tracker.submitted("a", 0.5)
    tracker.submitted("b", 0.5)
    tracker.answered("a", 1.0, answer="fine")
    summary.worker_exits = {"research-1": "killed (-9)", "writer-1": "ok"}
    assert summary.lost == 1
    assert summary.problem == "1 of 2 sessions never completed"
    tracker.answered("b", 2.0, answer="late but there")
    assert summary.ok
    summary.worker_exits["writer-1"] = "did not stop (killed)"
    assert summary.problem == "workers did not stop cleanly: writer-1"


async def test_demo_never_prints_the_password_of_its_url() -> None:
    """The header names the server; ``user:pass@`` and ``?password=`` are both redacted."""
    import redis as sync_redis

    secret = "s3cret-Pw-demo"
    with LocalServer("valkey") as server:
        sync_redis.Redis.from_url(server.url).config_set("requirepass", secret)
        url = f"redis://default:{secret}@{server.host}:{server.port}/0?password={secret}"
        result = await asyncio.to_thread(_run_demo, "--redis-url", url, "--tasks", "1",
                                         "--no-kill", "--json", "--pace", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    header = json.loads(result.stdout.splitlines()[0])["header"]
    assert f"default:***@{server.host}:{server.port}/0?password=***" in header["server"]
    assert secret not in result.stdout + result.stderr


def test_kill_report_names_every_held_session_and_each_reclaim_time() -> None:
    """The victim claimed s1 and s2; the runner's list (read when the search of s2 was seen)
    named only s2. The report names both, and each one's own re-claim time."""
    summary = DemoSummary(namespace="ns", server="test", model="scripted")
    tracker = DemoTracker(summary, {"a": "p", "b": "q"},
                          {"research-1": "research", "research-2": "research"}, 100.0)
    tracker.record(_claimed("a", 1, "research", "research-1", 101.0), 101.0)
    tracker.record(_claimed("b", 1, "research", "research-1", 101.2), 101.2)
    tracker.record(_event(KILLED_EVENT, 101.5, worker="research-1", pid=7, held=["s2"]), 101.5)
    assert summary.kill is not None
    assert summary.kill.held == ["s1", "s2"]
    assert tracker.sessions["a"].status == "orphaned"
    tracker.record(_claimed("a", 1, "research", "research-2", 102.34, delivery=2), 102.34)
    tracker.record(_claimed("b", 1, "research", "research-2", 102.85, delivery=2), 102.85)
    kill = summary.kill
    assert kill.reclaims == {"s1": ("research-2", kill.reclaims["s1"][1]),
                             "s2": ("research-2", kill.reclaims["s2"][1])}
    assert abs(kill.reclaims["s1"][1] - 0.84) < 1e-6
    assert abs(kill.reclaims["s2"][1] - 1.35) < 1e-6
    assert kill.reclaim_text() == "research-2 re-claimed s1 0.84 s later, s2 1.35 s later"
    from rich.console import Console

    from agentstreams.demo.display import summary_table

    console = Console(width=200, record=True, no_color=True)
    console.print(summary_table(summary, plain=True))
    assert ("research-1 (pid 7) holding s1, s2; research-2 re-claimed s1 0.84 s later, s2 "
            "1.35 s later") in console.export_text()
    assert kill.to_dict()["reclaims"]["s2"] == {"worker": "research-2", "after_s": 1.35}


def test_a_redelivery_of_a_session_the_victim_did_not_hold_is_not_its_recovery() -> None:
    summary = DemoSummary(namespace="ns", server="test", model="scripted")
    tracker = DemoTracker(summary, {"a": "p", "b": "q"},
                          {"research-1": "research", "research-2": "research"}, 100.0)
    tracker.record(_claimed("b", 1, "research", "research-1", 101.0), 101.0)
    tracker.record(_event(KILLED_EVENT, 101.5, worker="research-1", pid=7, held=[]), 101.5)
    tracker.record(_claimed("a", 1, "research", "research-2", 101.9, delivery=2), 101.9)
    assert summary.kill is not None
    assert summary.kill.held == ["s2"]
    first = summary.kill.reclaimed_by
    assert first is None
    tracker.record(_claimed("b", 1, "research", "research-2", 102.6, delivery=2), 102.6)
    assert summary.kill.reclaimed_by == "research-2"
    assert abs((summary.kill.recovery_s or 0) - 1.1) < 1e-6

"""Logging: no print() in the library, structured context on every record, JSON lines."""

from __future__ import annotations

import ast
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import agentstreams
from agentstreams import Event, Publisher, Worker
from agentstreams.logging_utils import STRUCTURED_FIELDS, JsonFormatter, log_context
from conftest import wait_for

PACKAGE = Path(agentstreams.__file__).resolve().parent
#: Command-line and demo code talks to a terminal; the library only logs.
MAY_PRINT = ("cli", "demo")
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})
#: Being written while this test was (the OpenAI Agents integration); its owner opts in by
#: removing it from here.
NOT_YET_AUDITED = ("integrations",)
#: Log calls still without ``extra=``, each waiting for a recommended change in a file another
#: engineer owns: (path inside the package, start of the message). Remove entries as they are
#: fixed; the test fails on any *new* call without context.
PENDING_CONTEXT: frozenset[tuple[str, str]] = frozenset()


def library_modules() -> Iterator[tuple[str, ast.Module]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 10, f"found only {len(paths)} modules under {PACKAGE}"
    for path in paths:
        relative = path.relative_to(PACKAGE).as_posix()
        yield relative, ast.parse(path.read_text(), filename=str(path))


def test_the_library_never_prints() -> None:
    offenders = [
        f"{relative}:{node.lineno}"
        for relative, tree in library_modules() if relative.split("/")[0] not in MAY_PRINT
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert offenders == [], "use a logger, not print(), in library code"


def test_library_log_calls_carry_structured_context() -> None:
    missing: set[tuple[str, str]] = set()
    for relative, tree in library_modules():
        if relative.split("/")[0] in (*MAY_PRINT, *NOT_YET_AUDITED):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("logger", "log")):
                continue
            if any(keyword.arg == "extra" for keyword in node.keywords):
                continue
            message = node.args[0] if node.args else None
            text = message.value if isinstance(message, ast.Constant) else ""
            missing.add((relative, str(text)))
    unexpected = {(path, text) for path, text in missing
                  if not any(path == p and text.startswith(prefix)
                             for p, prefix in PENDING_CONTEXT)}
    assert unexpected == set(), "log calls need extra={'stream': ..., 'group': ..., ...}"


# --------------------------------------------------------------------------- JsonFormatter


def make_record(message: str, *args: Any, extra: dict[str, Any] | None = None,
                exc_info: Any = None) -> logging.LogRecord:
    logger = logging.getLogger("agentstreams.test")
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, args,
                             exc_info, extra=extra)


def test_json_formatter_writes_the_context_fields_in_order() -> None:
    record = make_record("retrying %s", "1-0", extra={
        "event_type": "tool_result", "msg_id": "1-0", "consumer": "c", "group": "g",
        "stream": "jobs", "dlq_id": "2-0", "lost_ids": ["3-0"], "skipped": None})
    line = JsonFormatter(static_fields={"service": "planner"}).format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert list(data)[:10] == ["time", "level", "logger", "message", "service",
                               *STRUCTURED_FIELDS]
    assert data["message"] == "retrying 1-0"
    assert data["level"] == "WARNING"
    assert data["logger"] == "agentstreams.test"
    assert data["time"].endswith("Z")
    assert data["dlq_id"] == "2-0"
    assert data["lost_ids"] == ["3-0"]
    assert "skipped" not in data  # None means "does not apply"


def test_json_formatter_handles_exceptions_and_odd_values() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = make_record("failed", extra={"stream": "jobs", "payload": b"\xff",
                                              "when": object()}, exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert "ValueError: boom" in data["exc_info"]
    assert data["payload"] == "b'\\xff'"
    assert data["when"].startswith("<object object")


def test_log_context_leaves_out_what_does_not_apply() -> None:
    assert log_context(stream="s", group="g", msg_id=None, dlq_id="1-0") == {
        "stream": "s", "group": "g", "dlq_id": "1-0"}


# --------------------------------------------------------------------------- a real worker


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything the ``agentstreams`` loggers emit at INFO and above, as JSON lines."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("agentstreams")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def test_worker_logs_are_json_lines_with_stream_context(
        json_log: io.StringIO, redis_url: str, stream_name: str,
        raw: aioredis.Redis) -> None:
    worker = Worker(redis_url, stream_name, "g", "c1", max_deliveries=2, block_ms=200,
                    probe_server=False, retry_delay_s=0.01, retry_delay_max_s=0.05)

    @worker.handler("tool_result")
    async def handle(event: Event) -> None:
        raise RuntimeError("tool crashed")

    await worker.start()
    try:
        msg_id = await Publisher(raw, stream_name).publish("tool_result", {"r": 1})

        async def dead_lettered() -> bool:
            return any(line["message"].startswith("dead-lettered") for line in lines(json_log))

        await wait_for(dead_lettered, message="the dead-letter log line")
    finally:
        await worker.stop(timeout_s=2)

    records = lines(json_log)
    context = {"stream": stream_name, "group": "g", "consumer": "c1"}
    for record in records:  # every line of the worker says which stream, group and consumer
        assert {key: record.get(key) for key in context} == context, record
    [retry] = [r for r in records if "failed (attempt 1 of 2)" in r["message"]]
    assert retry["level"] == "WARNING"
    assert retry["msg_id"] == msg_id
    assert retry["event_type"] == "tool_result"
    [dead] = [r for r in records if r["message"].startswith("dead-lettered")]
    assert dead["msg_id"] == msg_id
    assert dead["event_type"] == "tool_result"
    assert "dlq_id" in dead
    assert any(r["message"].startswith("worker c1 consuming") for r in records)
    assert any(r["message"].startswith("worker c1 stopped") for r in records)

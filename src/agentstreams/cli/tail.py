"""``agentstreams tail``: follow a stream live with plain XREAD (no group, so it steals nothing).

Each entry is decoded and shown as one line (or one JSON line); an entry that cannot be decoded
is shown as malformed, never ends the command. A lost connection is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any

import typer
from rich.text import Text

from agentstreams._codec import decode_entry
from agentstreams._connection import Backoff, Redis, call
from agentstreams._constants import FIELD_SESSION_ID, FIELD_TIMESTAMP, FIELD_TYPE
from agentstreams._streams import (
    entries_from_read_reply,
    first_field,
    stream_id_key,
    to_str,
)
from agentstreams.cli._common import (
    DEFAULT_REDIS_URL,
    JsonOption,
    RedisUrlOption,
    emit_json,
    entry_ms,
    err,
    format_time,
    is_stream_id,
    out,
    require_stream,
    run,
    usage_error,
)
from agentstreams.errors import ConnectionLostError, MalformedEventError

#: Longest XREAD BLOCK: short, so a stop request is never kept waiting long.
TAIL_BLOCK_MS = 1000
#: Entries fetched per XREAD.
READ_BATCH = 200
#: Values longer than this are cut in the one-line view (--json always prints them whole).
MAX_VALUE_CHARS = 200
#: Largest sequence number of a stream id: the predecessor of ``ms-0`` is ``(ms-1)-MAX_SEQ``.
MAX_SEQ = 2**64 - 1
_SHOWN_APART = (FIELD_TYPE, FIELD_SESSION_ID, FIELD_TIMESTAMP)
#: The field agent runs' events carry (``agentstreams.integrations.openai_agents``: the hooks'
#: lifecycle events and the ``state_changed`` transitions).
FIELD_RUN_ID = "run_id"
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")


def parse_since(value: str) -> tuple[int | None, int | None]:
    """``--since``: (milliseconds ago, None) for ``10m``/``2h``/``30s``/``1d``/``500ms``, or
    (None, epoch ms) for an ISO time (``2026-11-26T01:28``; UTC unless it has an offset).
    Raises ValueError."""
    match = _SINCE_RE.match(value.strip())
    if match:
        return int(float(match.group(1)) * _UNITS_MS[match.group(2)]), None
    moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return None, int(moment.timestamp() * 1000)


@contextlib.asynccontextmanager
async def _ctrl_c() -> AsyncIterator[asyncio.Future[None]]:
    """A future that completes on the first Ctrl-C (a second one interrupts at once).

    Cancelling the main task, asyncio's default, is not enough: a cancel that arrives while
    the client takes a connection from its pool can be swallowed, and tail would hang.
    """
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def on_sigint() -> None:
        if stopped.done():
            raise KeyboardInterrupt
        stopped.set_result(None)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
        yield stopped
        return
    try:
        yield stopped
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if not stopped.done():
            stopped.cancel()


def id_before(msg_id: str) -> str:
    """The largest stream id below ``msg_id`` (XREAD is exclusive; ``--from ID`` is not)."""
    ms, seq = stream_id_key(msg_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{MAX_SEQ}"
    return "0-0"


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           separators=(",", ":"))
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


class _Printer:
    """Decodes, filters and prints entries; counts what it printed."""

    def __init__(self, stream: str, types: set[str], session: str | None, as_json: bool,
                 run_id: str | None = None) -> None:
        self.stream = stream
        self.types = types
        self.session = session
        self.run_id = run_id
        self.as_json = as_json
        self.printed = 0

    def show(self, msg_id: str, fields: Mapping[bytes, bytes] | None) -> None:
        """Print one entry when it passes the filters."""
        added_ms = entry_ms(msg_id)
        try:
            event = decode_entry(msg_id, fields or {}, stream=self.stream,
                                 max_event_bytes=1 << 62)
        except MalformedEventError as exc:
            if self.types or self.session is not None or self.run_id is not None:
                return  # a filter asks for a type, session or run; a malformed entry has none
            self._malformed(msg_id, added_ms, exc)
            return
        if self.types and event.type not in self.types:
            return
        if self.session is not None and (event.session_id is None
                                         or str(event.session_id) != self.session):
            return
        if self.run_id is not None and str(event.data.get(FIELD_RUN_ID)) != self.run_id:
            return
        self.printed += 1
        if self.as_json:
            emit_json({
                "id": msg_id, "stream": self.stream, "time_ms": added_ms, "malformed": False,
                "type": event.type, "session_id": event.session_id,
                "timestamp": event.timestamp, "event_id": event.event_id,
                "version": event.version, "fields": event.data,
            }, lines=True)
            return
        line = Text()
        line.append(format_time(added_ms), style="dim")
        line.append(f"  {msg_id}  ")
        line.append(event.type, style="bold cyan")
        if event.session_id is not None:
            line.append(f"  session={_value_text(event.session_id)}", style="magenta")
        for name, value in event.data.items():
            if name not in _SHOWN_APART:
                line.append(f"  {name}={_value_text(value)}")
        out.print(line, soft_wrap=True)

    def _malformed(self, msg_id: str, added_ms: int | None, exc: MalformedEventError) -> None:
        self.printed += 1
        raw = {to_str(k): to_str(v) for k, v in exc.fields.items()}
        if self.as_json:
            emit_json({"id": msg_id, "stream": self.stream, "time_ms": added_ms,
                       "malformed": True, "reason": exc.reason, "raw": raw}, lines=True)
            return
        line = Text()
        line.append(format_time(added_ms), style="dim")
        line.append(f"  {msg_id}  ")
        line.append("MALFORMED", style="bold red")
        line.append(f"  ({exc.reason})")
        for name, value in raw.items():
            line.append(f"  {name}={_value_text(value)}")
        out.print(line, soft_wrap=True)


async def _since_cursor(client: Redis, since: tuple[int | None, int | None]) -> str:
    """The id just before the first entry added at or after ``since`` (server clock)."""
    ago, at = since
    if ago is not None:
        seconds, micros = await call(client.time)
        at = int(seconds) * 1000 + int(micros) // 1000 - ago
    return id_before(f"{max(0, at or 0)}-0")


async def _start_cursor(client: Redis, stream: str, start: str | None,
                        printer: _Printer) -> str:
    """Where following begins; ``-N`` prints the last N entries first."""
    if start is not None and start.startswith("-") and start[1:].isdigit() \
            and int(start[1:]) > 0:
        newest = await call(lambda: client.xrevrange(stream, count=int(start[1:])),
                            stream=stream)
        for msg_id, fields in reversed(entries_from_read_reply([(stream, newest)])):
            printer.show(msg_id, fields)
        # Follow from the newest entry shown, so nothing added meanwhile is missed or doubled.
        return to_str(newest[0][0]) if newest else "0-0"
    if start is not None and start != "$" and not start.startswith("-"):
        return id_before(start)
    info = await call(lambda: client.xinfo_stream(stream), stream=stream)
    return to_str(first_field(info, "last-generated-id")) or "0-0"


async def _history(client: Redis, stream: str, cursor: str, printer: _Printer,
                   done: Callable[[], bool]) -> None:
    """Print what the stream holds after ``cursor`` up to its newest entry now, then return."""
    info = await call(lambda: client.xinfo_stream(stream), stream=stream)
    end = to_str(first_field(info, "last-generated-id")) or "0-0"
    while not done() and stream_id_key(cursor) < stream_id_key(end):
        rows = await call(lambda c=cursor: client.xrange(  # type: ignore[misc]
            stream, min="(" + c, max=end, count=READ_BATCH), stream=stream)
        if not rows:
            return
        for msg_id, fields in entries_from_read_reply([(stream, rows)]):
            cursor = msg_id
            printer.show(msg_id, fields)
            if done():
                return


def tail_command(
    stream: Annotated[str, typer.Argument(help="The stream to follow.")],
    types: Annotated[list[str] | None, typer.Option(
        "--type", help="Only events of this type (repeat for several).")] = None,
    session: Annotated[str | None, typer.Option(
        "--session", help="Only events of this session id.")] = None,
    start: Annotated[str | None, typer.Option(
        "--from", help="ID: start at this entry id; -N: the last N entries, then follow. "
                       "Default: only new entries.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Start with the entries added in the last 10m, 2h, 30s, 1d (server "
                        "clock), or since an ISO time (UTC unless it has an offset).")] = None,
    until_now: Annotated[bool, typer.Option(
        "--until-now", help="History only: print what the stream holds (from --from/--since, "
                            "else from the beginning) up to its newest entry, then exit.")
    ] = False,
    run_id: Annotated[str | None, typer.Option(
        "--run", help="Only events of this agent run (their run_id field).")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", min=1, help="Stop after printing this many events.")] = None,
    timeout_s: Annotated[float | None, typer.Option(
        "--timeout-s", min=0.0, help="Stop after this many seconds.")] = None,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Follow events live, one readable line each (JSON lines with --json); Ctrl-C stops.

    --until-now prints the history instead and exits.
    """
    if start is not None and start != "$" and not (
            (start.startswith("-") and start[1:].isdigit()) or is_stream_id(start)):
        usage_error(f"--from {start!r} is neither a stream id (MS-SEQ) nor -N (last N entries)",
                    as_json)
    since_at: tuple[int | None, int | None] | None = None
    if since is not None:
        if start is not None:
            usage_error("give either --from or --since, not both", as_json)
        try:
            since_at = parse_since(since)
        except ValueError:
            usage_error(f"--since {since!r} is neither a duration (30s, 10m, 2h, 1d) nor an ISO "
                        "time (2026-11-26T01:28:00)", as_json)
    printer = _Printer(stream, set(types or []), session, as_json, run_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def done() -> bool:
        return (count is not None and printer.printed >= count) or (
            deadline is not None and time.monotonic() >= deadline)

    async def command(client: Redis) -> None:
        await require_stream(client, stream)
        if since_at is not None:
            cursor = await _since_cursor(client, since_at)
        elif until_now and start is None:
            cursor = "0-0"
        else:
            cursor = await _start_cursor(client, stream, start, printer)
        if until_now:
            await _history(client, stream, cursor, printer, done)
            return
        if done():
            return
        async with _ctrl_c() as stopped:
            err.print(Text(f"following {stream!r} after {cursor} (Ctrl-C to stop)",
                           style="dim"))
            backoff = Backoff()
            while not done():
                block_ms = TAIL_BLOCK_MS
                if deadline is not None:
                    block_ms = max(1, min(block_ms, int((deadline - time.monotonic()) * 1000)))
                read = asyncio.ensure_future(call(
                    lambda c=cursor, b=block_ms: client.xread(  # type: ignore[misc]
                        {stream: c}, count=READ_BATCH, block=b), stream=stream))
                either: set[asyncio.Future[Any]] = {read, stopped}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    read.cancel()
                    # A cancel can be lost inside the client; the read still ends with BLOCK.
                    await asyncio.wait({read}, timeout=block_ms / 1000 + 1)
                    if read.done() and not read.cancelled():
                        read.exception()  # retrieved, so asyncio does not warn about it
                    return
                try:
                    reply = read.result()
                except ConnectionLostError as exc:
                    delay = backoff.next_delay()
                    err.print(Text(f"{exc}; retrying in {delay:.1f}s", style="yellow"))
                    await asyncio.wait({stopped}, timeout=delay)
                    continue
                backoff.reset()
                for msg_id, fields in entries_from_read_reply(reply):
                    cursor = msg_id
                    printer.show(msg_id, fields)
                    if count is not None and printer.printed >= count:
                        break

    run(redis_url, as_json, command)

"""Operator commands: ``info``, ``pending``, ``claim`` and ``trim`` (``tail`` and ``dlq`` live in
their own modules and are registered from here).

Read-only commands never change the server; ``claim`` and ``trim`` say what they changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from agentstreams._codec import decode_entry
from agentstreams._connection import Redis, call
from agentstreams._constants import DEFAULT_VISIBILITY_TIMEOUT_MS, DLQ_SUFFIX
from agentstreams._retention import trim as safe_trim
from agentstreams._streams import dlq_key, first_field, to_str
from agentstreams.cli._common import (
    DEFAULT_REDIS_URL,
    JsonOption,
    RedisUrlOption,
    age_ms_of,
    count_of,
    emit_json,
    format_age,
    is_stream_id,
    key_type,
    out,
    require_group,
    require_stream,
    run,
    usage_error,
)
from agentstreams.cli.app import app
from agentstreams.errors import MalformedEventError

#: Entries and consumers idle longer than this are shown in warning colours.
STUCK_AFTER_MS = DEFAULT_VISIBILITY_TIMEOUT_MS
#: SCAN COUNT hint when listing every stream.
SCAN_BATCH = 1000
#: XCLAIM at most this many ids per call.
CLAIM_BATCH = 100


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _idle_style(idle_ms: int | None) -> str:
    return "bold red" if idle_ms is not None and idle_ms >= STUCK_AFTER_MS else ""


def _summary_of_entry(msg_id: str, fields: Mapping[bytes, bytes] | None,
                      stream: str) -> dict[str, Any]:
    """Type and session of one entry, for tables (never raises on malformed entries)."""
    if fields is None:
        return {"type": None, "session_id": None, "malformed": None, "deleted": True}
    try:
        event = decode_entry(msg_id, fields, stream=stream, max_event_bytes=1 << 62)
    except MalformedEventError as exc:
        return {"type": None, "session_id": None, "malformed": exc.reason, "deleted": False}
    session = event.session_id
    return {"type": event.type, "session_id": None if session is None else str(session),
            "malformed": None, "deleted": False}


def _type_label(summary: Mapping[str, Any]) -> str:
    if summary.get("deleted"):
        return "(deleted)"
    if summary.get("malformed"):
        return "(malformed)"
    return str(summary.get("type") or "-")


# ------------------------------------------------------------------------------------ info


async def _dead_letter_count(client: Redis, stream: str) -> int:
    key = dlq_key(stream)
    if await key_type(client, key) != "stream":
        return 0
    return int(await call(lambda: client.xlen(key), stream=key))


async def _group_report(client: Redis, stream: str, raw: Mapping[Any, Any]) -> dict[str, Any]:
    name = to_str(first_field(raw, "name"))
    pending = int(first_field(raw, "pending") or 0)
    report: dict[str, Any] = {
        "name": name,
        "lag": _int_or_none(first_field(raw, "lag")),
        "pending": pending,
        "last_delivered_id": to_str(first_field(raw, "last-delivered-id")) or None,
        "entries_read": _int_or_none(first_field(raw, "entries-read")),
        "oldest_pending_id": None,
        "oldest_pending_age_ms": None,
        "oldest_pending_idle_ms": None,
        "oldest_pending_deliveries": None,
        "oldest_pending_consumer": None,
        "consumers": [],
    }
    if pending:
        rows = await call(lambda: client.xpending_range(stream, name, min="-", max="+", count=1),
                          stream=stream, group=name)
        if rows:
            oldest = rows[0]
            oldest_id = to_str(oldest["message_id"])
            report.update(
                oldest_pending_id=oldest_id,
                oldest_pending_age_ms=age_ms_of(oldest_id),
                oldest_pending_idle_ms=int(oldest["time_since_delivered"]),
                oldest_pending_deliveries=int(oldest["times_delivered"]),
                oldest_pending_consumer=to_str(oldest["consumer"]),
            )
    consumers = await call(lambda: client.xinfo_consumers(stream, name), stream=stream,
                           group=name)
    for consumer in consumers:
        report["consumers"].append({
            "name": to_str(first_field(consumer, "name")),
            "pending": int(first_field(consumer, "pending") or 0),
            "idle_ms": int(first_field(consumer, "idle") or 0),
            # Redis 7.2+ / Valkey: time since the consumer last read successfully.
            "inactive_ms": _int_or_none(first_field(consumer, "inactive")),
        })
    return report


async def stream_report(client: Redis, stream: str) -> dict[str, Any]:
    """Everything ``info`` shows about one existing stream, JSON-ready."""
    info = await call(lambda: client.xinfo_stream(stream), stream=stream)
    first = first_field(info, "first-entry")
    last = first_field(info, "last-entry")
    first_id = to_str(first[0]) if first else None
    last_id = to_str(last[0]) if last else None
    last_type = _type_label(_summary_of_entry(last_id, last[1], stream)) if last_id else None
    raw_groups = await call(lambda: client.xinfo_groups(stream), stream=stream)
    groups = [await _group_report(client, stream, g) for g in raw_groups]
    return {
        "stream": stream,
        "exists": True,
        "length": int(first_field(info, "length") or 0),
        "first_entry_id": first_id,
        "first_entry_age_ms": age_ms_of(first_id),
        "last_entry_id": last_id,
        "last_entry_age_ms": age_ms_of(last_id),
        "last_entry_type": last_type,
        "last_generated_id": to_str(first_field(info, "last-generated-id")) or None,
        "dead_letters": await _dead_letter_count(client, stream),
        "groups": groups,
    }


def _dlq_owner(key: str, streams: set[str]) -> str | None:
    """The stream whose dead-letter stream ``key`` is, or None when it is not one."""
    suffix = ":" + DLQ_SUFFIX
    if not key.endswith(suffix):
        return None
    base = key[: -len(suffix)]
    # `{x}:dlq` belongs to stream `x`, unless only a stream literally named `{x}` exists.
    candidates = [base[1:-1], base] if base.startswith("{") and base.endswith("}") else [base]
    owners = [c for c in candidates if c and dlq_key(c) == key]
    for owner in owners:
        if owner in streams:
            return owner
    return owners[0] if owners else None


async def all_stream_reports(client: Redis, match: str | None) -> list[dict[str, Any]]:
    """A report for every stream key (SCAN ... TYPE stream), dead-letter streams folded in."""
    keys: set[str] = set()
    async for key in client.scan_iter(match=match, count=SCAN_BATCH, _type="stream"):
        keys.add(to_str(key))
    owners = {key: _dlq_owner(key, keys) for key in keys}
    streams = sorted(key for key, owner in owners.items() if owner is None)
    reports = [await stream_report(client, s) for s in streams]
    # A dead-letter stream whose stream is gone still deserves a row: its letters are stuck.
    orphans = sorted({owner for owner in owners.values() if owner and owner not in keys})
    for owner in orphans:
        reports.append({
            "stream": owner, "exists": False, "length": 0,
            "first_entry_id": None, "first_entry_age_ms": None,
            "last_entry_id": None, "last_entry_age_ms": None, "last_entry_type": None,
            "last_generated_id": None,
            "dead_letters": await _dead_letter_count(client, owner), "groups": [],
        })
    return reports


def _max_or_none(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _print_overview(reports: list[dict[str, Any]]) -> None:
    if not reports:
        out.print("no streams found")
        return
    table = Table(title="streams", title_justify="left")
    for column in ("stream", "length", "last entry", "groups", "max lag", "pending",
                   "oldest pending", "dead letters"):
        table.add_column(column, justify="left" if column == "stream" else "right")
    for report in reports:
        groups = report["groups"]
        oldest_idle = _max_or_none([g["oldest_pending_idle_ms"] for g in groups])
        oldest_age = _max_or_none([g["oldest_pending_age_ms"] for g in groups])
        lags = [g["lag"] for g in groups]
        lag_text = "-" if not groups else (
            str(_max_or_none(lags)) if None not in lags else "?")
        name = report["stream"] + ("" if report["exists"] else " (missing)")
        table.add_row(
            Text(name),
            str(report["length"]),
            format_age(report["last_entry_age_ms"]) + (" ago" if report["last_entry_id"] else ""),
            str(len(groups)),
            lag_text,
            str(sum(g["pending"] for g in groups)),
            Text(format_age(oldest_age), style=_idle_style(oldest_idle)),
            Text(str(report["dead_letters"]), style="bold red" if report["dead_letters"] else ""),
        )
    out.print(table)


def _print_stream(report: dict[str, Any]) -> None:
    head = Table(title=f"stream {report['stream']}", title_justify="left", show_header=False)
    head.add_column("what")
    head.add_column("value")
    head.add_row("length", str(report["length"]))
    head.add_row("first entry", Text(f"{report['first_entry_id'] or '-'} "
                                     f"({format_age(report['first_entry_age_ms'])} old)"))
    head.add_row("last entry", Text(f"{report['last_entry_id'] or '-'} "
                                    f"({format_age(report['last_entry_age_ms'])} old, "
                                    f"type {report['last_entry_type'] or '-'})"))
    head.add_row("dead letters", Text(str(report["dead_letters"]),
                                      style="bold red" if report["dead_letters"] else ""))
    out.print(head)
    if not report["groups"]:
        out.print("no consumer groups")
        return
    groups = Table(title="groups", title_justify="left")
    for column in ("group", "lag", "pending", "oldest pending", "age", "idle", "deliveries",
                   "owner", "last delivered"):
        groups.add_column(column, justify="left" if column in ("group", "owner") else "right")
    consumers = Table(title="consumers", title_justify="left")
    for column in ("group", "consumer", "pending", "idle", "inactive"):
        consumers.add_column(column, justify="left" if column in ("group", "consumer")
                             else "right")
    for group in report["groups"]:
        idle = group["oldest_pending_idle_ms"]
        groups.add_row(
            Text(group["name"]),
            "?" if group["lag"] is None else str(group["lag"]),
            str(group["pending"]),
            group["oldest_pending_id"] or "-",
            format_age(group["oldest_pending_age_ms"]),
            Text(format_age(idle), style=_idle_style(idle)),
            str(group["oldest_pending_deliveries"] or "-"),
            Text(group["oldest_pending_consumer"] or "-"),
            group["last_delivered_id"] or "-",
        )
        for consumer in group["consumers"]:
            stuck = consumer["pending"] > 0 and consumer["idle_ms"] >= STUCK_AFTER_MS
            consumers.add_row(
                Text(group["name"]), Text(consumer["name"]), str(consumer["pending"]),
                Text(format_age(consumer["idle_ms"]), style="bold red" if stuck else ""),
                format_age(consumer["inactive_ms"]),
            )
    out.print(groups)
    if consumers.row_count:
        out.print(consumers)


@app.command()
def info(
    stream: Annotated[str | None, typer.Argument(
        help="Stream to describe; without it, every stream on the server.")] = None,
    match: Annotated[str | None, typer.Option(
        "--match", help="Only streams whose name matches this glob (without STREAM).")] = None,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Streams, groups with lag and pending entries, consumers with idle time, dead letters."""

    async def command(client: Redis) -> None:
        if stream is None:
            reports = await all_stream_reports(client, match)
            if as_json:
                emit_json(reports)
            else:
                _print_overview(reports)
            return
        await require_stream(client, stream)
        report = await stream_report(client, stream)
        if as_json:
            emit_json(report)
        else:
            _print_stream(report)

    if stream is not None and match is not None:
        usage_error("give either STREAM or --match, not both", as_json)
    run(redis_url, as_json, command)


# ------------------------------------------------------------------------------------ pending


async def _entry_summaries(client: Redis, stream: str,
                           ids: list[str]) -> dict[str, dict[str, Any]]:
    """Type and session of each entry id (one pipelined XRANGE per id)."""
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for msg_id in ids:
        pipe.xrange(stream, min=msg_id, max=msg_id, count=1)
    replies = await call(pipe.execute, stream=stream)
    summaries: dict[str, dict[str, Any]] = {}
    for msg_id, reply in zip(ids, replies, strict=True):
        fields = reply[0][1] if reply else None
        summaries[msg_id] = _summary_of_entry(msg_id, fields, stream)
    return summaries


@app.command()
def pending(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    consumer: Annotated[str | None, typer.Option(
        "--consumer", help="Only entries owned by this consumer.")] = None,
    min_idle_ms: Annotated[int, typer.Option(
        "--min-idle-ms", min=0, help="Only entries idle at least this long.")] = 0,
    count: Annotated[int, typer.Option("--count", min=1,
                                       help="Show at most this many entries.")] = 50,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Entries delivered but not acknowledged: owner, idle time, delivery count, oldest first."""

    async def command(client: Redis) -> None:
        await require_group(client, stream, group)
        summary = await call(lambda: client.xpending(stream, group), stream=stream, group=group)
        rows = await call(lambda: client.xpending_range(
            stream, group, min="-", max="+", count=count, consumername=consumer,
            idle=min_idle_ms or None), stream=stream, group=group)
        ids = [to_str(row["message_id"]) for row in rows]
        summaries = await _entry_summaries(client, stream, ids)
        entries = [{
            "id": msg_id,
            "consumer": to_str(row["consumer"]),
            "idle_ms": int(row["time_since_delivered"]),
            "deliveries": int(row["times_delivered"]),
            "age_ms": age_ms_of(msg_id),
            **summaries[msg_id],
        } for msg_id, row in zip(ids, rows, strict=True)]
        per_consumer = {to_str(c["name"]): int(c["pending"])
                        for c in summary.get("consumers") or []}
        total = int(summary.get("pending") or 0)
        report: dict[str, Any] = {
            "stream": stream, "group": group,
            "pending": total,
            "oldest_id": to_str(summary.get("min")) or None,
            "newest_id": to_str(summary.get("max")) or None,
            "consumers": per_consumer,
            "entries": entries,
        }
        if as_json:
            emit_json(report)
            return
        owners = ", ".join(f"{name}: {n}" for name, n in per_consumer.items()) or "-"
        out.print(Text(f"{total} pending in group {group!r} of {stream!r} "
                       f"(by consumer: {owners})"))
        if not entries:
            return
        table = Table()
        for column in ("id", "consumer", "idle", "deliveries", "age", "type", "session"):
            table.add_column(column, justify="right" if column in ("idle", "deliveries", "age")
                             else "left")
        for entry in entries:
            table.add_row(entry["id"], Text(entry["consumer"]),
                          Text(format_age(entry["idle_ms"]), style=_idle_style(entry["idle_ms"])),
                          str(entry["deliveries"]), format_age(entry["age_ms"]),
                          Text(_type_label(entry)), Text(entry["session_id"] or "-"))
        out.print(table)
        if total > len(entries):
            out.print(f"(showing {len(entries)}; --count to see more)")

    run(redis_url, as_json, command)


# ------------------------------------------------------------------------------------ claim


async def _claimable_ids(client: Redis, stream: str, group: str, target: str,
                         min_idle_ms: int, from_consumer: str | None, limit: int) -> list[str]:
    """Pending ids idle long enough (and not already the target's), oldest first."""
    found: list[str] = []
    start = "-"
    while len(found) < limit:
        rows = await call(lambda s=start: client.xpending_range(  # type: ignore[misc]
            stream, group, min=s, max="+", count=CLAIM_BATCH, consumername=from_consumer,
            idle=min_idle_ms or None), stream=stream, group=group)
        for row in rows:
            if to_str(row["consumer"]) != target:
                found.append(to_str(row["message_id"]))
        if len(rows) < CLAIM_BATCH:
            break
        start = "(" + to_str(rows[-1]["message_id"])
    return found[:limit]


@app.command()
def claim(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    consumer: Annotated[str, typer.Argument(help="Consumer that takes the entries over.")],
    ids: Annotated[list[str] | None, typer.Option(
        "--id", help="Claim this pending id (repeat for several). Default: every idle one.")
    ] = None,
    min_idle_ms: Annotated[int | None, typer.Option(
        "--min-idle-ms", min=0,
        help=f"Only entries idle this long. Default: 0 with --id, else "
             f"{DEFAULT_VISIBILITY_TIMEOUT_MS} (a live consumer's work is left alone).")
    ] = None,
    from_consumer: Annotated[str | None, typer.Option(
        "--from-consumer", help="Only entries owned by this consumer (e.g. a dead one).")
    ] = None,
    count: Annotated[int, typer.Option("--count", min=1,
                                       help="Claim at most this many.")] = 1000,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Move pending entries to CONSUMER (XCLAIM, without counting a delivery)."""
    wanted = list(ids or [])
    bad = [i for i in wanted if not is_stream_id(i)]
    if bad:
        usage_error(f"--id {bad[0]!r} is not a stream id (use MS-SEQ, e.g. 1764118559123-0)",
                    as_json)
    idle = min_idle_ms if min_idle_ms is not None else (
        0 if wanted else DEFAULT_VISIBILITY_TIMEOUT_MS)

    async def command(client: Redis) -> None:
        await require_group(client, stream, group)
        candidates = wanted or await _claimable_ids(client, stream, group, consumer, idle,
                                                    from_consumer, count)
        claimed: list[str] = []
        for start in range(0, len(candidates), CLAIM_BATCH):
            batch = candidates[start:start + CLAIM_BATCH]
            # XCLAIM re-checks the idle time atomically; JUSTID leaves the delivery count alone.
            reply = await call(lambda b=batch: client.xclaim(  # type: ignore[misc]
                stream, group, consumer, idle, b, justid=True), stream=stream, group=group)
            claimed.extend(to_str(x) for x in reply)  # type: ignore[arg-type]
        claimed_set = set(claimed)
        skipped = [i for i in candidates if i not in claimed_set]
        report = {"stream": stream, "group": group, "consumer": consumer,
                  "min_idle_ms": idle, "claimed": claimed, "skipped": skipped}
        if as_json:
            emit_json(report)
            return
        out.print(Text(f"claimed {count_of(len(claimed), 'entry', 'entries')} for consumer "
                       f"{consumer!r} in group {group!r} of {stream!r}"))
        for msg_id in claimed:
            out.print(f"  {msg_id}")
        if skipped:
            out.print(Text(f"skipped {len(skipped)} (not pending in this group, or idle less "
                           f"than {idle} ms): {', '.join(skipped)}"))

    run(redis_url, as_json, command)


# ------------------------------------------------------------------------------------ trim


@app.command("trim")
def trim_command(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    maxlen: Annotated[int, typer.Option(
        "--maxlen", min=0, help="Keep (at least) this many newest entries.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Also remove entries a group has not acknowledged (they are lost).")
    ] = False,
    approximate: Annotated[bool, typer.Option(
        "--approximate", help="Let the server trim whole nodes only (cheaper, less exact).")
    ] = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Trim towards --maxlen entries, keeping every entry a consumer group still needs."""

    async def command(client: Redis) -> None:
        await require_stream(client, stream)
        before = int(await call(lambda: client.xlen(stream), stream=stream))
        result = await safe_trim(client, stream, maxlen, approximate=approximate, force=force)
        after = int(await call(lambda: client.xlen(stream), stream=stream))
        report = {
            "stream": stream, "max_length": maxlen, "forced": force,
            "length_before": before, "length_after": after, "removed": result.removed,
            "floor_id": result.floor_id, "limited_by_groups": result.limited_by_groups,
        }
        if as_json:
            emit_json(report)
            return
        out.print(Text(f"removed {count_of(result.removed, 'entry', 'entries')} from {stream!r}: "
                       f"{before} -> {after}"))
        if result.limited_by_groups:
            out.print(Text(f"kept entries from {result.floor_id} on: a consumer group has not "
                           "acknowledged them yet (--force removes them anyway; they are then "
                           "lost to that group)", style="yellow"))

    run(redis_url, as_json, command)


# `tail` and `dlq` register themselves when imported; here, so `--help` lists info first.
from agentstreams.cli import deadletters, tail  # noqa: E402, F401

"""Operator commands: ``info``, ``pending``, ``claim`` and ``trim`` (registered in ``main``).

``info`` and ``pending`` render what ``agentstreams._inspect`` reads; they never change the
server. ``claim`` and ``trim`` say what they changed.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import redis.exceptions as redis_exc
import typer
from rich.table import Table
from rich.text import Text

from agentstreams._connection import Redis, call
from agentstreams._constants import DEFAULT_INSPECT_MAX_STREAMS, DEFAULT_VISIBILITY_TIMEOUT_MS
from agentstreams._inspect import (
    find_streams,
    inspect_stream,
    inspect_streams,
    pending_entries,
)
from agentstreams._retention import HELD_PENDING, TrimResult, unacknowledged_cut
from agentstreams._retention import trim as safe_trim
from agentstreams._streams import to_str
from agentstreams.cli._common import (
    DEFAULT_REDIS_URL,
    ExitCode,
    JsonOption,
    RedisUrlOption,
    count_of,
    emit_json,
    err,
    fail,
    format_age,
    is_stream_id,
    out,
    require_group,
    require_stream,
    run,
    usage_error,
)
from agentstreams.errors import AgentStreamsError, PermissionDeniedError

__all__ = ["claim", "info", "pending", "trim_command"]

#: Entries and consumers idle longer than this are shown in warning colours.
STUCK_AFTER_MS = DEFAULT_VISIBILITY_TIMEOUT_MS
#: XCLAIM at most this many ids per call.
CLAIM_BATCH = 100


def _idle_style(idle_ms: int | None) -> str:
    return "bold red" if idle_ms is not None and idle_ms >= STUCK_AFTER_MS else ""


# ------------------------------------------------------------------------------------ info


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
        if report.get("error"):
            what = "denied" if report.get("denied") else "unreadable"
            table.add_row(Text(report["stream"]), Text(what, style="bold red"),
                          *(["-"] * 5), Text("ACL denies reading it" if report.get("denied")
                                             else report["error"][:60]))
            continue
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


async def _why_unreadable(client: Redis, stream: str) -> tuple[str, bool] | None:
    """Why ``stream`` cannot be read (the error XINFO STREAM gets, and whether it is an ACL
    denial), or None when it can be."""
    try:
        await call(lambda: client.xinfo_stream(stream), stream=stream)
    except PermissionDeniedError as exc:
        return f"permission denied reading {stream!r}: {exc}", True
    except (AgentStreamsError, redis_exc.ResponseError) as exc:
        text = str(exc)
        denied = "no permissions" in text.lower() or "noperm" in text.lower()
        return (f"permission denied reading {stream!r}: {text}" if denied else text), denied
    return None


async def _overview(client: Redis, match: str | None, max_streams: int) -> list[dict[str, Any]]:
    """One row per stream found; a stream this user may not read gets a row saying so
    (``error``, ``denied``) instead of failing the listing or vanishing from it."""
    found = await find_streams(client, match=match, max_streams=max_streams)
    # As inspect_server does, but knowing which streams were found.
    stats = await inspect_streams(client, found.streams, detail=True,
                                  dead_letter_keys=found.dead_letter_keys,
                                  known_streams=frozenset(found.all_streams),
                                  complete=match is None)
    shown = {row.name for row in stats.streams}
    rows = [row.as_dict() for row in stats.streams]
    for name in found.streams:
        if name in shown:
            continue
        reason = await _why_unreadable(client, name)
        if reason is not None:
            rows.append({"stream": name, "exists": True, "length": None, "groups": [],
                         "dead_letters": None, "error": reason[0], "denied": reason[1]})
    rows.sort(key=lambda row: row["stream"])
    orphans = list(stats.orphans[:max(0, max_streams - len(stats.streams))])
    if found.truncated or len(orphans) < len(stats.orphans):
        err.print(f"showing the first {max_streams} of {len(found.all_streams)} streams "
                  "(--match or --max-streams to see others)", markup=False)
    return rows + [row.as_dict() for row in orphans]


def info(
    stream: Annotated[str | None, typer.Argument(
        help="Stream to describe; without it, every stream on the server.")] = None,
    match: Annotated[str | None, typer.Option(
        "--match", help="Only streams whose name matches this glob (without STREAM).")] = None,
    max_streams: Annotated[int, typer.Option(
        "--max-streams", min=1, help="Show at most this many streams (the first by name).")
    ] = DEFAULT_INSPECT_MAX_STREAMS,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Streams, groups with lag and pending entries, consumers with idle time, dead letters."""

    async def command(client: Redis) -> None:
        if stream is None:
            reports = await _overview(client, match, max_streams)
            if as_json:
                emit_json(reports)
            else:
                _print_overview(reports)
            return
        await require_stream(client, stream)
        try:
            stats = await inspect_stream(client, stream)
        except AgentStreamsError:
            # inspect_stream leaves out a stream it cannot read: say why (e.g. an ACL).
            reason = await _why_unreadable(client, stream)
            if reason is not None:
                fail(reason[0], ExitCode.PERMISSION_DENIED if reason[1] else ExitCode.FAILURE)
            raise
        report = stats.as_dict()
        if as_json:
            emit_json(report)
        else:
            _print_stream(report)

    if stream is not None and match is not None:
        usage_error("give either STREAM or --match, not both", as_json)
    run(redis_url, as_json, command)


# ------------------------------------------------------------------------------------ pending


def pending(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    consumer: Annotated[str | None, typer.Option(
        "--consumer", help="Only entries owned by this consumer.")] = None,
    min_idle_ms: Annotated[int, typer.Option(
        "--min-idle-ms", min=0, help="Only entries idle at least this long.")] = 0,
    count: Annotated[int, typer.Option("--count", min=1,
                                       help="Show at most this many entries.")] = 50,
    ack_gone: Annotated[bool, typer.Option(
        "--ack-gone", help="Acknowledge the pending entries whose stream entry is gone "
                           "(shown as (deleted): deleted or trimmed), so they stop counting; "
                           "asks first unless --yes.")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="With --ack-gone: do not ask for confirmation.")] = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Entries delivered but not acknowledged: owner, idle time, delivery count, oldest first."""

    async def command(client: Redis) -> None:
        await require_group(client, stream, group)
        if ack_gone:
            await _ack_gone(client, stream, group, consumer, yes, as_json)
            return
        report = await pending_entries(client, stream, group, count=count, consumer=consumer,
                                       min_idle_ms=min_idle_ms)
        if as_json:
            emit_json(report.as_dict())
            return
        owners = ", ".join(f"{name}: {n}" for name, n in report.consumers.items()) or "-"
        out.print(Text(f"{report.pending} pending in group {group!r} of {stream!r} "
                       f"(by consumer: {owners})"))
        if not report.entries:
            return
        table = Table()
        for column in ("id", "consumer", "idle", "deliveries", "age", "type", "session"):
            table.add_column(column, justify="right" if column in ("idle", "deliveries", "age")
                             else "left")
        for entry in report.entries:
            summary = entry.summary
            table.add_row(entry.id, Text(entry.consumer),
                          Text(format_age(entry.idle_ms), style=_idle_style(entry.idle_ms)),
                          str(entry.deliveries), format_age(entry.age_ms),
                          Text(summary.label if summary else "-"),
                          Text(summary.session_id or "-" if summary else "-"))
        out.print(table)
        if report.pending > len(report.entries):
            out.print(f"(showing {len(report.entries)}; --count to see more)")

    run(redis_url, as_json, command)


async def gone_pending_ids(client: Redis, stream: str, group: str,
                           consumer: str | None = None) -> list[str]:
    """Pending ids of ``group`` (of ``consumer``) whose stream entry no longer exists."""
    gone: list[str] = []
    start = "-"
    while True:
        rows = await call(lambda s=start: client.xpending_range(  # type: ignore[misc]
            stream, group, min=s, max="+", count=CLAIM_BATCH, consumername=consumer),
            stream=stream, group=group)
        ids = [to_str(row["message_id"]) for row in rows]
        if ids:
            pipe = client.pipeline(transaction=False)
            for msg_id in ids:
                pipe.xrange(stream, min=msg_id, max=msg_id, count=1)
            found = await call(lambda p=pipe: p.execute(), stream=stream)  # type: ignore[misc]
            gone.extend(msg_id for msg_id, entry in zip(ids, found, strict=True) if not entry)
        if len(rows) < CLAIM_BATCH:
            return gone
        start = "(" + ids[-1]


async def _ack_gone(client: Redis, stream: str, group: str, consumer: str | None, yes: bool,
                    as_json: bool) -> None:
    gone = await gone_pending_ids(client, stream, group, consumer)
    whose = f" of consumer {consumer!r}" if consumer else ""
    what = (f"{count_of(len(gone), 'pending entry', 'pending entries')}{whose} in group "
            f"{group!r} of {stream!r} whose stream entry is gone")
    acked = 0
    if gone:
        if not yes:
            _confirm(f"Acknowledge {what}?", f"--ack-gone would acknowledge {what}; add --yes "
                     "to confirm", as_json)
        for start in range(0, len(gone), CLAIM_BATCH):
            batch = gone[start:start + CLAIM_BATCH]
            acked += int(await call(lambda b=batch: client.xack(  # type: ignore[misc]
                stream, group, *b), stream=stream, group=group))
    if as_json:
        emit_json({"stream": stream, "group": group, "consumer": consumer, "gone": gone,
                   "acknowledged": acked})
        return
    if not gone:
        out.print(Text(f"no pending entry{whose} in group {group!r} of {stream!r} has lost its "
                       "stream entry"))
        return
    out.print(Text(f"acknowledged {acked} of {what} (deleted or trimmed)"))
    for msg_id in gone:
        out.print(f"  {msg_id}")


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


def _duration(ms: int) -> str:
    """``60 s``, ``1.5 s``, ``250 ms``."""
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms} ms"


async def _why_nothing(client: Redis, stream: str, group: str, target: str, idle: int,
                       from_consumer: str | None) -> str:
    """Why a claim without --id found nothing to take."""
    summary: Any = await call(lambda: client.xpending(stream, group), stream=stream, group=group)
    by_owner = {to_str(row["name"]): int(row["pending"])
                for row in (summary.get("consumers") or [])} if isinstance(summary, dict) else {}
    total = sum(by_owner.values())
    if from_consumer is not None:
        total = by_owner.get(from_consumer, 0)
        whose = f" held by {from_consumer!r}"
    else:
        whose = ""
    if total == 0:
        return f"nothing to claim: no entry is pending in group {group!r}{whose}"
    own = by_owner.get(target, 0) if from_consumer in (None, target) else 0
    if own == total:
        return (f"nothing to claim: {count_of(total, 'entry', 'entries')} pending{whose}, all "
                f"already held by {target!r}")
    return (f"nothing to claim: {count_of(total, 'entry', 'entries')} pending{whose}, all idle "
            f"less than {_duration(idle)} (--min-idle-ms to take them sooner; a live consumer "
            "may still be working on them)")


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
        note = None if claimed or wanted else await _why_nothing(
            client, stream, group, consumer, idle, from_consumer)
        report = {"stream": stream, "group": group, "consumer": consumer,
                  "min_idle_ms": idle, "claimed": claimed, "skipped": skipped, "note": note}
        if as_json:
            emit_json(report)
            return
        out.print(Text(f"claimed {count_of(len(claimed), 'entry', 'entries')} for consumer "
                       f"{consumer!r} in group {group!r} of {stream!r}"))
        for msg_id in claimed:
            out.print(f"  {msg_id}")
        if skipped:
            why = "not pending in this group" + (
                f", or idle less than {_duration(idle)}" if idle else "")
            out.print(Text(f"skipped {len(skipped)} ({why}): {', '.join(skipped)}"))
        if note is not None:
            out.print(Text(note, style="yellow"))

    run(redis_url, as_json, command)


# ------------------------------------------------------------------------------------ trim


def held_text(result: TrimResult, kept: int) -> str:
    """``kept 1,234 entries: group 'workers' has not read past 1700000000000-0 (3h05m ago)``."""
    group, since = result.held_by, result.held_since_id
    age = "" if result.held_age_ms is None else f" ({format_age(result.held_age_ms)} ago)"
    if result.held_reason == HELD_PENDING:
        why = f"group {group!r} has not acknowledged {since}{age}"
    elif since in (None, "0-0"):
        why = f"group {group!r} has not read anything yet"
    else:
        why = f"group {group!r} has not read past {since}{age}"
    return f"kept {kept:,} {'entry' if kept == 1 else 'entries'} more than --maxlen: {why}"


def _confirm(question: str, refusal: str, as_json: bool) -> None:
    """Ask ``question`` in a terminal; elsewhere refuse with ``refusal`` (exit 2)."""
    if not sys.stdin.isatty():
        usage_error(refusal, as_json)
    if not typer.confirm(question):
        fail("nothing was changed", ExitCode.FAILURE)


def trim_command(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    maxlen: Annotated[int, typer.Option(
        "--maxlen", min=0, help="Keep (at least) this many newest entries. Required.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Also remove entries a group has not acknowledged (they are lost); "
                        "asks first, with their count.")
    ] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="With --force: do not ask for confirmation.")] = False,
    approximate: Annotated[bool, typer.Option(
        "--approximate", help="Let the server trim whole nodes only (cheaper, less exact).")
    ] = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Trim towards --maxlen entries, keeping every entry a consumer group still needs."""

    async def command(client: Redis) -> None:
        await require_stream(client, stream)
        lost = 0
        if force:
            lost = await unacknowledged_cut(client, stream, maxlen)
            if lost and not yes:
                what = (f"{count_of(lost, 'entry', 'entries')} of {stream!r} that a consumer "
                        "group has not acknowledged yet")
                _confirm(f"--force deletes {what}; they are lost to that group. Go on?",
                         f"trim --force would delete {what}; add --yes to confirm", as_json)
        before = int(await call(lambda: client.xlen(stream), stream=stream))
        result = await safe_trim(client, stream, maxlen, approximate=approximate, force=force)
        after = int(await call(lambda: client.xlen(stream), stream=stream))
        kept = max(0, after - maxlen)
        report: dict[str, Any] = {
            "stream": stream, "max_length": maxlen, "forced": force,
            "length_before": before, "length_after": after, "removed": result.removed,
            "floor_id": result.floor_id, "limited_by_groups": result.limited_by_groups,
            "held_by": None if result.held_by is None else {
                "group": result.held_by, "reason": result.held_reason,
                "since_id": result.held_since_id, "age_ms": result.held_age_ms,
                "kept_over_maxlen": kept},
        }
        if force:
            report["unacknowledged_removed"] = lost
        if as_json:
            emit_json(report)
            return
        out.print(Text(f"removed {count_of(result.removed, 'entry', 'entries')} from {stream!r}: "
                       f"{before} -> {after}"))
        if result.limited_by_groups:
            out.print(Text(held_text(result, kept), style="yellow"))
            out.print(Text(f"(--force removes them anyway: they are then lost to that group; a "
                           f"group nobody reads any more should be removed: XGROUP DESTROY "
                           f"{stream} {result.held_by})", style="yellow"))

    run(redis_url, as_json, command)

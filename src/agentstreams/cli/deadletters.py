"""``agentstreams dlq list|show|replay|purge``: the dead letters of a stream, with their reason.

Replay puts a dead letter back on its stream (a new id, the same event id) and removes it from
the dead-letter stream in one atomic step; purge deletes dead letters for good.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from agentstreams._connection import Redis
from agentstreams._dlq import DeadLetter, DeadLetterQueue
from agentstreams._streams import dlq_key, to_str
from agentstreams.cli._common import (
    DEFAULT_REDIS_URL,
    ExitCode,
    JsonOption,
    RedisUrlOption,
    age_ms_of,
    count_of,
    emit_json,
    fail,
    format_age,
    format_time,
    is_stream_id,
    key_type,
    now_ms,
    out,
    run,
    usage_error,
)
from agentstreams.errors import MalformedEventError

__all__ = ["list_command", "purge_command", "replay_command", "show_command"]

#: Dead letters read per XRANGE while filtering.
PAGE = 500
#: Error text shown in the list table (``show`` prints it whole).
MAX_ERROR_CHARS = 80

Where = Callable[[DeadLetter], bool]

IdsArgument = Annotated[list[str] | None, typer.Argument(
    help="Dead-letter ids (the first column of `dlq list`).", show_default=False)]
AllOption = Annotated[bool, typer.Option("--all", help="Every dead letter of the stream.")]
ReasonOption = Annotated[str | None, typer.Option(
    "--reason", help="Only this reason: max_deliveries, malformed or rejected.")]
TypeOption = Annotated[str | None, typer.Option("--type", help="Only events of this type.")]
GroupOption = Annotated[str | None, typer.Option(
    "--group", help="Only dead letters from this consumer group.")]


def _event_type(letter: DeadLetter) -> str | None:
    raw = letter.fields.get(b"type")
    return None if raw is None else to_str(raw)


def _filter(reason: str | None, event_type: str | None, group: str | None) -> Where | None:
    if reason is None and event_type is None and group is None:
        return None

    def where(letter: DeadLetter) -> bool:
        return ((reason is None or letter.reason == reason)
                and (event_type is None or _event_type(letter) == event_type)
                and (group is None or letter.group == group))

    return where


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    data = letter.to_dict()
    data["dead_age_ms"] = max(0, now_ms() - letter.dead_at_ms) if letter.dead_at_ms else None
    data["original_age_ms"] = age_ms_of(letter.original_id)
    try:
        event = letter.event()
    except MalformedEventError as exc:
        data.update(type=_event_type(letter), session_id=None, event=None, malformed=exc.reason)
    else:
        data.update(type=event.type, session_id=event.session_id, event=event.data,
                    malformed=None)
    return data


async def _open(client: Redis, stream: str) -> DeadLetterQueue:
    """The dead-letter queue of ``stream``; fails when neither it nor the stream exists."""
    kind = await key_type(client, stream)
    if kind not in ("none", "stream"):
        fail(f"key {stream!r} holds a {kind}, not a stream", ExitCode.WRONG_TYPE)
    key = dlq_key(stream)
    dlq_kind = await key_type(client, key)
    if dlq_kind not in ("none", "stream"):
        fail(f"key {key!r} (the dead-letter stream of {stream!r}) holds a {dlq_kind}",
             ExitCode.WRONG_TYPE)
    if kind == "none" and dlq_kind == "none":
        fail(f"stream {stream!r} does not exist and has no dead letters", ExitCode.NOT_FOUND)
    return DeadLetterQueue(client, stream)


async def _select(queue: DeadLetterQueue, where: Where | None, limit: int | None) -> list[
        DeadLetter]:
    """Dead letters matching ``where``, oldest first, at most ``limit``."""
    found: list[DeadLetter] = []
    cursor = "-"
    while limit is None or len(found) < limit:
        page = await queue.list(count=PAGE, start=cursor)
        found.extend(x for x in page if where is None or where(x))
        if len(page) < PAGE:
            break
        cursor = "(" + page[-1].dlq_id
    return found if limit is None else found[:limit]


def _check_selection(ids: list[str], select_all: bool, where: Where | None, verb: str,
                     as_json: bool) -> None:
    bad = [i for i in ids if not is_stream_id(i)]
    if bad:
        usage_error(f"{bad[0]!r} is not a dead-letter id (use MS-SEQ from `dlq list`)", as_json)
    if ids and select_all:
        usage_error("give dead-letter ids or --all, not both", as_json)
    if not ids and not select_all and where is None:
        usage_error(f"say which dead letters to {verb}: their ids, a filter (--reason, --type, "
                    "--group) or --all", as_json)


async def _selected(queue: DeadLetterQueue, present: list[str] | None,
                    where: Where | None) -> list[str]:
    """The dead-letter ids a purge deletes (counted before asking): of ``present`` (None: of
    all), those ``where`` accepts."""
    if present is not None:
        letters = [x for x in [await queue.get(i) for i in present] if x is not None]
        return [x.dlq_id for x in letters if where is None or where(x)]
    selected: list[str] = []
    cursor = "-"
    while True:
        batch = await queue.list(count=500, start=cursor)
        if not batch:
            return selected
        selected.extend(x.dlq_id for x in batch if where is None or where(x))
        cursor = "(" + batch[-1].dlq_id


async def _found(queue: DeadLetterQueue, ids: list[str]) -> tuple[list[str], list[str]]:
    """Split ``ids`` into those that exist and those that do not."""
    present: list[str] = []
    missing: list[str] = []
    for dlq_id in ids:
        (present if await queue.get(dlq_id) is not None else missing).append(dlq_id)
    return present, missing


def list_command(
    stream: Annotated[str, typer.Argument(help="The stream whose dead letters to list.")],
    reason: ReasonOption = None,
    event_type: TypeOption = None,
    group: GroupOption = None,
    count: Annotated[int, typer.Option("--count", min=1, help="Show at most this many.")] = 50,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Dead letters, oldest first, with reason, error, deliveries and when they died."""

    async def command(client: Redis) -> None:
        queue = await _open(client, stream)
        total = await queue.length()
        letters = await _select(queue, _filter(reason, event_type, group), count)
        if as_json:
            emit_json({"stream": stream, "dead_letters": total,
                       "entries": [_letter_json(x) for x in letters]})
            return
        out.print(Text(f"{count_of(total, 'dead letter')} for {stream!r} (in {dlq_key(stream)!r})"))
        if not letters:
            return
        table = Table()
        for column in ("dead-letter id", "died", "original id", "type", "session", "group",
                       "consumer", "reason", "deliveries", "error"):
            table.add_column(column, justify="right" if column in ("died", "deliveries")
                             else "left")
        for letter in letters:
            data = _letter_json(letter)
            error = letter.error if len(letter.error) <= MAX_ERROR_CHARS else \
                letter.error[:MAX_ERROR_CHARS] + "..."
            table.add_row(
                letter.dlq_id, format_age(data["dead_age_ms"]) + " ago", letter.original_id,
                Text(data["type"] or "-"), Text(str(data["session_id"] or "-")),
                Text(letter.group or "-"), Text(letter.consumer or "-"),
                Text(letter.reason, style="bold red"), str(letter.deliveries), Text(error),
            )
        out.print(table)
        if total > len(letters) and not (reason or event_type or group):
            out.print(f"(showing {len(letters)}; --count to see more)")

    run(redis_url, as_json, command)


def show_command(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    dlq_id: Annotated[str, typer.Argument(help="The dead letter's id (from `dlq list`).")],
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """One dead letter in full: why it died, the whole error, and the event's fields."""
    if not is_stream_id(dlq_id):
        usage_error(f"{dlq_id!r} is not a dead-letter id (use MS-SEQ from `dlq list`)", as_json)

    async def command(client: Redis) -> None:
        queue = await _open(client, stream)
        letter = await queue.get(dlq_id)
        if letter is None:
            fail(f"no dead letter {dlq_id} in {queue.key!r}", ExitCode.NOT_FOUND)
        data = _letter_json(letter)
        if as_json:
            emit_json(data)
            return
        head = Table(title=f"dead letter {dlq_id}", title_justify="left", show_header=False)
        head.add_column("what")
        head.add_column("value")
        head.add_row("stream", Text(f"{letter.original_stream} (entry {letter.original_id}, "
                                    f"added {format_age(data['original_age_ms'])} ago)"))
        head.add_row("group / consumer", Text(f"{letter.group or '-'} / "
                                              f"{letter.consumer or '-'}"))
        head.add_row("reason", Text(letter.reason, style="bold red"))
        head.add_row("deliveries", str(letter.deliveries))
        head.add_row("died", f"{format_time(letter.dead_at_ms)} "
                             f"({format_age(data['dead_age_ms'])} ago)")
        head.add_row("error", Text(letter.error or "-"))
        if data["malformed"]:
            head.add_row("malformed", Text(data["malformed"], style="yellow"))
        out.print(head)
        fields = Table(title="event fields" if data["event"] is not None else "raw fields",
                       title_justify="left")
        fields.add_column("field")
        fields.add_column("value")
        values: dict[str, Any] = data["event"] if data["event"] is not None else data["fields"]
        for name, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            fields.add_row(Text(name), Text(text))
        out.print(fields)

    run(redis_url, as_json, command)


def replay_command(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    ids: IdsArgument = None,
    select_all: AllOption = False,
    reason: ReasonOption = None,
    event_type: TypeOption = None,
    group: GroupOption = None,
    all_groups: Annotated[bool, typer.Option(
        "--all-groups", help="Run them again in every consumer group, not only the one "
                             "where each died (groups that handled them would run them "
                             "twice).")] = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Put dead letters back on their stream, for the group where each died: by id, by
    filter, or --all."""
    wanted = list(ids or [])
    where = _filter(reason, event_type, group)
    _check_selection(wanted, select_all, where, "replay", as_json)

    async def command(client: Redis) -> None:
        queue = await _open(client, stream)
        present, missing = await _found(queue, wanted)
        if wanted and not present:
            replayed: list[tuple[str, str]] = []
        else:
            replayed = await queue.replay(present or None, where=where,
                                          all_letters=select_all and not present,
                                          all_groups=all_groups)
        if as_json:
            emit_json({"stream": stream,
                       "replayed": [{"dlq_id": d, "new_id": n} for d, n in replayed],
                       "not_found": missing})
        else:
            scope = "for every group" if all_groups else "for the group where each died"
            out.print(Text(f"replayed {count_of(len(replayed), 'dead letter')} onto {stream!r} "
                           f"({scope})"))
            for dead_id, new_id in replayed:
                out.print(f"  {dead_id} -> {new_id}")
        if missing:
            fail(f"no dead letter {', '.join(missing)} in {queue.key!r}", ExitCode.NOT_FOUND)

    run(redis_url, as_json, command)


def purge_command(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    ids: IdsArgument = None,
    select_all: AllOption = False,
    reason: ReasonOption = None,
    event_type: TypeOption = None,
    group: GroupOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    as_json: JsonOption = False,
) -> None:
    """Delete dead letters for good: by id, by filter, or --all."""
    wanted = list(ids or [])
    where = _filter(reason, event_type, group)
    _check_selection(wanted, select_all, where, "purge", as_json)

    async def command(client: Redis) -> None:
        queue = await _open(client, stream)
        present, missing = await _found(queue, wanted)
        # Exactly the dead letters counted (and confirmed) are deleted, by id.
        selected = await _selected(queue, present if wanted else None, where)
        count = len(selected)
        if count and not yes:
            what = f"{count_of(count, 'dead letter')} of {stream!r}"
            if not sys.stdin.isatty():
                usage_error(f"purge would delete {what} for good; add --yes to confirm",
                            as_json)
            if not typer.confirm(f"Delete {what} for good?"):
                fail("nothing was deleted", ExitCode.FAILURE)
        purged = 0 if not count else await queue.purge(selected)
        if as_json:
            emit_json({"stream": stream, "purged": purged, "not_found": missing})
        else:
            out.print(Text(f"purged {count_of(purged, 'dead letter')} of {stream!r}"))
        if missing:
            fail(f"no dead letter {', '.join(missing)} in {queue.key!r}", ExitCode.NOT_FOUND)

    run(redis_url, as_json, command)

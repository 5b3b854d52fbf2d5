"""Intake: how the entries of a consumer group reach one consumer, for every consumer we ship.

``AgentCoordinator.subscribe`` / ``claim_abandoned_messages`` and ``Worker`` both read through
an ``Intake``, so the rules below exist once:

* **Own pending entries first.** A consumer first re-reads what the group already delivered to
  it (``XREADGROUP ... 0``: left over from before a restart, or from a read whose reply was
  lost), with the server's delivery counts, then reads new entries (``>``). After a lost
  connection or a vanished group it starts over with its pending entries.
* **Every entry is sorted before anything runs it** (``sort``, no I/O): entries delivered more
  than ``max_deliveries`` times and entries that do not decode go to the dead-letter stream;
  entries deleted or trimmed while pending are reported lost and acknowledged; the rest become
  ``Event`` objects. The caller queues the events first and dead-letters afterwards, so an entry
  that cannot be dead-lettered right now never holds up the good entries of its batch.
* **Dead-lettering never stops a consumer.** A failed move (the server restarting, out of
  memory) is logged and leaves the entry pending, where the reclaimer finds it again. Only a
  misconfiguration (an ACL that denies the dead-letter key) is raised: retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentstreams._codec import decode_entry
from agentstreams._connection import Redis, call, is_permanent
from agentstreams._constants import (
    AUTOCLAIM_BATCH,
    DLQ_REASON_MALFORMED,
    DLQ_REASON_MAX_DELIVERIES,
    DLQ_REASON_UNAUTHENTICATED,
    FIELD_FOR_GROUP,
)
from agentstreams._dlq import dead_letter
from agentstreams._events import Event
from agentstreams._observe import Observer, get_observer
from agentstreams._signing import SigningKeys
from agentstreams._streams import (
    RawEntry,
    autoclaim_all,
    delivery_counts,
    ensure_group,
    entries_from_read_reply,
)
from agentstreams.errors import MalformedEventError

__all__ = ["DeadLetterRequest", "Intake", "IntakeCounters", "Sorted"]

_B_FOR_GROUP = FIELD_FOR_GROUP.encode()
logger = logging.getLogger("agentstreams.intake")


class IntakeCounters(Protocol):
    """The counters an intake keeps up to date (``WorkerStats`` is one)."""

    delivered: int
    dead_lettered: int
    dead_letter_failures: int
    malformed: int
    unauthenticated: int
    lost: int
    claimed: int


@dataclass(slots=True)
class _Counters:
    """Counters for a consumer that keeps none of its own (the coordinator)."""

    delivered: int = 0
    dead_lettered: int = 0
    dead_letter_failures: int = 0
    malformed: int = 0
    unauthenticated: int = 0
    lost: int = 0
    claimed: int = 0


@dataclass(slots=True)
class DeadLetterRequest:
    """An entry ``sort`` found must not run: where it goes and why."""

    msg_id: str
    fields: dict[bytes, bytes]
    reason: str
    error: str
    deliveries: int
    #: the failed handler's traceback, when a handler failed
    trace: str = ""


@dataclass(slots=True)
class Sorted:
    """What ``sort`` made of a batch of entries."""

    #: Decoded events to run or yield, in stream order.
    events: list[Event] = field(default_factory=list)
    #: The raw fields of each event (same order): a failed handler dead-letters them as read.
    fields: list[dict[bytes, bytes]] = field(default_factory=list)
    #: Entries to move to the dead-letter stream.
    dead: list[DeadLetterRequest] = field(default_factory=list)
    #: Ids to acknowledge without running: deleted or trimmed while pending, or replayed
    #: from the dead-letter stream for another group.
    settle: list[str] = field(default_factory=list)


def _entries_fast(reply: Any) -> list[RawEntry] | None:
    """The entries of a RESP2 XREADGROUP reply on one stream from a bytes client, without
    copying their field dicts; None when the reply has another shape (use the general path)."""
    if not reply:
        return []
    if type(reply) is not list or len(reply) != 1:
        return None
    out: list[RawEntry] = []
    for msg_id, fields in reply[0][1]:
        if type(msg_id) is not bytes or (fields and type(fields) is not dict):
            return None
        out.append((msg_id.decode(), fields or None))
    if out and out[0][1] is not None:
        first_key = next(iter(out[0][1]))  # a decode_responses client gives str: general path
        if type(first_key) is not bytes:
            return None
    return out


class Intake:
    """One consumer's reads, claims and dead letters on one stream and group."""

    def __init__(
        self,
        client: Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        max_deliveries: int,
        max_event_bytes: int,
        counters: IntakeCounters | None = None,
        observer: Callable[[], Observer] = get_observer,
        signing_keys: SigningKeys | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self._group_bytes = group.encode()
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.max_event_bytes = max_event_bytes
        self.counters: IntakeCounters = counters if counters is not None else _Counters()
        self._observer = observer
        #: With signing keys, every entry is verified before it is decoded
        self._verifier = signing_keys.verifier(stream) if signing_keys is not None else None
        #: Where the re-read of this consumer's own pending entries stands; None once drained.
        self.pending_from: str | None = "0"

    def _log_extra(self, **more: Any) -> dict[str, Any]:
        return {"stream": self.stream, "group": self.group, "consumer": self.consumer, **more}

    # ---------------------------------------------------------------- reading

    @property
    def reading_pending(self) -> bool:
        """True while the next ``read`` re-reads this consumer's own pending entries."""
        return self.pending_from is not None

    def restart_pending(self) -> None:
        """Re-read this consumer's pending entries next (after a lost connection, or a
        vanished group): a lost reply may have left entries delivered to us unseen."""
        self.pending_from = "0"

    async def read(self, count: int, block_ms: int | None
                   ) -> tuple[list[RawEntry], dict[str, int] | None]:
        """The next entries for this consumer, and their delivery counts (None: first
        deliveries). While own pending entries remain they come first (never blocking); an
        empty reply from them means they are drained, and the next call reads new entries."""
        pending_from = self.pending_from
        if pending_from is not None:
            entries = await self._xreadgroup(pending_from, count, None)
            if not entries:
                self.pending_from = None
                return [], None
            self.pending_from = entries[-1][0]
            counts = await delivery_counts(self.client, self.stream, self.group,
                                           [e[0] for e in entries], self.consumer)
            return entries, counts
        return await self._xreadgroup(">", count, block_ms), None

    async def _xreadgroup(self, start_id: str, count: int,
                          block_ms: int | None) -> list[RawEntry]:
        client, stream, group = self.client, self.stream, self.group
        reply = await call(
            lambda: client.xreadgroup(group, self.consumer, {stream: start_id}, count=count,
                                      block=block_ms),
            stream=stream, group=group)
        return _entries_fast(reply) or entries_from_read_reply(reply)

    async def claim_idle(self, min_idle_ms: int, *, count: int = AUTOCLAIM_BATCH,
                         limit: int | None = None,
                         skip: Callable[[Sequence[RawEntry]], list[RawEntry]] | None = None,
                         ) -> tuple[list[RawEntry], dict[str, int]]:
        """Claim entries any consumer has held for ``min_idle_ms`` or more (XAUTOCLAIM,
        following the cursor), with their delivery counts; ``skip`` filters out entries the
        caller already holds before the counts are asked for."""
        claimed, deleted = await autoclaim_all(self.client, self.stream, self.group,
                                               self.consumer, min_idle_ms=min_idle_ms,
                                               count=count, limit=limit)
        if deleted:
            self.counters.lost += len(deleted)
            self._observer().on_lost(self.stream, self.group, len(deleted))
        if skip is not None:
            claimed = skip(claimed)
        if not claimed:
            return [], {}
        self.counters.claimed += len(claimed)
        self._observer().on_claimed(self.stream, self.group, len(claimed))
        counts = await delivery_counts(self.client, self.stream, self.group,
                                       [e[0] for e in claimed], self.consumer)
        return claimed, counts

    async def claim_back(self, msg_id: str, min_idle_ms: int
                         ) -> tuple[list[RawEntry], dict[str, int]]:
        """Claim one of our entries again for a retry (XCLAIM counts the delivery).

        ``min_idle_ms`` is the time since we let go of it: if another consumer claimed it
        meanwhile its idle time is shorter, nothing is claimed, and the entry stays theirs.
        """
        client, stream, group = self.client, self.stream, self.group
        reply = await call(
            lambda: client.xclaim(stream, group, self.consumer, max(0, min_idle_ms), [msg_id]),
            stream=stream, group=group)
        entries = [e for e in entries_from_read_reply([(stream, reply)]) if e[1] is not None] \
            if reply else []
        if not entries:
            return [], {}
        return entries, await delivery_counts(client, stream, group, [msg_id], self.consumer)

    async def recreate_group(self) -> None:
        """Re-create a vanished group at the start of the stream (redelivering beats
        skipping), and re-read our pending entries next."""
        logger.warning("group %r is gone from %r (stream deleted?); re-creating it at the "
                       "start of the stream", self.group, self.stream, extra=self._log_extra())
        client, stream, group = self.client, self.stream, self.group
        await call(lambda: ensure_group(client, stream, group, "0"), stream=stream, group=group)
        self.restart_pending()

    # ---------------------------------------------------------------- sorting

    def sort(self, entries: Sequence[RawEntry], counts: Mapping[str, int] | None, *,
             redelivery: bool = False) -> Sorted:
        """Decode a batch; set aside what is lost or must be dead-lettered (no I/O).

        Counts the entries as delivered, unless this is a ``redelivery`` of entries this
        consumer already counted (a retry).
        """
        out = Sorted()
        if not redelivery and entries:
            self.counters.delivered += len(entries)
            self._observer().on_delivered(self.stream, self.group, len(entries))
        if self._verifier is not None:
            entries = self._authenticated(entries, counts, out)
        max_deliveries = self.max_deliveries
        for msg_id, fields in entries:
            deliveries = 1 if counts is None else counts.get(msg_id, 1)
            if fields is None:
                self.counters.lost += 1
                self._observer().on_lost(self.stream, self.group, 1)
                logger.warning("pending entry %s was deleted or trimmed before it was "
                               "acknowledged; it is lost", msg_id,
                               extra=self._log_extra(msg_id=msg_id))
                out.settle.append(msg_id)
                continue
            target = fields.get(_B_FOR_GROUP)
            if target is not None and target != self._group_bytes:
                out.settle.append(msg_id)  # a replay for the group where it died, not us
                continue
            if deliveries > max_deliveries:
                out.dead.append(DeadLetterRequest(
                    msg_id, fields, DLQ_REASON_MAX_DELIVERIES,
                    f"delivered {deliveries} times without being acknowledged (its consumers "
                    "crashed or timed out)", deliveries))
                continue
            try:
                event = decode_entry(msg_id, fields, stream=self.stream,
                                     delivery_count=deliveries,
                                     max_event_bytes=self.max_event_bytes)
            except MalformedEventError as exc:
                self.counters.malformed += 1
                self._observer().on_malformed(self.stream, self.group)
                out.dead.append(DeadLetterRequest(msg_id, fields, DLQ_REASON_MALFORMED,
                                                  exc.reason, deliveries))
                continue
            out.events.append(event)
            out.fields.append(fields)
        return out

    def _authenticated(self, entries: Sequence[RawEntry], counts: Mapping[str, int] | None,
                       out: Sorted) -> list[RawEntry]:
        """The entries whose signature verifies (and the lost ones, for ``sort``); the others
        go to ``out.dead`` as ``unauthenticated`` before anything decodes them."""
        assert self._verifier is not None
        problem_of = self._verifier.problem
        kept: list[RawEntry] = []
        for entry in entries:
            msg_id, fields = entry
            if fields is None or (problem := problem_of(fields)) is None:
                kept.append(entry)
                continue
            self.counters.unauthenticated += 1
            out.dead.append(DeadLetterRequest(
                msg_id, fields, DLQ_REASON_UNAUTHENTICATED, problem,
                1 if counts is None else counts.get(msg_id, 1)))
        return kept

    # ---------------------------------------------------------------- dead letters

    async def dead_letter(self, request: DeadLetterRequest, *,
                          event_type: str | None = None) -> str | None:
        """Move an entry to the dead-letter stream and acknowledge it, atomically.

        Returns the dead-letter id; None when the entry was no longer ours (someone else
        settled it) or when the move failed for now (logged; the entry stays pending and comes
        back through the reclaimer). Raises only what retrying cannot fix
        (``ConfigurationError``: e.g. an ACL without the dead-letter key).
        """
        try:
            dlq_id = await dead_letter(
                self.client, stream=self.stream, group=self.group, consumer=self.consumer,
                msg_id=request.msg_id, fields=request.fields, reason=request.reason,
                error=request.error, deliveries=request.deliveries, trace=request.trace)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_permanent(exc):
                raise
            self.counters.dead_letter_failures += 1
            logger.warning("could not dead-letter %s now (%s: %s); it stays pending and will "
                           "come back", request.msg_id, type(exc).__name__, exc,
                           extra=self._log_extra(msg_id=request.msg_id))
            return None
        if dlq_id is None:
            logger.info("%s was no longer ours to dead-letter (claimed or acknowledged "
                        "elsewhere)", request.msg_id,
                        extra=self._log_extra(msg_id=request.msg_id))
            return None
        self.counters.dead_lettered += 1
        self._observer().on_dead_lettered(self.stream, self.group, request.reason)
        logger.warning("dead-lettered %s (%s after %d %s): %s%s", request.msg_id,
                       request.reason, request.deliveries,
                       "delivery" if request.deliveries == 1 else "deliveries", request.error,
                       f"\n{request.trace}" if request.trace else "",
                       extra=self._log_extra(msg_id=request.msg_id, dlq_id=dlq_id,
                                             event_type=event_type,
                                             traceback=request.trace or None))
        return dlq_id

    async def dead_letter_all(self, requests: Sequence[DeadLetterRequest]) -> None:
        """``dead_letter`` each request, in order."""
        for request in requests:
            await self.dead_letter(request)

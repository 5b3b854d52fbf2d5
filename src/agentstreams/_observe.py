"""Observation hooks: the runtime reports what happens here; metrics plug in as an Observer.

The default observer does nothing and costs one method call. ``agentstreams.metrics`` provides
a Prometheus implementation; install one process-wide with ``set_observer()`` or pass one to a
Worker.
"""

from __future__ import annotations

__all__ = ["Observer", "get_observer", "set_observer"]


class Observer:
    """Receives runtime events. Subclass and override what you need; every method is a no-op.

    Implementations must be cheap and must never raise.
    """

    def on_published(self, stream: str, count: int) -> None:
        """``count`` events were appended to ``stream``."""

    def on_delivered(self, stream: str, group: str, count: int) -> None:
        """``count`` entries were read by a consumer of ``group``."""

    def on_acked(self, stream: str, group: str, count: int) -> None:
        """``count`` entries were acknowledged."""

    def on_retried(self, stream: str, group: str, event_type: str) -> None:
        """A handler failed and the event will be delivered again."""

    def on_dead_lettered(self, stream: str, group: str, reason: str) -> None:
        """An entry was moved to the dead-letter stream."""

    def on_malformed(self, stream: str, group: str) -> None:
        """An entry could not be decoded."""

    def on_unhandled(self, stream: str, group: str, event_type: str) -> None:
        """An event type with no handler in this group was acknowledged and skipped."""

    def on_lost(self, stream: str, group: str, count: int) -> None:
        """Pending entries were deleted or trimmed before anyone acknowledged them."""

    def on_claimed(self, stream: str, group: str, count: int) -> None:
        """Entries idle past the visibility timeout were claimed from another consumer."""

    def on_reconnect(self, stream: str, group: str) -> None:
        """A consumer lost its connection and is reconnecting."""

    def on_task_restarted(self, stream: str, group: str, task: str) -> None:
        """A worker's background task failed unexpectedly and was restarted."""

    def on_handler_done(self, stream: str, group: str, event_type: str, duration_s: float,
                        ok: bool) -> None:
        """A handler returned (``ok``) or raised after ``duration_s`` seconds."""


_observer: Observer = Observer()


def get_observer() -> Observer:
    """The process-wide observer."""
    return _observer


def set_observer(observer: Observer | None) -> None:
    """Install a process-wide observer (None restores the no-op one)."""
    global _observer
    _observer = observer if observer is not None else Observer()

"""Structured logs for log shippers: one JSON object per line, context fields included.

agentstreams logs through the standard ``logging`` module (loggers under ``agentstreams``) and
never prints. Records about a stream carry its context as ``extra`` fields: ``stream``,
``group``, ``consumer``, ``msg_id`` and ``event_type`` where they apply. ``JsonFormatter``
turns a record and those fields into one JSON line::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("agentstreams").addHandler(handler)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["STRUCTURED_FIELDS", "JsonFormatter", "log_context"]

#: The context fields, in the order they are written.
STRUCTURED_FIELDS: tuple[str, ...] = ("stream", "group", "consumer", "msg_id", "event_type")

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


def log_context(*, stream: str | None = None, group: str | None = None,
                consumer: str | None = None, msg_id: str | None = None,
                event_type: str | None = None, **more: Any) -> dict[str, Any]:
    """An ``extra=`` mapping with the context fields that are known (None ones left out)."""
    fields = {"stream": stream, "group": group, "consumer": consumer, "msg_id": msg_id,
              "event_type": event_type, **more}
    return {key: value for key, value in fields.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, then its context.

    ``static_fields`` are added to every line (a service name, a host). Extra fields whose
    value is None are left out; values JSON cannot hold are written with ``str()``.
    """

    def __init__(self, *, static_fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static_fields = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON (newlines inside values are escaped)."""
        moment = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        line: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(self.static_fields)
        extras = {key: value for key, value in vars(record).items()
                  if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
                  and value is not None}
        for key in STRUCTURED_FIELDS:
            if key in extras:
                line[key] = extras.pop(key)
        line.update(sorted(extras.items()))
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)

"""Every key suffix, field name, default and unit in one place."""

from __future__ import annotations

from typing import Final

# --- wire format ----------------------------------------------------------------------------
#: Current entry format version, written in FIELD_VERSION. Entries without it are legacy
#: (written by the reference implementation) and decoded the way it decodes them.
FORMAT_VERSION: Final = 1
FORMAT_VERSION_BYTES: Final = b"1"

#: Metadata fields start with an underscore; user field names may not.
FIELD_TYPE: Final = "type"
FIELD_TIMESTAMP: Final = "timestamp"
FIELD_SESSION_ID: Final = "session_id"
FIELD_VERSION: Final = "_v"
FIELD_EVENT_ID: Final = "_eid"
#: Comma-separated names of the fields whose value is JSON; every other field is a plain string.
FIELD_JSON: Final = "_json"
#: W3C traceparent of the publisher, when tracing is enabled.
FIELD_TRACEPARENT: Final = "_tp"
FIELD_TRACESTATE: Final = "_tstate"
#: Signed events: the id of the key that signed the entry, and its HMAC-SHA256 (hex).
FIELD_KEY_ID: Final = "_kid"
#: On an entry replayed from the dead-letter stream: the only consumer group that runs it
#: (the one where it died); every other group acknowledges it without running it.
FIELD_FOR_GROUP: Final = "_grp"
FIELD_SIGNATURE: Final = "_sig"
#: First bulk string of the signed bytes (domain separation; bumped if the form changes).
SIGNATURE_DOMAIN: Final = "agentstreams-sig-1"
#: Shortest secret accepted in ``signing_keys`` (bytes).
SIGNING_KEY_MIN_BYTES: Final = 16

#: Request/reply (``AgentCoordinator.request``): a request carries the caller's id (its reply
#: stream is ``{stream}:replies:<caller id>``, derived by the replier from its OWN stream, never
#: a key named by the message) and the request id (a reply's ``_eid`` is its request's id).
FIELD_REPLY_TO: Final = "_rto"
FIELD_REQUEST_ID: Final = "_rid"

# Byte forms used on the hot decode path.
B_FIELD_VERSION: Final = FIELD_VERSION.encode()
B_FIELD_EVENT_ID: Final = FIELD_EVENT_ID.encode()
B_FIELD_JSON: Final = FIELD_JSON.encode()
B_FIELD_TRACEPARENT: Final = FIELD_TRACEPARENT.encode()
B_FIELD_TRACESTATE: Final = FIELD_TRACESTATE.encode()
B_FIELD_REPLY_TO: Final = FIELD_REPLY_TO.encode()
B_FIELD_REQUEST_ID: Final = FIELD_REQUEST_ID.encode()

# Keys added to the dict a subscriber receives (reference-compatible `_msg_id`).
KEY_MSG_ID: Final = "_msg_id"
KEY_EVENT_ID: Final = "_event_id"
KEY_DELIVERY_COUNT: Final = "_delivery_count"
#: A request's dict (``subscribe``) also carries what ``AgentCoordinator.reply`` needs.
KEY_REPLY_TO: Final = "_reply_to"
KEY_REQUEST_ID: Final = "_request_id"

# --- dead letters ---------------------------------------------------------------------------
DLQ_SUFFIX: Final = "dlq"
IDEMPOTENCY_SUFFIX: Final = "idem"
DLQ_FIELD_ORIGINAL_ID: Final = "original_id"
DLQ_FIELD_ORIGINAL_STREAM: Final = "original_stream"
DLQ_FIELD_GROUP: Final = "group"
DLQ_FIELD_CONSUMER: Final = "consumer"
DLQ_FIELD_REASON: Final = "reason"
DLQ_FIELD_ERROR: Final = "error"
DLQ_FIELD_DELIVERIES: Final = "deliveries"
DLQ_FIELD_DEAD_AT_MS: Final = "dead_at_ms"
#: The handler's traceback (the innermost part, at most DLQ_TRACEBACK_MAX_CHARS characters).
DLQ_FIELD_TRACEBACK: Final = "traceback"
DLQ_TRACEBACK_MAX_CHARS: Final = 8000

#: Data directories of the development servers ``agentstreams.server.LocalServer`` starts
#: begin with this: a worker does not warn about their (deliberately) volatile settings.
LOCAL_SERVER_DIR_PREFIX: Final = "agentstreams-dev-"

DLQ_REASON_MAX_DELIVERIES: Final = "max_deliveries"
DLQ_REASON_MALFORMED: Final = "malformed"
DLQ_REASON_REJECTED: Final = "rejected"
#: Signing keys are configured and the entry is unsigned, tampered, copied from another
#: stream, or signed with a key this consumer does not know.
DLQ_REASON_UNAUTHENTICATED: Final = "unauthenticated"

# --- request/reply --------------------------------------------------------------------------
#: Reply streams are ``{stream}:replies:<caller id>`` (``side_key``: the stream's hash slot).
REPLIES_SUFFIX: Final = "replies"
#: The event type of a reply entry.
REPLY_EVENT_TYPE: Final = "reply"
#: Every reply sets this TTL on its reply stream, so the stream of a caller that went away
#: expires; it is also the idempotency window of replies (a redelivered request answered
#: again within it writes no second reply). Longer than any sensible request timeout.
DEFAULT_REPLY_TTL_S: Final = 600
#: ``request`` waits this long for its reply unless told otherwise.
DEFAULT_REQUEST_TIMEOUT_S: Final = 30.0
#: BLOCK of the reply reader's XREAD (short: ``close`` is prompt, a dead link is noticed).
REPLY_BLOCK_MS: Final = 1000
#: Caller ids and request ids: 1-64 of these characters (they become part of key names).
REPLY_ID_PATTERN: Final = r"[A-Za-z0-9_.-]{1,64}"

# --- limits and defaults --------------------------------------------------------------------
#: Largest encoded event we publish or accept (bytes). Bigger entries are dead-lettered.
DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024
#: Longest stream, group or consumer name we accept.
MAX_NAME_LENGTH: Final = 512
DEFAULT_BLOCK_MS: Final = 5000
#: Reference default: entries idle this long are considered abandoned by claim_abandoned_messages.
DEFAULT_CLAIM_MIN_IDLE_MS: Final = 300_000
DEFAULT_VISIBILITY_TIMEOUT_MS: Final = 30_000
DEFAULT_MAX_DELIVERIES: Final = 5
DEFAULT_CONCURRENCY: Final = 16
#: XAUTOCLAIM COUNT per call; the cursor is followed until it wraps to 0-0.
AUTOCLAIM_BATCH: Final = 100
DEFAULT_IDEMPOTENCY_WINDOW_S: Final = 24 * 3600

#: A blocking read must outlive its BLOCK time: the socket timeout is the block time plus this.
SOCKET_TIMEOUT_MARGIN_S: Final = 5.0
#: Default socket timeout for commands that do not block.
DEFAULT_SOCKET_TIMEOUT_S: Final = 10.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
#: Reconnect backoff: exponential from BASE, capped at CAP, full jitter.
RECONNECT_BACKOFF_BASE_S: Final = 0.05
RECONNECT_BACKOFF_CAP_S: Final = 5.0

# --- inspection, CLI and metrics ------------------------------------------------------------
#: Where the CLI and the examples look when no URL is given (never an embedded server).
DEFAULT_REDIS_URL: Final = "redis://localhost:6379"
#: SCAN COUNT hint when looking for streams (SCAN ... TYPE stream, never KEYS).
SCAN_BATCH: Final = 1000
#: Streams one inspection call (``agentstreams info``, a metrics scrape) examines at most, so a
#: server with millions of streams cannot turn one call into a flood of commands.
DEFAULT_INSPECT_MAX_STREAMS: Final = 1000
#: Per-command timeout of a metrics scrape; it is never retried.
METRICS_SOCKET_TIMEOUT_S: Final = 2.0
#: A whole scrape of the server's stats ends within this, well inside Prometheus' default 10 s
#: scrape timeout, also when the server is frozen or answers slowly.
METRICS_SCRAPE_TIMEOUT_S: Final = 5.0

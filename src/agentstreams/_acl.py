"""Least-privilege Redis ACL rules for each role of an agentstreams deployment.

``acl_rules(role, streams)`` returns one line of rules for
``ACL SETUSER <user> on ><password> <rules>``. The rules were found by running each role's real
operations as a user created from them (``tests/test_acl.py`` does so on Redis 7 and Valkey),
and reading ``ACL LOG`` for what was denied:

* keys: only the named streams' own keys, the stream ``S`` and its side keys ``{S}:*`` (the
  dead-letter stream ``{S}:dlq``, idempotency keys ``{S}:idem:<key>``); read (``%R~``) or
  write (``%W~``) only where one is enough. ACLs also apply to the keys a server-side script
  touches, so the scripts' keys are covered too.
* commands: listed one by one after ``-@all`` (never ``@all`` or a category); container
  commands by subcommand (``xinfo|stream``, ``xgroup|create``).
* Redis 7 selectors ``(...)`` grant a command on some keys only: a worker may XADD to its
  dead-letter stream (inside the dead-letter script) but not to the stream it consumes.

Scripts run as redis-py ``Script`` objects: ``EVALSHA``, then ``SCRIPT LOAD`` when the server
answers NOSCRIPT (after a restart or ``SCRIPT FLUSH``); ``trim`` runs one with ``EVAL``. A
user allowed EVAL can only make a script run the commands, on the keys, it is allowed itself.

ACL rules cannot restrict arguments: a producer allowed XADD can still ``XADD S MAXLEN 0 *``
and so empty the stream; a worker allowed XACK can acknowledge entries it never handled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from agentstreams._streams import side_key
from agentstreams.errors import InvalidArgumentError

__all__ = ["ROLES", "Role", "acl_rules", "key_patterns", "role_summary"]

Role = Literal["producer", "worker", "observer", "operator", "agent-worker", "agent-client"]
ROLES: Final[tuple[str, ...]] = get_args(Role)

#: What every client sends on its own: health checks (PING) and its name (CLIENT SETNAME).
#: redis-py also sends CLIENT SETINFO at connect and ignores a refusal; it is not granted
#: because Redis 7.0 does not know the command and would refuse the whole rule (on Redis 7.2+
#: and Valkey each connection leaves a ``client|setinfo`` entry in ACL LOG; append
#: ``+client|setinfo`` there to keep the log for denials that matter).
CONNECTION: Final = ("ping", "client|setname")
#: redis-py ``Script`` objects: EVALSHA, and SCRIPT LOAD after NOSCRIPT; EVAL for one-offs.
SCRIPTS: Final = ("evalsha", "eval", "script|load")
#: Transactions (``publish_many``, the dead-letter fallback, the agents' status writes).
TRANSACTIONS: Final = ("multi", "exec")

#: Read-only commands the observer needs on a stream and its side keys (info, tail, pending,
#: metrics, dlq list/show). XREADGROUP is not among them: it works with read permission alone
#: but moves a group, so the observer is denied the command itself.
OBSERVE: Final = ("type", "xlen", "xrange", "xrevrange", "xread", "xpending", "xinfo|stream",
                  "xinfo|groups", "xinfo|consumers", "time")
#: Consuming with a group: read, acknowledge, claim (retries, reclaiming, lease renewal),
#: and remove idle consumers (inside a script).
CONSUME: Final = ("xgroup|create", "xreadgroup", "xack", "xclaim", "xautoclaim", "xpending",
                  "xinfo|consumers", "xgroup|delconsumer")
#: Publishing: XADD; the idempotent publish reads and sets ``{S}:idem:<key>`` in a script.
PUBLISH: Final = ("xadd",)
IDEMPOTENCY: Final = ("get", "set")
#: request(): the caller reads its reply stream ``{S}:replies:<caller>``, deletes what it
#: read, and deletes the stream when it closes.
REQUEST: Final = ("xread", "xdel", "del")

_GLOB_SPECIAL: Final = frozenset("*?[]\\")


@dataclass(frozen=True, slots=True)
class _Grant:
    """Commands on key patterns with one permission (``~`` all, ``%R~`` read, ``%W~`` write)."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]
    perm: str = "~"


def _escape(name: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in name)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{kind} must be a non-empty name")
    if any(c.isspace() for c in name) or any(c in name for c in "()"):
        raise InvalidArgumentError(f"{kind} {name!r} contains white space or parentheses, "
                                   "which ACL rules cannot hold")
    return name


def key_patterns(stream: str) -> tuple[str, str]:
    """ACL key patterns of a stream's own keys: the stream and its side keys ``{S}:*``."""
    _check_name("stream", stream)
    return _escape(stream), _escape(side_key(stream, "")) + "*"


def _side(stream: str, suffix: str) -> str:
    return _escape(side_key(stream, suffix))


def _side_glob(stream: str, prefix: str) -> str:
    """Side keys ``{S}:<prefix>*`` (e.g. every idempotency key of ``S``)."""
    return _escape(side_key(stream, prefix)) + "*"


def _producer(streams: Sequence[str]) -> list[_Grant]:
    return [
        _Grant((*PUBLISH, *TRANSACTIONS), tuple(_escape(s) for s in streams), "%W~"),
        # The idempotent publish: one script (KEYS: S and {S}:idem:<key>) that GETs and SETs
        # the idempotency key and XADDs to S. The script's keys must fit one selector; GET
        # and SET get their own, on the idempotency keys only (SET on S would replace the
        # stream with a string).
        _Grant(SCRIPTS, tuple(k for s in streams for k in (_escape(s), _side_glob(s, "idem:")))),
        _Grant(IDEMPOTENCY, tuple(_side_glob(s, "idem:") for s in streams)),
        # request(): read, XDEL and finally DEL its own reply stream under {S}:replies:.
        _Grant(REQUEST, tuple(_side_glob(s, "replies:") for s in streams)),
    ]


def _worker(streams: Sequence[str]) -> list[_Grant]:
    return [
        # MULTI/EXEC: an entry with too many fields for the dead-letter script is moved in a
        # transaction instead (XADD to {S}:dlq + XACK).
        _Grant((*CONSUME, *SCRIPTS, *TRANSACTIONS),
               tuple(k for s in streams for k in (_escape(s), _side(s, "dlq")))),
        # Dead letters: XADD to {S}:dlq only (in the dead-letter script or a transaction).
        _Grant(PUBLISH, tuple(_side(s, "dlq") for s in streams), "%W~"),
        # event.reply(): an idempotent publish (a script: GET/SET of its idempotency key,
        # XADD) to a reply stream {S}:replies:<caller>, then PEXPIRE of that stream.
        _Grant((*SCRIPTS, *PUBLISH, "pexpire"),
               tuple(_side_glob(s, "replies:") for s in streams)),
        _Grant(IDEMPOTENCY, tuple(f"{_side_glob(s, 'replies:')}:idem:*" for s in streams)),
    ]


def _observer(streams: Sequence[str]) -> list[_Grant]:
    return [_Grant(OBSERVE, tuple(k for s in streams for k in key_patterns(s)), "%R~")]


def _operator(streams: Sequence[str]) -> list[_Grant]:
    keys = tuple(k for s in streams for k in key_patterns(s))
    return [
        *_observer(streams),
        # claim (XCLAIM ... JUSTID), trim (XTRIM after a script finds the cut), dlq replay (a
        # script: XDEL from {S}:dlq, XADD to S), dlq purge (XTRIM / XDEL on {S}:dlq).
        _Grant(("xclaim", "xtrim", "xdel", "xadd", "xinfo|groups", "xpending", *SCRIPTS),
               keys),
    ]


#: The agents' run status: a script over the run hash (HEXISTS, HGET, HSET, PEXPIRE), reads
#: of it, and the session pointer (GET, SET).
STATUS: Final = ("hget", "hgetall", "hexists", "hset", "pexpire", "get", "set")


@dataclass(frozen=True, slots=True)
class _AgentKeys:
    inboxes: str
    inbox_side: str  # "{<ns>:inbox:*}:" (a prefix: append a suffix glob)
    inbox_dlq: str
    events: str
    events_side: str
    replies: str
    replies_side: str
    runs: str
    sessions: str


def _agent_keys(namespace: str) -> _AgentKeys:
    from agentstreams.integrations.openai_agents._wire import Keys  # light module, no SDK

    _check_name("namespace", namespace)
    keys = Keys(namespace)
    ns = _escape(namespace)
    inbox = keys.inbox("")  # "<ns>:inbox:"
    replies = keys.replies("")
    return _AgentKeys(
        inboxes=_escape(inbox) + "*",
        inbox_side="{" + _escape(inbox) + "*}:",
        inbox_dlq="{" + _escape(inbox) + "*}:dlq",
        events=_escape(keys.events),
        events_side=_escape(side_key(keys.events, "")),
        replies=_escape(replies) + "*",
        replies_side="{" + _escape(replies) + "*}:",
        runs=f"{ns}:run:*",
        sessions=f"{ns}:session:*",
    )


def _publish_to_patterns(streams: Sequence[str], sides: Sequence[str]) -> list[_Grant]:
    """Publishing (plain, batched, idempotent) to streams given as patterns; ``sides`` are the
    matching side-key prefixes (``{<pattern>}:``)."""
    idem = tuple(f"{p}idem:*" for p in sides)
    return [
        _Grant((*PUBLISH, *TRANSACTIONS), tuple(streams), "%W~"),
        _Grant(SCRIPTS, (*streams, *idem)),
        _Grant(IDEMPOTENCY, idem),
    ]


def _agent_worker(namespace: str) -> list[_Grant]:
    k = _agent_keys(namespace)
    return [
        # Consume the inboxes (and dead-letter into their {inbox}:dlq).
        _Grant((*CONSUME, *SCRIPTS, *TRANSACTIONS), (k.inboxes, k.inbox_dlq)),
        _Grant(PUBLISH, (k.inbox_dlq,), "%W~"),
        # Hand off to any agent's inbox, publish lifecycle events, answer the client.
        *_publish_to_patterns((k.inboxes, k.events, k.replies),
                              (k.inbox_side, k.events_side, k.replies_side)),
        _Grant(("expire",), (k.replies,), "%W~"),
        # Run status (a script over the run hash) and the session pointer.
        _Grant((*SCRIPTS, *TRANSACTIONS, *STATUS), (k.runs, k.sessions)),
    ]


def _agent_client(namespace: str) -> list[_Grant]:
    k = _agent_keys(namespace)
    return [
        # Its own reply stream: read, delete what it read, remove it on close.
        _Grant(("xread", "xdel", "del"), (k.replies,)),
        # Tasks to the inboxes (idempotent), "offered" to the lifecycle event stream.
        _Grant((*PUBLISH, *TRANSACTIONS), (k.inboxes, k.events), "%W~"),
        _Grant(SCRIPTS, (k.inboxes, f"{k.inbox_side}idem:*")),
        _Grant(IDEMPOTENCY, (f"{k.inbox_side}idem:*",)),
        # A new run: its status hash and session pointer in one transaction; then reads.
        _Grant((*SCRIPTS, *TRANSACTIONS, *STATUS), (k.runs, k.sessions)),
    ]


def _render(grants: Iterable[_Grant], extra: Sequence[str] = ()) -> str:
    """Root rules: every command and key of the first grant plus the connection commands;
    every further grant becomes a selector ``(keys commands)`` unless it fits the root."""
    grants = list(grants)
    root, *others = grants
    parts = ["-@all", "resetkeys", "resetchannels", "clearselectors"]
    parts += [f"{root.perm}{k}" for k in root.keys]
    parts += [f"+{c}" for c in dict.fromkeys((*root.commands, *CONNECTION, *extra))]
    for grant in others:
        inner = [f"{grant.perm}{k}" for k in grant.keys] + [f"+{c}" for c in grant.commands]
        parts.append("(" + " ".join(inner) + ")")
    return " ".join(parts)


def acl_rules(role: Role | str, streams: Sequence[str] = (), *,
              publish_to: Sequence[str] = (), namespace: str | None = None,
              scan: bool = False) -> str:
    """The ACL rules of ``role`` on ``streams``: one line for ``ACL SETUSER u on >pw <rules>``.

    ``publish_to`` (worker only) adds publishing to other streams (handoffs); ``namespace``
    (agent roles only, default ``agents``) names the agents deployment. ``scan`` (observer,
    operator) adds SCAN, so ``agentstreams info`` and the exporter can list streams without
    being told their names: SCAN shows every key name in the database.
    """
    if role not in ROLES:
        raise InvalidArgumentError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    streams = list(dict.fromkeys(_check_name("stream", s) for s in streams))
    publish_to = list(dict.fromkeys(_check_name("stream", s) for s in publish_to))
    agent_role = role in ("agent-worker", "agent-client")
    if agent_role:
        if streams or publish_to:
            raise InvalidArgumentError(f"role {role!r} takes --namespace, not --stream or "
                                       "--publish-to (its keys follow from the namespace)")
    else:
        if namespace is not None:
            raise InvalidArgumentError(f"--namespace is for the agent roles, not {role!r}")
        if not streams:
            raise InvalidArgumentError(f"role {role!r} needs at least one --stream")
    if publish_to and role != "worker":
        raise InvalidArgumentError("--publish-to is for the worker role (a producer publishes "
                                   "to its --stream)")
    if scan and role not in ("observer", "operator"):
        raise InvalidArgumentError("--scan is for the observer and operator roles")
    if role == "producer":
        grants = _producer(streams)
    elif role == "worker":
        grants = _worker(streams) + (_producer(publish_to) if publish_to else [])
    elif role == "observer":
        grants = _observer(streams)
    elif role == "operator":
        grants = _operator(streams)
    elif role == "agent-worker":
        grants = _agent_worker(namespace or "agents")
    else:
        grants = _agent_client(namespace or "agents")
    return _render(grants, ("scan",) if scan else ())


_SUMMARIES: Final[dict[str, str]] = {
    "producer": "publish to the streams (XADD, publish_many, idempotent publish); nothing else",
    "worker": "consume with a group: read, ack, claim, retry, dead-letter, renew leases, remove "
              "idle consumers; publish only to --publish-to streams",
    "observer": "read-only: info, tail, pending, dlq list/show, the metrics exporter; "
                "no XREADGROUP",
    "operator": "observer + claim, dlq replay/purge, trim",
    "agent-worker": "AgentWorker: consume inboxes, hand off, publish lifecycle events, reply, "
                    "update run status",
    "agent-client": "AgentClient: send tasks to inboxes, read its replies and run status",
}


def role_summary(role: str) -> str:
    """One sentence: what the role may do."""
    return _SUMMARIES[role]

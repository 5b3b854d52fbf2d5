"""``agentstreams acl ROLE``: the least-privilege ACL rules of a role, ready for ACL SETUSER.

It never connects: the rules follow from the role and the names given (see
``agentstreams._acl`` for how they were found and ``docs/security.md`` for the threat model).
"""

from __future__ import annotations

from typing import Annotated

import typer

from agentstreams._acl import ROLES, acl_rules, role_summary
from agentstreams.cli._common import JsonOption, emit_json, usage_error
from agentstreams.errors import InvalidArgumentError

__all__ = ["acl_command"]


def acl_command(
    role: Annotated[str, typer.Argument(
        help=f"One of: {', '.join(ROLES)}.", show_default=False)],
    streams: Annotated[list[str] | None, typer.Option(
        "--stream", help="Stream the role works on (repeatable; not for the agent roles).")
    ] = None,
    publish_to: Annotated[list[str] | None, typer.Option(
        "--publish-to", help="worker: also publish to this stream (repeatable; handoffs).")
    ] = None,
    namespace: Annotated[str | None, typer.Option(
        "--namespace", help="agent-worker / agent-client: the agents namespace "
                            "(default 'agents').")] = None,
    scan: Annotated[bool, typer.Option(
        "--scan", help="observer / operator: also allow SCAN, so `info` and `metrics` can "
                       "list streams unnamed (SCAN reveals every key name).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Print the ACL rules of a role, for: ACL SETUSER <user> on ><password> <rules>."""
    try:
        rules = acl_rules(role, streams or [], publish_to=publish_to or [],
                          namespace=namespace, scan=scan)
    except InvalidArgumentError as exc:
        usage_error(str(exc), as_json)
    if as_json:
        emit_json({"role": role, "streams": list(streams or []),
                   "publish_to": list(publish_to or []),
                   "namespace": (namespace or "agents") if role.startswith("agent-") else None,
                   "scan": scan, "summary": role_summary(role), "rules": rules,
                   "command": f"ACL SETUSER <user> on ><password> {rules}"})
        return
    # Plain print: the rules must come out as one line whatever the terminal width.
    typer.echo(rules)

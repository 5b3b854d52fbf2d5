"""What every operator command shares: the connection options, output, errors and exit codes.

Commands are synchronous Typer functions that run one coroutine with ``run()``; it connects,
checks the server answers, and turns every failure into a one-line message and an exit code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, quote

import redis.exceptions as redis_exc
import typer
from rich.console import Console
from rich.text import Text

from agentstreams._connection import (
    ConnectionSettings,
    Redis,
    call,
    create_client,
    redact_url,
    translate_error,
)
from agentstreams._constants import DEFAULT_REDIS_URL
from agentstreams._streams import first_field, stream_id_key, to_str
from agentstreams.errors import (
    AgentStreamsError,
    AuthenticationError,
    ConfigurationError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    PermissionDeniedError,
    TLSError,
    WrongTypeError,
)

__all__ = [
    "DEFAULT_REDIS_URL",
    "ExitCode",
    "JsonOption",
    "RedisUrlOption",
    "age_ms_of",
    "count_of",
    "emit_json",
    "entry_ms",
    "err",
    "fail",
    "format_age",
    "format_time",
    "is_stream_id",
    "key_type",
    "now_ms",
    "out",
    "require_group",
    "require_stream",
    "run",
    "usage_error",
    "with_tls",
    "with_tls_options",
]

T = TypeVar("T")

logger = logging.getLogger("agentstreams.cli")

#: Operator commands should fail fast when the server is down, not wait out the library default.
CLI_CONNECT_TIMEOUT_S = 3.0
#: Rich wraps tables at 80 columns when output is not a terminal; logs and pipes want whole rows.
NON_TERMINAL_WIDTH = 200


class ExitCode(IntEnum):
    """Exit statuses scripts can rely on."""

    OK = 0
    #: Anything else that went wrong (the server refused a command, an unexpected error).
    FAILURE = 1
    #: Bad usage: an invalid option value or a combination that makes no sense (as click does).
    USAGE = 2
    #: The server cannot be reached (refused the connection, timed out, went away).
    UNREACHABLE = 3
    #: The stream, the consumer group or the dead letter named does not exist.
    NOT_FOUND = 4
    #: The key exists but holds something other than a stream.
    WRONG_TYPE = 5
    #: The server's ACL denies this user a command or a key (NOPERM): grant it, or use
    #: another user (``agentstreams acl`` prints each role's rules).
    PERMISSION_DENIED = 6
    #: The server refused the user name or password, or wants one and got none.
    AUTHENTICATION = 7
    #: TLS failed: a certificate check (wrong CA, hostname, client certificate refused), or
    #: rediss:// against a plain-text port (or redis:// against a TLS one).
    TLS = 8
    #: Another misconfiguration retrying cannot fix (``ConfigurationError``).
    CONFIGURATION = 9


class CliError(Exception):
    """A failure the operator can act on: printed as one line, then exit with ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


RedisUrlOption = Annotated[
    str,
    typer.Option("--redis-url", envvar="REDIS_URL", show_envvar=True,
                 help="Server to inspect: redis://, rediss:// or unix:// URL."),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print JSON for scripts instead of tables."),
]


#: The TLS options every command takes: (parameter, option, environment variable, URL query
#: parameter redis-py passes to the connection, help).
_TLS_OPTIONS: tuple[tuple[str, str, str, str, str], ...] = (
    ("tls_ca_certs", "--tls-ca-certs", "REDIS_TLS_CA_CERTS", "ssl_ca_certs",
     "CA certificate(s) (PEM) to check the server's certificate with."),
    ("tls_certfile", "--tls-certfile", "REDIS_TLS_CERTFILE", "ssl_certfile",
     "Client certificate (PEM), for servers with tls-auth-clients."),
    ("tls_keyfile", "--tls-keyfile", "REDIS_TLS_KEYFILE", "ssl_keyfile",
     "Private key (PEM) of the client certificate."),
    ("tls_cert_reqs", "--tls-cert-reqs", "REDIS_TLS_CERT_REQS", "ssl_cert_reqs",
     "Check the server's certificate: required (default), optional or none (insecure)."),
)
_CERT_REQS = ("required", "optional", "none")


def with_tls(url: str, *, ca_certs: str | None = None, certfile: str | None = None,
             keyfile: str | None = None, cert_reqs: str | None = None,
             check_hostname: bool | None = None) -> str:
    """``url`` with the TLS settings given as redis-py query parameters (``ssl_ca_certs=...``).

    A setting given here replaces the same parameter in the URL. Raises InvalidArgumentError
    for TLS settings on a URL that is not ``rediss://``, a file that does not exist, or a key
    without its certificate.
    """
    options = {"ssl_ca_certs": ca_certs, "ssl_certfile": certfile, "ssl_keyfile": keyfile,
               "ssl_cert_reqs": cert_reqs,
               "ssl_check_hostname": None if check_hostname is None
               else ("true" if check_hostname else "false")}
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return url
    if not url.lower().startswith("rediss://"):
        raise InvalidArgumentError(
            f"TLS options need a rediss:// URL, not {redact_url(url)!r}")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in given and not Path(given[name]).is_file():
            option = "--tls-" + name.removeprefix("ssl_").replace("_", "-")
            raise InvalidArgumentError(f"{option}: no such file {given[name]!r}")
    if "ssl_cert_reqs" in given and given["ssl_cert_reqs"] not in _CERT_REQS:
        raise InvalidArgumentError(f"--tls-cert-reqs must be one of {', '.join(_CERT_REQS)}, "
                                   f"not {given['ssl_cert_reqs']!r}")
    if "ssl_keyfile" in given and "ssl_certfile" not in given and "ssl_certfile=" not in url:
        raise InvalidArgumentError("--tls-keyfile needs --tls-certfile (the certificate of the "
                                   "key)")
    head, _, rest = url.partition("?")
    query, hash_mark, fragment = rest.partition("#")
    kept = [item for item in query.split("&") if item
            and parse_qsl(item, keep_blank_values=True)[0][0] not in given] if query else []
    added = [f"{k}={quote(v, safe='/:')}" for k, v in given.items()]
    return f"{head}?{'&'.join(kept + added)}" + (f"#{fragment}" if hash_mark else "")


def with_tls_options(command: Callable[..., T]) -> Callable[..., T]:
    """Give a command the TLS options (``--tls-ca-certs`` ...): they are folded into its
    ``redis_url`` as query parameters, so every way of connecting sees them."""
    signature = inspect.signature(command, eval_str=True)
    names = [spec[0] for spec in _TLS_OPTIONS] + ["tls_check_hostname"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            str | None, typer.Option(option, envvar=env, show_envvar=True, help=text,
                                     rich_help_panel="TLS")])
        for name, option, env, _param, text in _TLS_OPTIONS
    ]
    extra.append(inspect.Parameter(
        "tls_check_hostname", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[bool | None, typer.Option(
            "--tls-check-hostname/--tls-no-check-hostname", envvar="REDIS_TLS_CHECK_HOSTNAME",
            show_envvar=True, rich_help_panel="TLS",
            help="Check that the server's certificate names the host of the URL (default: "
                 "yes; with --tls-cert-reqs none: no).")]))

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        tls = {name: kwargs.pop(name, None) for name in names}
        url = kwargs.get("redis_url")
        if any(v is not None for v in tls.values()):
            as_json = bool(kwargs.get("as_json", False))
            if url is None:
                usage_error("TLS options need --redis-url (or REDIS_URL) with a rediss:// URL",
                            as_json)
            try:
                kwargs["redis_url"] = with_tls(
                    url, ca_certs=tls["tls_ca_certs"], certfile=tls["tls_certfile"],
                    keyfile=tls["tls_keyfile"], cert_reqs=tls["tls_cert_reqs"],
                    check_hostname=tls["tls_check_hostname"])
            except InvalidArgumentError as exc:
                usage_error(str(exc), as_json)
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra])
    return wrapper


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else NON_TERMINAL_WIDTH
    return Console(file=stream, width=width, soft_wrap=False, highlight=False)


#: Human output (tables, lines) on stdout; notices and errors on stderr.
out = _console(stderr=False)
err = _console(stderr=True)


def emit_json(data: Any, *, lines: bool = False) -> None:
    """Write ``data`` as JSON to stdout: indented, or one compact line (``lines``, for tail)."""
    text = json.dumps(data, ensure_ascii=False, default=str, indent=None if lines else 2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fail(message: str, code: ExitCode) -> NoReturn:
    """Stop the command with a message and an exit code."""
    raise CliError(message, code)


# ------------------------------------------------------------------------- time and ids


def now_ms() -> int:
    """Wall-clock time in milliseconds (stream ids use the server's clock in the same unit)."""
    return int(time.time() * 1000)


def entry_ms(msg_id: str | bytes | None) -> int | None:
    """The millisecond part of a stream id (when the entry was added), or None."""
    if not msg_id:
        return None
    try:
        return stream_id_key(to_str(msg_id))[0]
    except ValueError:
        return None


def age_ms_of(msg_id: str | bytes | None) -> int | None:
    """How long ago the entry with this id was added (never negative)."""
    added = entry_ms(msg_id)
    return None if added is None else max(0, now_ms() - added)


def format_age(ms: int | float | None) -> str:
    """A short human duration: ``850ms``, ``42s``, ``3m05s``, ``2h10m``, ``4d03h``."""
    if ms is None:
        return "-"
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(ms: int | float | None) -> str:
    """A UTC timestamp with milliseconds, e.g. ``2025-11-26 01:02:03.123Z``."""
    if ms is None:
        return "-"
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{int(ms) % 1000:03d}Z"


def is_stream_id(value: str) -> bool:
    """True for ``ms`` or ``ms-seq`` (what XRANGE and XCLAIM accept as an id)."""
    ms, sep, seq = value.partition("-")
    return ms.isdigit() and (not sep or seq.isdigit())


def usage_error(message: str, as_json: bool) -> NoReturn:
    """Reject bad options before connecting (exit status 2, like click's own usage errors)."""
    report_error(message, ExitCode.USAGE, as_json)


# ------------------------------------------------------------------------- server checks


async def key_type(client: Redis, key: str) -> str:
    """The type of ``key`` (``none`` when it does not exist)."""
    return to_str(await call(lambda: client.type(key), stream=key))


async def require_stream(client: Redis, stream: str) -> None:
    """Fail with NOT_FOUND or WRONG_TYPE unless ``stream`` is an existing stream."""
    kind = await key_type(client, stream)
    if kind == "none":
        fail(f"stream {stream!r} does not exist (run `agentstreams info` to list streams)",
             ExitCode.NOT_FOUND)
    if kind != "stream":
        fail(f"key {stream!r} holds a {kind}, not a stream", ExitCode.WRONG_TYPE)


async def group_names(client: Redis, stream: str) -> list[str]:
    """Names of the consumer groups of ``stream``."""
    groups = await call(lambda: client.xinfo_groups(stream), stream=stream)
    return [to_str(first_field(g, "name")) for g in groups]


async def require_group(client: Redis, stream: str, group: str) -> None:
    """Fail with NOT_FOUND unless ``stream`` exists and has ``group``."""
    await require_stream(client, stream)
    names = await group_names(client, stream)
    if group not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        fail(f"consumer group {group!r} does not exist on stream {stream!r} "
             f"(its groups: {known})", ExitCode.NOT_FOUND)


# ------------------------------------------------------------------------- running a command


def _setup_logging() -> None:
    """Library warnings (e.g. entries lost to a trim) go to stderr; nothing else is chatty."""
    root = logging.getLogger("agentstreams")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def _not_redis(exc: BaseException) -> bool:
    """A reply that is not RESP: something other than Redis answers at that port."""
    return isinstance(exc, redis_exc.InvalidResponse) or (
        isinstance(exc, redis_exc.RedisError) and "protocol error" in str(exc).lower())


def _not_redis_hint(exc: BaseException) -> str:
    text = str(exc)
    if '"H"' in text or "'H'" in text:
        return "its answer starts like HTTP, so this is likely a web server or an HTTP proxy"
    return "likely another kind of server (a database, a proxy, a TLS port) listens there"


async def _connect(url: str) -> Redis:
    """A bytes-mode client that has answered PING."""
    settings = ConnectionSettings(url=url, connect_timeout_s=CLI_CONNECT_TIMEOUT_S,
                                  client_name="agentstreams-cli", command_retries=1)
    client = create_client(settings)
    try:
        await client.ping()
    except (redis_exc.RedisError, OSError) as exc:
        await client.aclose()
        if _not_redis(exc):
            fail(f"the service at {redact_url(url)} does not speak the Redis protocol ({exc}); "
                 f"{_not_redis_hint(exc)}: check the host and port of --redis-url or REDIS_URL",
                 ExitCode.UNREACHABLE)
        error = translate_error(exc)
        if isinstance(error, ConnectionLostError):
            hint = "check --redis-url or REDIS_URL and that the server is running"
            if "reset by peer" in str(exc):
                # What a TLS port does to plain text, and a server with tls-auth-clients to a
                # client without a certificate: accept, then reset at the first bytes.
                hint = ("a reset at the first command often means a TLS port addressed with "
                        "redis:// (use rediss://) or a server that wants a client certificate "
                        "(--tls-certfile, --tls-keyfile); else " + hint)
            fail(f"cannot reach the server at {redact_url(url)} ({exc}); {hint}",
                 ExitCode.UNREACHABLE)
        if isinstance(error, AuthenticationError):
            fail(f"the server at {redact_url(url)} refused our credentials ({exc}); put the "
                 "user and password in the URL: redis://user:password@host:port",
                 ExitCode.AUTHENTICATION)
        if isinstance(error, TLSError):
            fail(f"TLS with the server at {redact_url(url)} failed ({exc}); check the CA "
                 "(--tls-ca-certs), the client certificate (--tls-certfile, --tls-keyfile) and "
                 "that rediss:// points at a TLS port (redis:// at a plain one)", ExitCode.TLS)
        raise error from exc
    return client


def _is_denial(exc: BaseException) -> bool:
    """A denial translate_error may not recognise: Valkey's in-script wording
    ("ACL failure in script: No permissions to access a key")."""
    text = str(exc).lower()
    return isinstance(exc, redis_exc.ResponseError) and (
        "no permissions" in text or "acl failure" in text)


def _exit_code_for(exc: BaseException) -> tuple[str, ExitCode]:
    if isinstance(exc, CliError):
        return exc.message, exc.code
    if _not_redis(exc):
        return (f"the server's answer is not the Redis protocol ({exc}); "
                f"{_not_redis_hint(exc)}", ExitCode.UNREACHABLE)
    if isinstance(exc, redis_exc.RedisError | OSError) and not isinstance(exc, AgentStreamsError):
        exc = translate_error(exc)
    if isinstance(exc, PermissionDeniedError) or _is_denial(exc):
        command = getattr(exc, "command", None)
        stream = getattr(exc, "stream", None)
        what = (f" ({command})" if command else "") + (f" on {stream!r}" if stream else "")
        return f"permission denied{what}: {exc}", ExitCode.PERMISSION_DENIED
    if isinstance(exc, AuthenticationError):
        return f"authentication failed: {exc}", ExitCode.AUTHENTICATION
    if isinstance(exc, TLSError):
        return f"TLS failed: {exc}", ExitCode.TLS
    if isinstance(exc, ConfigurationError):
        return f"misconfigured: {exc}", ExitCode.CONFIGURATION
    if isinstance(exc, InvalidArgumentError):
        return str(exc), ExitCode.USAGE
    if isinstance(exc, ConnectionLostError | redis_exc.ConnectionError | redis_exc.TimeoutError):
        return f"lost the connection to the server: {exc}", ExitCode.UNREACHABLE
    if isinstance(exc, GroupNotFoundError):
        return str(exc), ExitCode.NOT_FOUND
    if isinstance(exc, WrongTypeError):
        return str(exc), ExitCode.WRONG_TYPE
    if isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return f"a key holds a value that is not a stream ({exc})", ExitCode.WRONG_TYPE
    if isinstance(exc, AgentStreamsError | redis_exc.RedisError):
        return str(exc), ExitCode.FAILURE
    return f"unexpected error: {type(exc).__name__}: {exc}", ExitCode.FAILURE


def report_error(message: str, code: ExitCode, as_json: bool) -> NoReturn:
    """Print the error (a JSON object on stderr with ``--json``) and exit with ``code``."""
    if as_json:
        sys.stderr.write(json.dumps({"error": message, "exit_code": int(code)}) + "\n")
    else:
        err.print(Text.assemble(("error: ", "bold red"), message))  # no markup in messages
    raise typer.Exit(int(code))


def run(url: str, as_json: bool, command: Callable[[Redis], Awaitable[T]]) -> T:
    """Connect to ``url``, await ``command(client)``, close; map failures to exit codes.

    Ctrl-C ends the command quietly with status 0 (it is how ``tail`` is stopped).
    """
    _setup_logging()

    async def main() -> T:
        client = await _connect(url)
        try:
            return await command(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.OK)) from None
    except BrokenPipeError:
        # The reader went away (`agentstreams tail s | head`): stop quietly, like coreutils.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(int(ExitCode.OK)) from None
    except typer.Exit:
        raise
    except Exception as exc:
        message, code = _exit_code_for(exc)
        if code == ExitCode.FAILURE and not isinstance(exc, CliError | AgentStreamsError):
            logger.debug("command failed", exc_info=exc)
        report_error(message, code, as_json)


def count_of(n: int, singular: str, plural: str | None = None) -> str:
    """``1 entry``, ``3 entries``: a number with its noun."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"

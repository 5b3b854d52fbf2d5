"""The CLI against a locked-down server: mutual TLS, ACL users, wrong credentials.

A real ``redis-server`` with a TLS port that demands client certificates (``tls-auth-clients
yes``; certificates made with ``openssl`` here) and ACL users made from ``agentstreams acl``:
every command takes the TLS settings as URL parameters, as options and from the environment;
a denied command, a wrong password and a wrong CA each end with one line and their own exit
code, never a traceback; and no output at any exit code contains the password.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentstreams._acl import acl_rules
from agentstreams._streams import dlq_key
from agentstreams.server import LocalServer, find_free_port
from test_cli import CLI, CLI_TIMEOUT_S, Result, cli

pytestmark = pytest.mark.slow

#: The password of every ACL user made here; no CLI output may contain it.
SECRET = "Tls-s3cret-9b2e"
#: A misconfigured connection must fail well inside this (the CLI's connect timeout is 3 s).
FAIL_FAST_S = 8.0


@dataclass(frozen=True)
class Tls:
    server: LocalServer
    tls_port: int
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path

    def url(self, user: str | None = None, host: str = "localhost") -> str:
        auth = f"{user}:{SECRET}@" if user else ""
        return f"rediss://{auth}{host}:{self.tls_port}"

    def params(self, ca: Path | None = None) -> str:
        return (f"ssl_ca_certs={ca or self.ca}&ssl_certfile={self.client_cert}"
                f"&ssl_keyfile={self.client_key}")

    def options(self, ca: Path | None = None) -> list[str]:
        return ["--tls-ca-certs", str(ca or self.ca), "--tls-certfile", str(self.client_cert),
                "--tls-keyfile", str(self.client_key)]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}")
    return key, cert


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, ext: str | None) -> tuple[
        Path, Path]:
    key, csr, cert = (directory / f"{name}.key", directory / f"{name}.csr",
                      directory / f"{name}.crt")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
             f"/CN={name}")
    extra: list[str | Path] = []
    if ext is not None:
        ext_file = directory / f"{name}.ext"
        ext_file.write_text(ext + "\n")
        extra = ["-extfile", ext_file]
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", *extra)
    return key, cert


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and redis-server")
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="agentstreams-cli-tls-"))
    ca_key, ca = _make_ca(directory, "test-ca")
    _other_key, other_ca = _make_ca(directory, "other-ca")
    # The server's certificate names localhost only: 127.0.0.1 fails the hostname check.
    server_key, server_cert = _signed(directory, "server", ca, ca_key,
                                      "subjectAltName=DNS:localhost")
    client_key, client_cert = _signed(directory, "client", ca, ca_key, None)
    tls_port = find_free_port()
    server = LocalServer("redis", extra_config={
        "tls-port": str(tls_port), "tls-cert-file": str(server_cert),
        "tls-key-file": str(server_key), "tls-ca-cert-file": str(ca),
        "tls-auth-clients": "yes"})
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield Tls(server, tls_port, ca, other_ca, client_cert, client_key)
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Setup:
    tls: Tls
    admin: aioredis.Redis
    stream: str
    users: dict[str, str]


@pytest.fixture
async def setup(tls: Tls) -> AsyncIterator[Setup]:
    """A stream with a group, a pending entry and a dead letter; an observer and an operator."""
    admin = aioredis.Redis.from_url(tls.server.url)
    stream = f"sec-{uuid.uuid4().hex[:8]}"
    await admin.xgroup_create(stream, "g", id="0", mkstream=True)
    await admin.xadd(stream, {"type": "task", "n": "1"})
    await admin.xreadgroup("g", "ghost", {stream: ">"}, count=1)
    await admin.xadd(dlq_key(stream), {"original_stream": stream, "original_id": "1-1",
                                       "group": "g", "reason": "rejected", "type": "task"})
    await admin.set(f"{stream}:str", "x")
    users: dict[str, str] = {}
    for role in ("observer", "operator"):
        name = f"{role}-{uuid.uuid4().hex[:6]}"
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", name, "on", f">{SECRET}",
            *acl_rules(role, [stream, f"{stream}:str"]).split())
        users[role] = name
    yield Setup(tls, admin, stream, users)
    for name in users.values():
        await admin.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]
    await admin.delete(stream, dlq_key(stream), f"{stream}:str")
    await admin.aclose()


def _clean(result: Result) -> None:
    """No traceback, and not the password, in anything the CLI printed."""
    assert "Traceback" not in result.err, result.err
    assert SECRET not in result.out + result.err, result.out + result.err


async def _timed(*args: str, url: str | None, env: dict[str, str] | None = None) -> Result:
    started = time.monotonic()
    result = await cli_env(*args, url=url, env=env)
    assert time.monotonic() - started < FAIL_FAST_S, args
    return result


async def cli_env(*args: str, url: str | None, env: dict[str, str] | None = None) -> Result:
    """``cli`` with extra environment variables for the subprocess."""
    command = [*CLI, *args] + (["--redis-url", url] if url is not None else [])
    full_env = {k: v for k, v in os.environ.items()
                if k != "REDIS_URL" and not k.startswith("REDIS_TLS_")} | (env or {})
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(args)} did not finish within {CLI_TIMEOUT_S}s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


# ------------------------------------------------------------------------------ TLS


async def test_every_command_works_over_mutual_tls(setup: Setup) -> None:
    tls, stream = setup.tls, setup.stream
    url = tls.url(setup.users["operator"])
    in_url = f"{url}?{tls.params()}"
    results = await asyncio.gather(
        cli("info", stream, "--json", url=in_url),
        cli("info", stream, "--json", *tls.options(), url=url),
        cli("pending", stream, "g", "--json", *tls.options(), url=url),
        cli("tail", stream, "--from", "0", "--count", "1", "--json", *tls.options(), url=url),
        cli("dlq", "list", stream, "--json", *tls.options(), url=url),
        cli("claim", stream, "g", "c2", "--min-idle-ms", "0", "--json", *tls.options(),
            url=url),
        cli("trim", stream, "--maxlen", "5", "--json", *tls.options(), url=url),
        # The address with the hostname check off.
        cli("info", stream, "--json", *tls.options(), "--tls-no-check-hostname",
            url=tls.url(setup.users["operator"], "127.0.0.1")),
        cli("metrics", "--port", "0", "--duration-s", "0", "--stream", stream, *tls.options(),
            url=url))
    for result in results:
        assert result.code == 0, result.err
        _clean(result)
    assert results[0].json()["groups"][0]["pending"] == 1
    assert results[1].json()["length"] == results[0].json()["length"] == 1
    assert results[5].json()["claimed"]


async def test_tls_settings_come_from_the_environment(setup: Setup) -> None:
    tls = setup.tls
    env = {"REDIS_TLS_CA_CERTS": str(tls.ca), "REDIS_TLS_CERTFILE": str(tls.client_cert),
           "REDIS_TLS_KEYFILE": str(tls.client_key)}
    result = await cli_env("info", setup.stream, "--json",
                           url=tls.url(setup.users["observer"]), env=env)
    assert result.code == 0, result.err
    # An option overrides the environment: the wrong CA fails.
    wrong = await cli_env("info", setup.stream, "--tls-ca-certs", str(tls.other_ca),
                          url=tls.url(setup.users["observer"]), env=env)
    assert wrong.code == 8, wrong.err


async def test_tls_failures_exit_8_fast_with_the_cause(setup: Setup) -> None:
    tls, stream = setup.tls, setup.stream
    url = tls.url(setup.users["observer"])
    wrong_ca, no_ca, json_wrong_ca, plain_on_tls, hostname = await asyncio.gather(
        _timed("info", stream, *tls.options(tls.other_ca), url=url),
        _timed("info", stream, url=f"{url}?ssl_certfile={tls.client_cert}"
               f"&ssl_keyfile={tls.client_key}"),
        _timed("pending", stream, "g", "--json", url=f"{url}?{tls.params(tls.other_ca)}"),
        _timed("info", stream, url=f"redis://localhost:{tls.tls_port}"),
        # A name the certificate does not hold: the hostname check refuses it...
        _timed("info", stream, *tls.options(), url=url.replace("localhost", "127.0.0.1")))
    for result in (wrong_ca, no_ca, json_wrong_ca, hostname):
        assert result.code == 8, result.err
        assert "certificate verify failed" in result.err, result.err
        _clean(result)
    assert "TLS" in wrong_ca.err
    assert "mismatch" in hostname.err, hostname.err
    assert json_wrong_ca.error()["exit_code"] == 8
    assert json_wrong_ca.out == ""
    # redis:// on a TLS port: the server never answers in plain text.
    # redis:// on a TLS port: the server resets the connection; exit 3 with a hint.
    assert plain_on_tls.code == 3, plain_on_tls.err
    assert "rediss://" in plain_on_tls.err
    _clean(plain_on_tls)
    # ... unless it is turned off.
    unchecked = await _timed("info", stream, *tls.options(), "--tls-no-check-hostname",
                             url=url.replace("localhost", "127.0.0.1"))
    assert unchecked.code == 0, unchecked.err


async def test_a_missing_client_certificate_is_refused(setup: Setup) -> None:
    tls = setup.tls
    result = await _timed("info", setup.stream, "--tls-ca-certs", str(tls.ca),
                          url=tls.url(setup.users["observer"]))
    # TLS 1.3: the server checks the client's certificate after the handshake, then sends a
    # "certificate required" alert and closes. The client sees the alert (exit 8, TLS) or,
    # when the close wins the race, a reset (exit 3); both messages name the missing
    # client certificate.
    assert result.code in (3, 8), result.err
    assert "client certificate" in result.err
    _clean(result)


async def test_tls_options_are_checked_before_connecting(setup: Setup) -> None:
    tls = setup.tls
    plain = f"redis://u:{SECRET}@127.0.0.1:{find_free_port()}"
    results = await asyncio.gather(
        cli("info", "--tls-ca-certs", str(tls.ca), url=plain),
        cli("info", "--tls-ca-certs", "/nonexistent/ca.pem", url=tls.url("u")),
        cli("info", "--tls-cert-reqs", "sometimes", url=tls.url("u")),
        cli("info", "--tls-keyfile", str(tls.client_key), url=tls.url("u")),
        cli("tail", "s", "--tls-ca-certs", str(tls.ca), "--json", url=plain))
    assert [r.code for r in results] == [2] * len(results), [r.err for r in results]
    assert "rediss://" in results[0].err
    assert "no such file" in results[1].err
    assert "--tls-cert-reqs" in results[2].err
    assert "--tls-certfile" in results[3].err
    assert results[4].error()["exit_code"] == 2
    for result in results:
        _clean(result)


# ------------------------------------------------------------------------------ ACL denials


async def test_a_denied_command_exits_6_naming_it(setup: Setup) -> None:
    tls, stream = setup.tls, setup.stream
    url = f"{tls.url(setup.users['observer'])}?{tls.params()}"
    claim, claim_json, purge, trim, replay = await asyncio.gather(
        cli("claim", stream, "g", "c2", "--min-idle-ms", "0", url=url),
        cli("claim", stream, "g", "c2", "--min-idle-ms", "0", "--json", url=url),
        cli("dlq", "purge", stream, "--all", "--yes", url=url),
        cli("trim", stream, "--maxlen", "0", "--force", url=url),
        cli("dlq", "replay", stream, "--all", url=url))
    for result in (claim, claim_json, purge, trim, replay):
        assert result.code == 6, result.err
        assert "permission denied" in result.err, result.err
        _clean(result)
    assert "XCLAIM" in claim.err
    assert claim_json.error()["exit_code"] == 6
    assert "permission denied" in claim_json.error()["error"]
    assert await setup.admin.xlen(dlq_key(stream)) == 1  # nothing changed
    assert await setup.admin.xlen(stream) == 1


async def test_info_reports_an_unreadable_stream_in_its_row(setup: Setup) -> None:
    tls, admin, stream = setup.tls, setup.admin, setup.stream
    hidden = f"{stream}-hidden"
    await admin.xadd(hidden, {"type": "secret"})
    # May list streams and see the hidden one's type, but not read it.
    name = f"lister-{uuid.uuid4().hex[:6]}"
    rules = acl_rules("observer", [stream], scan=True) + f" (%R~{hidden} +type)"
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", name, "on", f">{SECRET}", *rules.split())
    try:
        url = f"{tls.url(name)}?{tls.params()}"
        listing, as_json, one = await asyncio.gather(
            cli("info", "--match", f"{stream}*", url=url),
            cli("info", "--match", f"{stream}*", "--json", url=url),
            cli("info", hidden, url=url))
    finally:
        await admin.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]
        await admin.delete(hidden)
    assert listing.code == 0, listing.err
    assert "denied" in listing.out
    assert as_json.code == 0, as_json.err
    rows: dict[str, Any] = {row["stream"]: row for row in as_json.json()}
    assert rows[stream]["length"] == 1
    assert rows[hidden]["denied"] is True
    assert "permission denied" in rows[hidden]["error"]
    assert one.code == 6, one.err
    for result in (listing, as_json, one):
        _clean(result)


# ------------------------------------------------------------------------------ credentials


async def test_wrong_credentials_exit_7_and_secrets_never_print(setup: Setup) -> None:
    tls, stream = setup.tls, setup.stream
    observer = setup.users["observer"]
    good = f"{tls.url(observer)}?{tls.params()}"
    wrong = good.replace(f":{SECRET}@", f":{SECRET}x@")
    results = await asyncio.gather(
        cli("info", stream, url=wrong),
        cli("info", stream, "--json", url=wrong),
        cli("pending", stream, "g", url=f"{tls.url('nobody')}?{tls.params()}&password={SECRET}y"),
        cli("info", stream, url=good),                                     # 0
        cli("info", stream, "--match", "x", url=good),                     # 2
        cli("info", stream, url=f"redis://{observer}:{SECRET}@127.0.0.1:{find_free_port()}"),
        cli("dlq", "show", stream, "1-1", url=good),                       # 4
        cli("tail", f"{stream}:str", url=good),                            # 5
        cli("trim", stream, "--maxlen", "0", "--json", url=good),          # 6
        cli("info", stream, url=f"{tls.url(observer)}?{tls.params(tls.other_ca)}"),  # 8
        cli("acl", "worker", "--stream", stream, "--json", url=None),
        cli("acl", "nobody", "--stream", stream, url=None))
    codes = [r.code for r in results]
    assert codes == [7, 7, 7, 0, 2, 3, 4, 5, 6, 8, 0, 2], [r.err for r in results]
    assert "credentials" in results[0].err
    assert results[1].error()["exit_code"] == 7
    for result in results:
        _clean(result)
    assert "***" in results[0].err

"""TLS against a real ``redis-server`` with a TLS port (Debian's build has TLS; the embedded
Valkey does not): a worker works over ``rediss://`` with the right CA, and fails fast with a
``TLSError`` that says why when the CA is wrong or the URL's scheme does not match the port."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agentstreams import (
    AgentCoordinator,
    Event,
    InvalidArgumentError,
    TLSError,
    TLSKwargs,
    Worker,
)
from agentstreams.server import LocalServer, find_free_port
from conftest import wait_for

pytestmark = pytest.mark.slow

#: A misconfigured TLS connection must fail well inside this (the connect timeout is 5 s).
FAIL_FAST_S = 5.0


@dataclass(frozen=True)
class TlsServer:
    server: LocalServer
    tls_port: int
    ca: Path
    other_ca: Path
    #: a second server on the same CA that requires a client certificate (mutual TLS)
    mtls_port: int
    client_cert: Path
    client_key: Path

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}")
    return key, cert


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and redis-server")
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca = _make_ca(directory, "test-ca")
    _other_key, other_ca = _make_ca(directory, "other-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
             "/CN=localhost")
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    client_key, client_csr = directory / "client.key", directory / "client.csr"
    client_cert = directory / "client.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", client_key, "-out", client_csr,
             "-subj", "/CN=agentstreams-test-client")
    _openssl("x509", "-req", "-in", client_csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", client_cert, "-days", "2")
    tls_port, mtls_port = find_free_port(), find_free_port()
    common = {"tls-cert-file": str(cert), "tls-key-file": str(key), "tls-ca-cert-file": str(ca)}
    server = LocalServer("redis", extra_config={
        "tls-port": str(tls_port), "tls-auth-clients": "no", **common})
    mutual = LocalServer("redis", extra_config={
        "tls-port": str(mtls_port), "tls-auth-clients": "yes", **common})
    try:
        server.start()
        mutual.start()
    except Exception as exc:  # a redis-server built without TLS
        server.stop()
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield TlsServer(server, tls_port, ca, other_ca, mtls_port, client_cert, client_key)
    server.stop()
    mutual.stop()


def _worker(url: str, seen: list[str] | None = None) -> Worker:
    worker = Worker(url, f"tls-{uuid.uuid4().hex[:8]}", "g", probe_server=False, block_ms=200)

    @worker.handler()
    async def handle(event: Event) -> None:
        if seen is not None:
            seen.append(event.msg_id)

    return worker


async def _start_fails_fast(worker: Worker, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(TLSError, match=match):
        await asyncio.wait_for(worker.start(), FAIL_FAST_S * 2)
    assert time.monotonic() - started < FAIL_FAST_S
    assert not worker.running


async def test_worker_over_tls_with_the_right_ca(tls_server: TlsServer) -> None:
    url = f"{tls_server.tls_url}?ssl_ca_certs={tls_server.ca}"
    seen: list[str] = []
    worker = _worker(url, seen)
    async with worker:
        client = aioredis.Redis.from_url(url)
        try:
            await client.xadd(worker.stream, {"type": "task", "n": "1"})
            await wait_for(lambda: _has(seen, 1), message="an event handled over TLS")
        finally:
            await client.delete(worker.stream)
            await client.aclose()


async def _has(seen: list[str], count: int) -> bool:
    return len(seen) >= count


async def test_worker_with_a_wrong_ca_fails_fast(tls_server: TlsServer) -> None:
    await _start_fails_fast(_worker(f"{tls_server.tls_url}?ssl_ca_certs={tls_server.other_ca}"),
                            "certificate verify failed")


async def test_worker_without_a_ca_fails_fast(tls_server: TlsServer) -> None:
    await _start_fails_fast(_worker(tls_server.tls_url), "certificate verify failed")


async def test_worker_with_redis_url_on_a_tls_port_fails_fast(tls_server: TlsServer) -> None:
    await _start_fails_fast(_worker(f"redis://127.0.0.1:{tls_server.tls_port}"),
                            "TLS port addressed with redis://")


async def test_worker_with_rediss_url_on_a_plain_port_fails_fast(tls_server: TlsServer) -> None:
    """rediss:// to a plain-text server used to wait out the connect timeout and say only
    "Timeout connecting"; now the port is asked in plain text, and the error says what it is."""
    await _start_fails_fast(_worker(f"rediss://127.0.0.1:{tls_server.server.port}"),
                            "answers plain-text Redis commands")


async def test_coordinator_with_rediss_url_on_a_plain_port_fails_fast(
        tls_server: TlsServer) -> None:
    started = time.monotonic()
    coordinator = AgentCoordinator(f"rediss://127.0.0.1:{tls_server.server.port}", "s")
    with pytest.raises(TLSError, match="use redis:// for this port"):
        await coordinator.publish("x", {})
    await coordinator.close()
    assert time.monotonic() - started < 2.0


async def test_mutual_tls_with_keyword_arguments(tls_server: TlsServer) -> None:
    """Every entry point takes the TLS options as keyword arguments (the URL's ssl_*
    parameters do the same): a worker and a coordinator over mutual TLS."""
    url = f"rediss://127.0.0.1:{tls_server.mtls_port}"
    tls: TLSKwargs = {"ssl_ca_certs": str(tls_server.ca),
                      "ssl_certfile": str(tls_server.client_cert),
                      "ssl_keyfile": str(tls_server.client_key)}
    stream = f"mtls-{uuid.uuid4().hex[:8]}"
    seen: list[str] = []
    worker = Worker(url, stream, "g", probe_server=False, block_ms=200, **tls)

    @worker.handler()
    async def handle(event: Event) -> None:
        seen.append(event["n"])

    async with worker, AgentCoordinator(url, stream, **tls) as coordinator:
        await coordinator.publish("task", {"n": "1"})
        await wait_for(lambda: _has(seen, 1), message="an event handled over mutual TLS")
        assert await coordinator.trim_stream(0, force=True, approximate=False) == 1


def test_tls_keyword_arguments_are_checked_when_built(tls_server: TlsServer) -> None:
    with pytest.raises(InvalidArgumentError, match="rediss://"):
        Worker("redis://127.0.0.1:6379", ssl_ca_certs=str(tls_server.ca))
    with pytest.raises(InvalidArgumentError, match="no such file"):
        AgentCoordinator("rediss://127.0.0.1:6379", ssl_ca_certs="/nonexistent/ca.pem")
    with pytest.raises(InvalidArgumentError, match="go together"):
        Worker("rediss://127.0.0.1:6379", ssl_certfile=str(tls_server.client_cert))
    with pytest.raises(InvalidArgumentError, match="ssl_cert_reqs"):
        AgentCoordinator("rediss://127.0.0.1:6379", ssl_cert_reqs="sometimes")

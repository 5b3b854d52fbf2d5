"""The embedded-server helper (real processes) and the connection layer."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from agentstreams import (
    AgentStreamsError,
    BackpressureError,
    ConnectionLostError,
    GroupNotFoundError,
    InvalidArgumentError,
    WrongTypeError,
)
from agentstreams._connection import (
    Backoff,
    ConnectionSettings,
    call,
    create_client,
    redact_url,
    translate_error,
)
from agentstreams.server import LocalServer, ServerStartError, find_free_port

# --------------------------------------------------------------------------- LocalServer


def pid_of(server: LocalServer) -> int | None:
    return server.pid


def test_start_ping_kill(tmp_path: Path) -> None:
    server = LocalServer("valkey", data_dir=tmp_path)
    assert not server.ping()
    assert server.start() is server
    assert server.start() is server  # already running: no second process
    assert server.ping()
    assert pid_of(server) is not None
    assert server.url == f"redis://127.0.0.1:{server.port}"
    server.kill()
    assert pid_of(server) is None
    assert not server.ping()
    server.kill()  # idempotent
    server.stop()
    assert tmp_path.exists()  # a directory we were given is left alone


def test_restart_with_appendonly_keeps_acknowledged_writes() -> None:
    with LocalServer("valkey", appendonly=True, appendfsync="always") as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"type": "t"})
        client.close()
        old_pid = server.pid
        server.restart()  # kill -9, then start on the same port and directory
        assert server.pid != old_pid
        client = redis.Redis.from_url(server.url)
        assert client.xlen("s") == 1
        client.close()
        data_dir = server.data_dir
    assert not data_dir.exists()  # stop() removed the directory it created


def test_restart_without_appendonly_loses_data() -> None:
    """What reliability fact 8 warns about (no AOF, no snapshot): a crash loses everything."""
    with LocalServer("valkey") as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.exists("k") == 0
        client.close()


def test_pause_and_resume() -> None:
    with LocalServer("valkey") as server:
        server.pause()
        try:
            assert not server.ping()
        finally:
            server.resume()
        assert server.ping()


def test_unix_socket(tmp_path: Path) -> None:
    with LocalServer("valkey", unix_socket=True) as server:
        assert server.unix_url == f"unix://{server.unix_socket_path}"
        client = redis.Redis.from_url(server.unix_url)
        assert client.ping()
        client.close()
    with pytest.raises(InvalidArgumentError, match="unix_socket=True"):
        _ = LocalServer("valkey").unix_url


def test_redis_server_kind() -> None:
    with LocalServer("redis") as server:
        assert server.port != 6379
        client = redis.Redis.from_url(server.url)
        assert str(client.info("server")["redis_version"]).startswith("7.")
        client.close()


def test_bad_arguments_and_failed_start(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="'valkey' or 'redis'"):
        LocalServer("memcached")
    server = LocalServer("valkey", extra_config={"no-such-directive": "1"}, data_dir=tmp_path)
    with pytest.raises(ServerStartError, match="exited at start-up") as info:
        server.start()
    assert isinstance(info.value, AgentStreamsError)
    assert server.log_tail()  # the reason is in the log the error quotes
    server.stop()


def test_find_free_port_returns_a_port_nobody_listens_on() -> None:
    port = find_free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises OSError (address in use) if it were taken
        sock.listen()
        assert find_free_port() != port  # a port someone listens on is never returned


# --------------------------------------------------------------------------- redact_url


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://localhost:6379", "redis://localhost:6379"),
    ("redis://user:secret@host:6380/1", "redis://user:***@host:6380/1"),
    ("redis://:secret@host", "redis://:***@host"),
    ("rediss://u:secret@[::1]:6379/0?ssl_cert_reqs=required",
     "rediss://u:***@[::1]:6379/0?ssl_cert_reqs=required"),
    ("redis://u:se@cret@host:1", "redis://u:***@host:1"),
    ("redis://host:6379/0?password=secret", "redis://host:6379/0?password=***"),
    ("unix:///tmp/r.sock?db=1&password=secret", "unix:///tmp/r.sock?db=1&password=***"),
    ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
    ("redis://[::1", "<unparseable url>"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "secret" not in redact_url(url)


# --------------------------------------------------------------------------- ConnectionSettings


@pytest.mark.parametrize("url", ["redis://localhost:6379", "rediss://h:6380/0",
                                 "unix:///tmp/x.sock", "REDIS://h"])
def test_settings_accept_supported_urls(url: str) -> None:
    assert ConnectionSettings(url=url).url == url


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"url": ""}, "non-empty string like 'redis://localhost:6379'"),
    ({"url": 6379}, "non-empty string"),
    ({"url": "localhost:6379"}, "use redis://, rediss:// \\(TLS\\) or unix://"),
    ({"url": "http://u:secret@h"}, "unsupported URL 'http://u:\\*\\*\\*@h'"),
    ({"socket_timeout_s": 0}, "socket_timeout_s must be a positive number"),
    ({"socket_timeout_s": -1.5}, "socket_timeout_s must be a positive number"),
    ({"socket_timeout_s": "5"}, "socket_timeout_s must be a positive number"),
    ({"connect_timeout_s": -1}, "connect_timeout_s must be a positive number"),
    ({"health_check_interval_s": -1}, "health_check_interval_s must be >= 0"),
    ({"command_retries": -1}, "command_retries must be >= 0"),
])
def test_settings_reject_impossible_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        ConnectionSettings(**kwargs)
    assert "secret" not in str(info.value)


def test_settings_are_frozen() -> None:
    settings = ConnectionSettings()
    with pytest.raises(AttributeError):
        settings.url = "redis://other"  # type: ignore[misc]


async def test_create_client_returns_a_bytes_client(redis_url: str) -> None:
    client = create_client(ConnectionSettings(url=redis_url, client_name="agentstreams-test"))
    try:
        await client.set("agentstreams-test-key", "é")
        assert await client.get("agentstreams-test-key") == "é".encode()
        assert await client.client_getname() in (b"agentstreams-test", "agentstreams-test")
    finally:
        await client.delete("agentstreams-test-key")
        await client.aclose()


def test_create_client_rejects_an_invalid_url() -> None:
    with pytest.raises(InvalidArgumentError, match="invalid redis URL") as info:
        create_client(ConnectionSettings(url="redis://u:secret@localhost:notaport"))
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- error translation


@pytest.mark.parametrize(("error", "expected"), [
    (redis_exc.ConnectionError("reset"), ConnectionLostError),
    (redis_exc.TimeoutError("timed out"), ConnectionLostError),
    (ConnectionRefusedError("refused"), ConnectionLostError),
    (redis_exc.ResponseError("NOGROUP No such key 's' or consumer group 'g'"),
     GroupNotFoundError),
    (redis_exc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
     WrongTypeError),
    (redis_exc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
     BackpressureError),
    (redis_exc.ReadOnlyError("You can't write against a read only replica."),
     BackpressureError),
    (redis_exc.ResponseError("OOM command not allowed"), BackpressureError),
])
def test_translate_error(error: BaseException, expected: type[Exception]) -> None:
    translated = translate_error(error, stream="s", group="g")
    assert type(translated) is expected
    assert isinstance(translated, AgentStreamsError)
    assert translated.stream == "s"
    # Code written against the reference still catches redis-py's classes.
    assert isinstance(translated, redis_exc.ConnectionError | redis_exc.ResponseError)


def test_translate_error_passes_others_through() -> None:
    other = redis_exc.ResponseError("ERR unknown command")
    assert translate_error(other) is other
    ours = InvalidArgumentError("x")
    assert translate_error(ours) is ours
    plain = KeyError("k")
    assert translate_error(plain) is plain


async def test_call_translates_errors_from_a_real_server(
        raw: aioredis.Redis, stream_name: str) -> None:
    with pytest.raises(GroupNotFoundError, match="call initialize\\(\\)") as info:
        await call(lambda: raw.xreadgroup("nope", "c", {stream_name: ">"}),
                   stream=stream_name, group="nope")
    assert (info.value.stream, info.value.group) == (stream_name, "nope")
    assert isinstance(info.value.__cause__, redis_exc.ResponseError)
    await raw.set(stream_name, "x")
    with pytest.raises(WrongTypeError):
        await call(lambda: raw.xlen(stream_name), stream=stream_name)


async def test_call_on_a_dead_server_raises_connection_lost() -> None:
    port = find_free_port()
    client = create_client(ConnectionSettings(url=f"redis://127.0.0.1:{port}",
                                              command_retries=0, connect_timeout_s=1))
    try:
        with pytest.raises(ConnectionLostError, match="can be retried"):
            await call(client.ping)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- Backoff


def test_backoff_grows_to_the_cap_and_resets() -> None:
    backoff = Backoff(base_s=0.1, cap_s=1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 1.0 for d in delays)
    assert delays[-1] >= 0.5  # at the cap: between cap/2 and cap
    backoff.reset()
    assert backoff.next_delay() <= 0.1


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_backoff_rejects_impossible_values(base: float, cap: float) -> None:
    with pytest.raises(InvalidArgumentError, match="0 < base_s <= cap_s"):
        Backoff(base_s=base, cap_s=cap)

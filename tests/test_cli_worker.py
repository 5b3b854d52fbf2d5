"""``agentstreams worker MODULE:ATTR``: a real process running a Worker from a user's module:
events handled, SIGTERM stops it with status 0, a failing worker exits non-zero with the
reason, a bad MODULE:ATTR is a usage error, ``--reload`` restarts it when the code changes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agentstreams import Publisher
from agentstreams.server import LocalServer
from conftest import wait_for
from test_cli import CLI, CLI_TIMEOUT_S, Result

MODULE = """
import os
from pathlib import Path

from agentstreams import Worker

OUT = Path(os.environ["WORKER_TEST_OUT"])
worker = Worker(redis_url=os.environ["WORKER_TEST_URL"],
                stream_name=os.environ["WORKER_TEST_STREAM"], consumer_group="jobs",
                consumer_name="w1", block_ms=200, shutdown_timeout_s=5)


@worker.handler("job")
async def handle(event):
    with OUT.open("a") as out:
        out.write(f"{VERSION} {event['n']} {worker.concurrency}\\n")


def make_worker():
    return worker


not_a_worker = 42
VERSION = "A"
"""


@pytest.fixture
async def app(tmp_path: Path, valkey_server: LocalServer, stream_name: str) -> AsyncIterator[
        tuple[Path, dict[str, str], aioredis.Redis]]:
    """(module folder, environment, client): ``jobmod.py`` defining ``worker``."""
    (tmp_path / "jobmod.py").write_text(MODULE)
    env = {**os.environ, "WORKER_TEST_URL": valkey_server.url,
           "WORKER_TEST_STREAM": stream_name, "WORKER_TEST_OUT": str(tmp_path / "out.txt")}
    client = aioredis.Redis.from_url(valkey_server.url)
    yield tmp_path, env, client
    await client.delete(stream_name, f"{stream_name}:str")
    await client.aclose()


async def start(folder: Path, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, "worker", *args, cwd=folder, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process) -> Result:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the worker command did not end within {CLI_TIMEOUT_S}s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_runs_a_worker_from_a_module_until_sigterm(
        app: tuple[Path, dict[str, str], aioredis.Redis], stream_name: str) -> None:
    folder, env, client = app
    proc = await start(folder, env, "jobmod:worker", "--concurrency", "3")
    publisher = Publisher(client, stream_name)
    for n in range(3):
        await publisher.publish("job", {"n": n})
    out = folder / "out.txt"

    async def handled() -> bool:
        if proc.returncode is not None:
            pytest.fail(f"the worker exited early: {(await finish(proc)).err}")
        return len(lines(out)) == 3

    await wait_for(handled, timeout_s=20, message="3 jobs handled")
    assert sorted(lines(out)) == ["A 0 3", "A 1 3", "A 2 3"]  # --concurrency took effect

    async def acknowledged() -> bool:
        groups = await client.xinfo_groups(stream_name)
        return bool(groups[0]["pending"] == 0)

    await wait_for(acknowledged, timeout_s=10, message="the jobs acknowledged")
    proc.send_signal(signal.SIGTERM)
    result = await finish(proc)
    assert result.code == 0, result.err
    assert "running Worker 'w1' of group 'jobs'" in result.err
    assert "concurrency 3" in result.err
    assert "Traceback" not in result.err


async def test_a_factory_is_called(app: tuple[Path, dict[str, str], aioredis.Redis],
                                   stream_name: str) -> None:
    folder, env, client = app
    proc = await start(folder, env, "jobmod:make_worker")
    await Publisher(client, stream_name).publish("job", {"n": 7})
    await wait_for(lambda: _true(lines(folder / "out.txt") != []), timeout_s=20,
                   message="the job handled")
    proc.send_signal(signal.SIGINT)
    result = await finish(proc)
    assert result.code == 0, result.err
    assert lines(folder / "out.txt")[0].startswith("A 7 ")


async def _true(value: bool) -> bool:
    return value


async def test_bad_targets_are_usage_errors(
        app: tuple[Path, dict[str, str], aioredis.Redis]) -> None:
    folder, env, _client = app
    targets = ("jobmod", "nosuchmodule:worker", "jobmod:missing", "jobmod:not_a_worker")
    procs = [await start(folder, env, target) for target in targets]
    results = await asyncio.gather(*(finish(proc) for proc in procs))
    no_colon, no_module, no_attr, wrong_type = results
    for result in results:
        assert result.code == 2, result.err
        assert "Traceback" not in result.err
    assert "is not MODULE:ATTR" in no_colon.err
    assert "no module named 'nosuchmodule'" in no_module.err
    assert "has no attribute 'missing' (workers it defines: worker)" in no_attr.err
    assert "jobmod:not_a_worker is a int, not a Worker" in wrong_type.err


async def test_a_worker_that_fails_exits_non_zero_with_the_reason(
        app: tuple[Path, dict[str, str], aioredis.Redis], stream_name: str,
        valkey_server: LocalServer) -> None:
    folder, env, client = app
    await client.set(stream_name, "not a stream")
    wrong_type = await finish(await start(folder, env, "jobmod:worker"))
    assert wrong_type.code == 5, wrong_type.err
    assert "the worker stopped" in wrong_type.err
    assert stream_name in wrong_type.err
    await client.delete(stream_name)
    bad_password = {**env, "WORKER_TEST_URL": f"redis://nobody:wrong@{valkey_server.host}:"
                                              f"{valkey_server.port}"}
    auth = await finish(await start(folder, bad_password, "jobmod:worker"))
    assert auth.code == 7, auth.err
    assert "wrong" not in auth.err  # the password is never printed
    assert "Traceback" not in auth.err + wrong_type.err


@pytest.mark.slow
async def test_reload_restarts_the_worker_when_the_module_changes(
        app: tuple[Path, dict[str, str], aioredis.Redis], stream_name: str) -> None:
    folder, env, client = app
    proc = await start(folder, env, "jobmod:worker", "--reload")
    publisher = Publisher(client, stream_name)
    out = folder / "out.txt"
    await publisher.publish("job", {"n": 1})
    await wait_for(lambda: _true(len(lines(out)) == 1), timeout_s=20, message="first job")
    source = folder / "jobmod.py"
    source.write_text(MODULE.replace('VERSION = "A"', 'VERSION = "B"'))
    future = time.time() + 2
    os.utime(source, (future, future))  # a new mtime even on a coarse clock
    deadline = time.monotonic() + 30
    n = 2
    while time.monotonic() < deadline:  # until a job is handled by the new code
        await publisher.publish("job", {"n": n})
        await asyncio.sleep(0.5)
        if any(line.startswith("B ") for line in lines(out)):
            break
        n += 1
    assert any(line.startswith("B ") for line in lines(out)), lines(out)
    proc.send_signal(signal.SIGTERM)
    result = await finish(proc)
    assert result.code == 0, result.err
    assert "restarting the worker" in result.err
    assert sys.executable


def test_polling_watcher_sees_a_changed_file(tmp_path: Path) -> None:
    """The watcher used when watchfiles is not installed."""
    import threading

    from agentstreams.cli.worker_cmd import _poll_changes

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    stop = threading.Event()
    changes = _poll_changes(tmp_path, stop)
    assert next(changes) == set()
    (tmp_path / "__pycache__" / "a.cpython.py").write_text("ignored")
    (tmp_path / "notes.txt").write_text("ignored")
    assert next(changes) == set()
    (tmp_path / "b.py").write_text("y = 2\n")
    assert next(changes) == {str(tmp_path / "b.py")}
    stop.set()
    assert list(changes) == []

"""``agentstreams worker MODULE:ATTR``: run a ``Worker`` or ``AgentWorker`` defined in your code.

Like ``celery worker``, ``arq`` or ``faststream run``: the command imports ``MODULE`` (from the
current directory, or ``--app-dir``), takes ``ATTR`` from it (a ``Worker``, an ``AgentWorker``,
or a function without arguments returning one, maybe async), logs to the console and calls the
object's ``run()``: SIGTERM or Ctrl-C stops it gracefully (running handlers finish, up to its
shutdown timeout; a second signal stops at once). A worker that stops on its own (a
misconfiguration, a wrong password, a handler task that keeps dying) makes the command exit
non-zero with the reason, with the CLI's exit codes.

``--reload`` (development) runs the worker in a child process and restarts it whenever a
``.py`` file under the module's directory changes (``watchfiles`` when it is installed, else
polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from agentstreams._worker import Worker
from agentstreams.cli._common import ExitCode, _exit_code_for, report_error, usage_error
from agentstreams.errors import AgentStreamsError

__all__ = ["load_worker", "worker_command"]

#: How often the polling watcher looks at the files (and the supervisor at its child).
POLL_S = 0.5
#: A child that does not stop within this after SIGTERM on a reload is killed.
RESTART_STOP_TIMEOUT_S = 30.0
#: Directories never watched.
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache",
              ".ruff_cache", ".pytest_cache", ".tox"}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger("agentstreams.cli.worker")


class TargetError(Exception):
    """``MODULE:ATTR`` does not name a worker (exit 2, the message says why)."""


def _worker_types() -> tuple[type, ...]:
    types: list[type] = [Worker]
    try:
        from agentstreams.integrations.openai_agents import AgentWorker
    except ImportError:  # the agents extra is not installed
        pass
    else:
        types.append(AgentWorker)
    return tuple(types)


def _split(target: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise TargetError(f"{target!r} is not MODULE:ATTR (e.g. myapp.workers:worker)")
    return module, attr


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise TargetError(f"no module named {module!r} (looked in {os.getcwd()!r} and "
                              "sys.path; --app-dir to look elsewhere)") from exc
        raise


def load_worker(target: str) -> Any:
    """The ``Worker``/``AgentWorker`` ``target`` names (calls a factory), or TargetError."""
    module_name, attr = _split(target)
    module = _import(module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            kinds = _worker_types()
            found = [name for name, value in vars(module).items()
                     if isinstance(value, kinds)]
            hint = f" (workers it defines: {', '.join(found)})" if found else ""
            raise TargetError(f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    kinds = _worker_types()
    if not isinstance(obj, kinds) and callable(obj) and not isinstance(obj, type):
        try:
            inspect.signature(obj).bind()
        except (TypeError, ValueError) as exc:
            raise TargetError(f"{target} is a function that needs arguments; give a Worker, "
                              "an AgentWorker, or a function without arguments returning "
                              "one") from exc
        obj = obj()
        if inspect.isawaitable(obj):
            obj = asyncio.run(_await(obj))
    if not isinstance(obj, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise TargetError(f"{target} is a {type(obj).__name__}, not a {names} (or a function "
                          "without arguments returning one)")
    return obj


async def _await(value: Any) -> Any:
    return await value


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _describe(obj: Any) -> str:
    if isinstance(obj, Worker):
        return (f"Worker {obj.consumer!r} of group {obj.group!r} on stream {obj.stream!r} "
                f"(concurrency {obj.concurrency})")
    agents = sorted(getattr(obj, "agents", {}))
    return f"AgentWorker {getattr(obj, 'name', '?')!r} hosting {', '.join(agents)}"


def _run_in_process(target: str, concurrency: int | None, log_level: str) -> None:
    _setup_logging(log_level)
    try:
        obj = load_worker(target)
    except TargetError as exc:
        usage_error(str(exc), False)
    except AgentStreamsError as exc:  # e.g. a bad URL in the module's Worker(...)
        message, code = _exit_code_for(exc)
        report_error(f"loading {target} failed: {message}", code, False)
    except Exception as exc:  # a bug in the module: its traceback is what helps
        logger.error("loading %s failed", target, exc_info=exc)
        report_error(f"loading {target} failed: {type(exc).__name__}: {exc} (traceback above)",
                     ExitCode.FAILURE, False)
    if concurrency is not None:
        if not isinstance(obj, Worker):
            usage_error("--concurrency applies to a Worker; an AgentWorker takes it per agent "
                        "in its constructor", False)
        obj.concurrency = concurrency
        obj.max_in_flight = concurrency + obj.prefetch
    logger.info("running %s (SIGTERM or Ctrl-C stops it gracefully)", _describe(obj))
    try:
        asyncio.run(obj.run())
    except KeyboardInterrupt:  # a signal before run() installed its handlers
        raise typer.Exit(int(ExitCode.OK)) from None
    except Exception as exc:
        message, code = _exit_code_for(exc)
        report_error(f"the worker stopped: {message}", code, False)
    logger.info("stopped")


# ------------------------------------------------------------------------------------ reload


def _snapshot(root: Path) -> dict[str, float]:
    files: dict[str, float] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    files[path] = os.stat(path).st_mtime_ns
    return files


def _poll_changes(root: Path, stop: threading.Event) -> Iterator[set[str]]:
    """Changed ``.py`` files under ``root`` (an empty set every POLL_S when none)."""
    before = _snapshot(root)
    while not stop.is_set():
        stop.wait(POLL_S)
        now = _snapshot(root)
        yield {p for p in before.keys() | now.keys() if before.get(p) != now.get(p)}
        before = now


def _changes(root: Path, stop: threading.Event) -> Iterator[set[str]]:
    try:
        import watchfiles
    except ImportError:
        yield from _poll_changes(root, stop)
        return
    for changes in watchfiles.watch(root, watch_filter=watchfiles.PythonFilter(),
                                    stop_event=stop, yield_on_timeout=True,
                                    rust_timeout=int(POLL_S * 1000), raise_interrupt=False):
        yield {path for _change, path in changes}


def _module_dir(target: str) -> Path:
    module, _attr = _split(target)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise TargetError(f"cannot find module {module!r}: {exc}") from exc
    if spec is None or spec.origin is None or not os.path.exists(spec.origin):
        raise TargetError(f"no module named {module!r} (looked in {os.getcwd()!r} and "
                          "sys.path; --app-dir to look elsewhere)")
    top = module.split(".")[0]
    top_spec = importlib.util.find_spec(top) if top != module else spec
    # The folder of the top-level module or package (a package's __init__.py is inside it).
    return Path(top_spec.origin if top_spec and top_spec.origin else spec.origin).parent


def _stop_child(child: subprocess.Popen[bytes], timeout_s: float) -> int:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            return child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
    return child.wait()


def _supervise(target: str, app_dir: str, concurrency: int | None, log_level: str) -> None:
    """Run the worker in a child process; restart it when a watched file changes."""
    _setup_logging(log_level)
    try:
        root = _module_dir(target)
    except TargetError as exc:
        usage_error(str(exc), False)
    args = [sys.executable, "-m", "agentstreams.cli.main", "worker", target, "--app-dir",
            app_dir, "--log-level", log_level]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        logger.info("watching %s for changes (reload)", root)
        child: subprocess.Popen[bytes] | None = subprocess.Popen(args)
        reported = False
        for changed in _changes(root, stop):
            if stop.is_set():
                break
            if changed:
                shown = ", ".join(sorted(os.path.relpath(p, root) for p in changed)[:5])
                logger.warning("%s changed; restarting the worker", shown)
                if child is not None:
                    _stop_child(child, RESTART_STOP_TIMEOUT_S)
                child = subprocess.Popen(args)
                reported = False
            elif child is not None and child.poll() is not None and not reported:
                logger.warning("the worker exited with code %s; waiting for a change to "
                               "restart it (Ctrl-C to quit)", child.returncode)
                reported = True
        code = 0 if child is None else _stop_child(child, RESTART_STOP_TIMEOUT_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Stopped by us with SIGTERM: a clean stop; else the worker's own status.
    raise typer.Exit(0 if code in (0, -signal.SIGTERM) and signals else code)


def worker_command(
    target: Annotated[str, typer.Argument(
        metavar="MODULE:ATTR",
        help="Where the worker is: a module and a Worker or AgentWorker in it (or a function "
             "without arguments returning one), e.g. myapp.workers:worker.")],
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", "-c", min=1,
        help="Handlers run at once (a Worker's concurrency); default: as the code says.")
    ] = None,
    log_level: Annotated[str, typer.Option(
        "--log-level", case_sensitive=False, help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    reload: Annotated[bool, typer.Option(
        "--reload", help="Development: restart the worker when a .py file under the module's "
                         "directory changes.")] = False,
    app_dir: Annotated[str, typer.Option(
        "--app-dir", help="Directory to import MODULE from (put first on sys.path).")] = ".",
) -> None:
    """Run a Worker or AgentWorker from your code until SIGTERM/Ctrl-C (graceful stop)."""
    level = log_level.upper()
    if level not in _LEVELS:
        usage_error(f"--log-level must be one of {', '.join(_LEVELS)}, not {log_level!r}",
                    False)
    try:
        _split(target)
    except TargetError as exc:
        usage_error(str(exc), False)
    sys.path.insert(0, os.path.abspath(app_dir))
    if reload:
        _supervise(target, app_dir, concurrency, level)
    else:
        started = time.monotonic()
        _run_in_process(target, concurrency, level)
        logger.debug("ran for %.1f s", time.monotonic() - started)

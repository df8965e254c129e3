"""Real redis-server processes for the tests: free loopback ports, no persistence, stopped after."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RedisServer", "free_port", "redis_server_binary", "start_redis", "stop_process"]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def redis_server_binary() -> str:
    """The redis-server on this machine (``make test`` installs it)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


@dataclass
class RedisServer:
    """One redis-server process we started and will stop."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    extra: Sequence[str] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        """The redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        """Run redis-cli against this server and return its output."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
            timeout=10, check=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        stop_process(self.process)

    def restart(self) -> None:
        """Start a stopped server again on the same port and directory."""
        self.stop()
        fresh = start_redis(port=self.port, directory=self.directory, extra=self.extra)
        self.process = fresh.process


def start_redis(*, port: int | None = None, directory: Path | None = None,
                extra: Sequence[str] = ()) -> RedisServer:
    """Start redis-server on 127.0.0.1 with no persistence unless ``extra`` asks for it."""
    port = port or free_port()
    directory = directory or Path(tempfile.mkdtemp(prefix="rk-redis-"))
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(directory),
        "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
        *extra,
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port=port, process=process, directory=directory, extra=tuple(extra))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            if server.cli("PING") == "PONG":
                return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("redis-server did not start within 10 s")


@contextlib.contextmanager
def running_redis(**kwargs: object) -> Iterator[RedisServer]:
    """A redis-server for the duration of a with-block."""
    server = start_redis(**kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()

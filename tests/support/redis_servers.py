"""Real redis-server processes for the tests: free loopback ports, no persistence, stopped after."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ClusterServers",
    "RedisServer",
    "SentinelServers",
    "free_port",
    "redis_server_binary",
    "start_cluster",
    "start_redis",
    "start_sentinel",
    "stop_process",
]


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

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed on the way out."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        os.kill(self.process.pid, signal.SIGCONT)


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


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@dataclass
class ClusterServers:
    """A Redis Cluster of masters only, each a redis-server we started."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """The redis+cluster:// URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def start_cluster(masters: int = 3, extra: Sequence[str] = ()) -> ClusterServers:
    """Start ``masters`` cluster-enabled servers on free ports and join them into a cluster."""
    ports = free_ports(2 * masters)  # a client port and a cluster bus port per node
    nodes: list[RedisServer] = []
    try:
        for port, bus in zip(ports[:masters], ports[masters:], strict=True):
            nodes.append(start_redis(port=port, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", "2000", *extra,
            )))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok within 15 s")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return ClusterServers(nodes)


@dataclass
class SentinelServers:
    """A master, its replica and a sentinel watching them as ``service``."""

    master: RedisServer
    replica: RedisServer
    sentinel: subprocess.Popen[bytes]
    sentinel_port: int
    service: str = "rk"

    @property
    def url(self) -> str:
        """The redis+sentinel:// URL of the service."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"

    def cli(self, *args: str) -> str:
        """Run ``SENTINEL <args> <service>`` with redis-cli; its output (an error reply is
        output too)."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.sentinel_port), "SENTINEL", *args, self.service],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()

    def master_port(self) -> int:
        """The port the sentinel names as master right now."""
        return int(self.cli("get-master-addr-by-name").split()[1])

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Return once the replica has applied everything the master has written so far.

        (Not ``WAIT``: it counts the writes of the connection that sends it, and a fresh
        redis-cli connection has written nothing, so it returns at once.)"""
        target = _offset(self.master.cli("INFO", "replication"), "master_repl_offset")
        deadline = time.monotonic() + timeout
        while _offset(self.replica.cli("INFO", "replication"), "slave_repl_offset") < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"the replica did not reach offset {target} in {timeout} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the sentinel, the replica and the master."""
        stop_process(self.sentinel)
        self.replica.stop()
        self.master.stop()


def _offset(info: str, field: str) -> int:
    """A replication offset out of INFO replication's text."""
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value)
    raise AssertionError(f"no {field} in INFO replication")


def start_sentinel(*, down_after_ms: int = 400) -> SentinelServers:
    """Start a master, a replica of it and a sentinel (quorum 1) with a quick failover."""
    # no 5 s pause before the first (diskless) sync to the replica
    master = start_redis(extra=("--repl-diskless-sync-delay", "0"))
    replica = start_redis(extra=("--replicaof", "127.0.0.1", str(master.port),
                                 "--repl-diskless-sync-delay", "0"))
    port = free_port()
    config = master.directory / "sentinel.conf"  # the sentinel rewrites its config file
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {master.directory}\n"
        f"sentinel monitor rk 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds rk {down_after_ms}\n"
        "sentinel failover-timeout rk 2000\n"
        "sentinel parallel-syncs rk 1\n"
    )
    sentinel = subprocess.Popen([redis_server_binary(), str(config), "--sentinel",
                                 "--loglevel", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = SentinelServers(master, replica, sentinel, port)
    deadline = time.monotonic() + 15
    while True:
        try:
            if (servers.master_port() == master.port
                    and "master_link_status:up" in replica.cli("INFO", "replication")
                    and str(replica.port) in servers.cli("replicas")):
                return servers
        except (subprocess.CalledProcessError, IndexError, ValueError):
            pass
        if time.monotonic() > deadline:
            servers.stop()
            raise RuntimeError("the sentinel did not see the master and its replica in 15 s")
        time.sleep(0.05)

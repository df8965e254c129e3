"""The processes a bench run starts and stops: redis-server, ratekeeper, the ceiling, wrk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.redis_servers import RedisServer, free_port, start_redis  # noqa: E402

__all__ = ["HERE", "ROOT", "RedisServer", "Server", "free_port", "http_json", "run_wrk",
           "start_ceiling", "start_ratekeeper", "start_redis"]


@dataclass
class Server:
    """An HTTP server process we started (ratekeeper or the ceiling)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _start(name: str, args: Sequence[str], port: int, env: dict[str, str], ready: str,
           workers: int) -> Server:
    log = Path(tempfile.mkdtemp(prefix=f"rk-bench-{name}-")) / "out.log"
    process = subprocess.Popen(list(args), env={**os.environ, **env}, cwd=ROOT,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Server(name=name, port=port, process=process, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(server.url + ready, timeout=1) as resp:
                if resp.status == 200:
                    # every worker binds its own SO_REUSEPORT socket: give the rest a moment
                    time.sleep(0.3 * workers)
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{name} did not become ready: {log.read_text()}")


def start_ratekeeper(config: Path, redis_url: str, workers: int, *, salt: str,
                     prefix: str = "rk") -> Server:
    """``ratekeeper serve`` with ``workers`` workers on a free port, ready when /readyz is."""
    port = free_port()
    env = {"RATEKEEPER_REDIS_URL": redis_url, "RATEKEEPER_IP_SALT": salt,
           "RATEKEEPER_KEY_PREFIX": prefix}
    args = [sys.executable, "-m", "ratekeeper", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    return _start("ratekeeper", args, port, env, "/readyz", workers)


def start_ceiling(workers: int, body_size: int) -> Server:
    """The bare aiohttp ceiling server with ``workers`` workers."""
    port = free_port()
    args = [sys.executable, str(HERE / "ceiling.py"), "--port", str(port),
            "--workers", str(workers), "--body-size", str(body_size)]
    return _start("ceiling", args, port, {}, "/healthz", workers)


def http_json(url: str, body: Any = None, *, method: str | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """One JSON request with the standard library: status, decoded body, headers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None, dict(exc.headers)


def wrk_binary() -> str:
    """The wrk on this machine (``make bench`` installs Debian's)."""
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: run `make bench`, which installs it")
    return found


def run_wrk(url: str, *, seconds: float, connections: int, threads: int,
            script_args: Sequence[str]) -> dict[str, Any]:
    """Run wrk with loadtest/wrk/check.lua; its summary as a dict (requests, rps, latency)."""
    args = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
            "--timeout", "5s", "-s", str(HERE / "wrk" / "check.lua"), url, "--",
            *script_args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60,
                         check=True).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            summary: dict[str, Any] = json.loads(line[len("WRKJSON "):])
            seconds_run = summary["duration_us"] / 1e6
            summary["rps"] = summary["requests"] / seconds_run
            # answers Redis decided (a degraded answer is the fail mode's, not a decision)
            summary["decided_per_s"] = (summary["decisions"] - summary["degraded"]) / seconds_run
            summary["errors"] = sum(summary[k] for k in
                                    ("connect", "read", "write", "status", "timeout"))
            return summary
    raise RuntimeError(f"wrk printed no summary:\n{out}")

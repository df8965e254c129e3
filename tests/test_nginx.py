"""End to end: a real nginx (examples/nginx.conf) in front of a dummy origin, asking ratekeeper.

nginx, `ratekeeper serve` and the origin are started on free loopback ports with their own
temporary prefix, config, pid and logs, and stopped after. Clients get distinct addresses by
binding to 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback on Linux).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from support.common import ROOT, SALT
from support.processes import ServerProcess
from support.redis_servers import RedisServer, free_port, stop_process

EXAMPLE = ROOT / "examples" / "nginx.conf"
CONFIG = """
[rules.upload-ip]
limit = "3 per minute"
key = ["ip"]
[actions.upload-edge]
rules = ["upload-ip"]

[[routes]]
method = "POST"
path = "/legacy/*"
action = "upload-edge"
"""


def nginx_binary() -> str:
    """Debian's nginx (``make test`` installs it)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: run `make test`, which installs it")
    return found


class Origin(ThreadingHTTPServer):
    """The app behind nginx: answers every request with 200 and remembers what it saw."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                origin.seen.append((self.command, self.path, self.headers.get("X-Real-IP")))
                body = b"origin says hello"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = int(self.server_address[1])


@pytest.fixture
def origin() -> Iterator[Origin]:
    """The dummy origin on a free port, in a thread."""
    server = Origin()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sidecar(serve_process: Callable[..., ServerProcess], redis_server: RedisServer,
            key_prefix: str) -> ServerProcess:
    """A real `ratekeeper serve` on the session's Redis."""
    return serve_process(CONFIG, {"RATEKEEPER_REDIS_URL": redis_server.url,
                                  "RATEKEEPER_IP_SALT": SALT.decode(),
                                  "RATEKEEPER_KEY_PREFIX": key_prefix})


def site_config(rk_port: int, origin_port: int, listen_port: int) -> str:
    """examples/nginx.conf with our ports in place of its placeholders."""
    text = EXAMPLE.read_text()
    for old, new in (("server 127.0.0.1:8080;", f"server 127.0.0.1:{rk_port};"),
                     ("server 127.0.0.1:8000;", f"server 127.0.0.1:{origin_port};"),
                     ("listen 80;", f"listen 127.0.0.1:{listen_port};")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


@pytest.fixture
def nginx(tmp_path: Path, sidecar: ServerProcess, origin: Origin) -> Iterator[int]:
    """nginx with the example site on a free port; its port."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    (prefix / "ratekeeper.conf").write_text(site_config(sidecar.port, origin.port, port))
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(f"""
pid {prefix / 'nginx.pid'};
events {{ worker_connections 256; }}
http {{
    access_log {prefix / 'access.log'};
{temp}
    include {prefix / 'ratekeeper.conf'};
}}
""")
    error_log = prefix / "error.log"
    process = subprocess.Popen(
        [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-e", str(error_log), "-g", "daemon off; master_process off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {error_log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {error_log.read_text()}") from None
                time.sleep(0.02)
        yield port
    finally:
        stop_process(process)


def request(port: int, method: str, path: str, client: str,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to nginx from the loopback address ``client``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(client, 0))
    try:
        conn.request(method, path, body=b"file=x" if method == "POST" else None,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_nginx_enforces_the_limit_per_client(nginx: int, origin: Origin) -> None:
    """Over its limit a client gets nginx's 429 with Retry-After; others and other paths pass."""
    for left in (2, 1, 0):
        status, headers, body = request(nginx, "POST", "/legacy/", "127.0.0.2")
        assert (status, body) == (200, b"origin says hello")
        assert headers["ratelimit-policy"] == '"upload-ip";q=3;w=60'
        assert headers["ratelimit"].startswith(f'"upload-ip";r={left};')
    status, headers, body = request(nginx, "POST", "/legacy/?again", "127.0.0.2")
    assert status == 429
    assert 0 < int(headers["retry-after"]) <= 60
    assert headers["ratelimit"].startswith('"upload-ip";r=0;')
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 429 and problem["type"].endswith("#quota-exceeded")
    assert problem["detail"].startswith("Too many requests: retry in ")
    assert len(origin.seen) == 3
    # another client still passes
    assert request(nginx, "POST", "/legacy/", "127.0.0.3")[0] == 200
    # unrouted paths and methods pass without being counted or limited
    for method, path in (("GET", "/legacy/"), ("GET", "/simple/numpy/"), ("POST", "/pypi")):
        status, headers, _ = request(nginx, method, path, "127.0.0.2")
        assert status == 200 and "ratelimit" not in headers
    assert [ip for _, _, ip in origin.seen] == ["127.0.0.2"] * 3 + ["127.0.0.3"] + \
        ["127.0.0.2"] * 3


def test_client_x_forwarded_for_does_not_change_the_bucket(nginx: int, origin: Origin) -> None:
    """A client that sends a fresh X-Forwarded-For (or X-Real-IP) each time is still limited."""
    statuses = [request(nginx, "POST", "/legacy/", "127.0.0.4",
                        {"X-Forwarded-For": f"198.51.100.{i}", "X-Real-IP": f"203.0.113.{i}"})[0]
                for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert request(nginx, "POST", "/legacy/", "127.0.0.5",
                   {"X-Forwarded-For": "127.0.0.4"})[0] == 200


def test_nginx_fails_open_when_ratekeeper_is_down(nginx: int, origin: Origin,
                                                  sidecar: ServerProcess) -> None:
    """With the sidecar stopped, nginx passes requests on to the origin (fail open)."""
    sidecar.stop()
    status, headers, body = request(nginx, "POST", "/legacy/", "127.0.0.6")
    assert (status, body) == (200, b"origin says hello")
    assert "ratelimit" not in headers and "retry-after" not in headers
    assert origin.seen == [("POST", "/legacy/", "127.0.0.6")]


def test_readme_shows_the_tested_snippet() -> None:
    """The integration guide's nginx block is examples/nginx.conf without its header comment."""
    lines = EXAMPLE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    readme = (ROOT / "docs" / "integration.md").read_text()
    block = readme.split("```nginx\n", 1)[1].split("```", 1)[0]
    assert block == "\n".join(lines[start:]).rstrip() + "\n"

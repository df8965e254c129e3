"""Helpers for the connection-edge tests: raw HTTP exchanges, the guarded server in-process,
and `ratekeeper serve` started without waiting for it (or under a low descriptor limit)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ratekeeper.app import create_app
from ratekeeper.process.accept import AcceptShare, AcceptSlots, BalancedSite
from ratekeeper.server.guard import ANSWERS_LOG, Answered, Gate, hush_client_gone
from ratekeeper.server.hot import HotLane
from ratekeeper.settings import Settings

from support.common import TEST_DEADLINE_MS, config_from
from support.redis_servers import free_port, stop_process

CLOSED = b""  # what reading a closed connection gives


@dataclass
class Reply:
    """The first HTTP response read from a connection."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw: bytes  # everything read, this response and what followed it


def parse_reply(raw: bytes) -> Reply:
    """The first response in ``raw`` (which must hold all of it)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    return Reply(status, headers, rest[:length], raw)


async def read_to_end(reader: asyncio.StreamReader, wait: float = 10.0) -> bytes:
    """Everything until the server closes the connection (at most ``wait`` seconds)."""
    chunks = []
    async with asyncio.timeout(wait):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; all the server sends until it closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_to_end(reader, wait)
    finally:
        writer.close()


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response from a connection that stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    reply = parse_reply(head)
    body = await reader.readexactly(int(reply.headers.get("content-length", "0")))
    return Reply(reply.status, reply.headers, body, head + body)


def post(path: str, body: bytes, *extra: str) -> bytes:
    """A POST request's bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: ratekeeper", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str) -> bytes:
    """A GET request's bytes."""
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: ratekeeper", *extra]) + "\r\n\r\n"
            ).encode()


@dataclass
class Guarded:
    """The app served as `ratekeeper serve` serves it (a gate, a balanced site), in-process."""

    port: int
    gate: Gate
    app: web.Application


@asynccontextmanager
async def guarded_server(settings: Settings, config_text: str, *, timeout: float = 10.0,
                         limit: int = 1000) -> AsyncIterator[Guarded]:
    """Serve ``config_text`` on a free port of 127.0.0.1 behind a Gate."""
    hush_client_gone()
    app = create_app(settings, config_from(config_text))
    runner = web.AppRunner(app, access_log_class=Answered, access_log=ANSWERS_LOG)
    await runner.setup()
    assert runner.server is not None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    slots = AcceptSlots(1, multiprocessing.get_context("spawn"))
    gate = Gate(runner.server, request_timeout=timeout, limit=limit, lane=HotLane(app))
    site = BalancedSite(runner, sock, AcceptShare(slots, 0), gate)
    await site.start()
    try:
        yield Guarded(sock.getsockname()[1], gate, app)
    finally:
        slots.stop_all()
        await site.stop()
        await gate.close_lane(5.0)
        await runner.cleanup()
        gate.stop()


class Launched:
    """`ratekeeper serve` on a free port, not waited for; optionally under an
    RLIMIT_NOFILE of ``files``."""

    def __init__(self, directory: Path, config_text: str, env: dict[str, str], *,
                 workers: int = 1, files: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / f"edge-{self.port}.toml"
        config.write_text(config_text)
        self.log = directory / f"edge-{self.port}.log"
        self._log_file = self.log.open("wb")
        full_env = {**os.environ, "RATEKEEPER_REDIS_TIMEOUT_MS": str(TEST_DEADLINE_MS), **env}
        limit: Callable[[], None] | None = None
        if files is not None:
            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ratekeeper", "serve", "--config", str(config),
             "--port", str(self.port), "--workers", str(workers)],
            env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT, preexec_fn=limit)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> None:
        """Wait until a line of the log matches ``pattern`` (a regex)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in:\n{self.text()}")
            time.sleep(0.05)

    def wait_serving(self) -> None:
        """Wait until a worker says it serves."""
        self.wait_for_log(r"worker pid \d+ serving")

    def stop(self) -> str:
        stop_process(self.process, timeout=20)
        self._log_file.close()
        return self.text()

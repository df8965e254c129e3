"""A worker warms up before it serves (`ratekeeper.server.warmup`), and /readyz answers 200 only
while every worker of the server is warm and accepting: real `ratekeeper serve` processes
against a real Redis that is started late, never started, or a worker that is stopped."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import socket
import time
from pathlib import Path

import msgspec
import pytest

from ratekeeper.process.accept import AcceptShare, AcceptSlots

from support.common import ONE_RULE, SALT
from support.edge import Launched, exchange, get, parse_reply, post, read_reply
from support.redis_servers import RedisServer, free_port, start_redis

pytestmark = pytest.mark.slow

RULES = ONE_RULE.format(limit="100 per minute", algorithm="sliding-log")
CHECK = b'{"action": "a", "ip": "192.0.2.44"}'


def env_for(url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    return {"RATEKEEPER_REDIS_URL": url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": key_prefix, **extra}


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on ``port`` (the kernel takes connections for it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    reply = parse_reply(await exchange(port, get("/readyz", "Connection: close")))
    return reply.status, msgspec.json.decode(reply.body)


async def until_ready(port: int, status: int, timeout: float = 20.0) -> dict[str, object]:
    """Ask /readyz until it answers ``status``; its body then."""
    async with asyncio.timeout(timeout):
        while True:
            answer, body = await readyz(port)
            if answer == status:
                return body
            await asyncio.sleep(0.05)


def test_the_slots_say_why_the_server_is_not_ready() -> None:
    """Ready needs as many warm, accepting, live workers as the server runs."""
    slots = AcceptSlots(3, multiprocessing.get_context("spawn"), workers=2)
    first, second = AcceptShare(slots, 0), AcceptShare(slots, 1)
    assert slots.unready() == "0 of 2 workers are warm and accepting"
    first.start()
    second.start()
    assert slots.unready() == "0 of 2 workers are warm and accepting"  # accepting, still cold
    first.warmed()
    second.warmed()
    assert slots.unready() is None
    second.stop()  # draining
    assert slots.unready() == "1 of 2 workers are warm and accepting"
    spare = AcceptShare(slots, 2)  # a rolling restart's fresh worker
    spare.start()
    spare.warmed()
    assert slots.unready() is None
    slots.stop_all()
    assert slots.unready() == "the server is stopping"


async def test_a_worker_takes_no_connection_before_redis_answers(
        tmp_path: Path, key_prefix: str) -> None:
    """Redis is not there when the worker starts: a request sent meanwhile waits, unanswered,
    and once Redis is started it is answered by a warm worker: /readyz 200 at once."""
    redis_port = free_port()
    server = Launched(tmp_path, RULES, env_for(f"redis://127.0.0.1:{redis_port}/0", key_prefix,
                                               RATEKEEPER_WARMUP_MS="60000"))
    redis: RedisServer | None = None
    try:
        wait_listening(server.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/readyz"))
        early = asyncio.ensure_future(read_reply(reader))
        done, _ = await asyncio.wait([early], timeout=1.0)
        assert not done  # (a worker serving cold would have answered, 503)
        redis = start_redis(port=redis_port)
        async with asyncio.timeout(30):
            reply = await early
        writer.close()
        assert reply.status == 200, reply.body
    finally:
        log = server.stop()
        if redis is not None:
            redis.stop()
    assert "Traceback" not in log


async def test_after_its_warm_up_limit_a_worker_serves_anyway_and_says_so(
        tmp_path: Path, key_prefix: str) -> None:
    """Redis never comes within the warm-up limit: the worker serves (the fail mode decides,
    and says so), warns in its log, and /readyz says 503 and why; when Redis comes, the worker
    warms and /readyz says 200."""
    redis_port = free_port()
    server = Launched(tmp_path, RULES, env_for(f"redis://127.0.0.1:{redis_port}/0", key_prefix,
                                               RATEKEEPER_WARMUP_MS="300"))
    redis: RedisServer | None = None
    try:
        server.wait_serving()
        assert re.search(r"WARNING .*not ready after the 0.3 s warm-up; serving anyway",
                         server.text())
        reply = parse_reply(await exchange(server.port, post("/v1/check", CHECK,
                                                             "Connection: close")))
        assert reply.status == 200 and msgspec.json.decode(reply.body)["degraded"]
        status, body = await readyz(server.port)
        assert status == 503 and body["status"] == "unavailable" and body["reason"]
        redis = start_redis(port=redis_port)
        body = await until_ready(server.port, 200)
        assert body["status"] == "ready" and body["reason"] is None
    finally:
        log = server.stop()
        if redis is not None:
            redis.stop()
    assert "Traceback" not in log


async def test_readyz_is_503_while_one_of_two_workers_is_stopped(
        tmp_path: Path, redis_server: RedisServer, key_prefix: str) -> None:
    """Two warm workers: 200. One stopped (SIGSTOP; stuck in real life): the other answers
    503, saying that 1 of 2 workers is warm and accepting. Resumed: 200 again."""
    server = Launched(tmp_path, RULES, env_for(redis_server.url, key_prefix), workers=2)
    try:
        server.wait_for_log(r"supervisor pid \d+: 2 workers serving")
        await until_ready(server.port, 200)
        pids = [int(p) for p in re.findall(r"worker pid (\d+) serving", server.text())]
        os.kill(pids[0], signal.SIGSTOP)
        try:
            body = await until_ready(server.port, 503)
            assert body["reason"] == "1 of 2 workers are warm and accepting"
        finally:
            os.kill(pids[0], signal.SIGCONT)
        await until_ready(server.port, 200)
    finally:
        log = server.stop()
    assert "Traceback" not in log

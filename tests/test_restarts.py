"""Restarts and reloads of real `ratekeeper serve` processes: SIGTERM drains in-flight requests,
a rolling restart (SIGUSR2) under load fails no request, SIGHUP swaps the whole rule set or,
when the new file is bad, keeps the last good one and logs why."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.common import SALT
from support.edge import post, read_to_end
from support.processes import ServerProcess
from support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

RULES = """
[rules.r]
limit = "{limit} per minute"
key = ["ip"]
[actions.a]
rules = ["r"]
"""

RULES_WITH_NEW_ACTION = RULES + """
[rules.new]
limit = "3 per minute"
key = ["user"]
[actions.b]
rules = ["new"]
"""


def env_for(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"RATEKEEPER_REDIS_URL": url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": prefix, **extra}


def wait_for_log(server: ServerProcess, pattern: str, count: int = 1,
                 timeout: float = 30.0) -> list[str]:
    """Wait until ``pattern`` (a regex) has matched ``count`` log lines; those lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log.read_text().splitlines()
                 if re.search(pattern, line)]
        if len(lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {pattern!r} in:\n{server.log.read_text()}")
        time.sleep(0.05)


async def check(session: aiohttp.ClientSession, server: ServerProcess,
                **body: Any) -> tuple[int, Any]:
    async with session.post(f"{server.url}/v1/check", json=body) as resp:
        return resp.status, await resp.json()


async def first_answers(enough: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait while load starts until ``enough()``, or ``timeout`` seconds (the test's own
    assertions then say what was missing): a busy machine is slow to answer the first
    requests, so no fixed sleep fits every run."""
    deadline = time.monotonic() + timeout
    while not enough() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_sigterm_drains_a_request_in_flight(serve_process: Callable[..., ServerProcess],
                                                  lone_redis: RedisServer,
                                                  key_prefix: str) -> None:
    """A request waiting on Redis when SIGTERM arrives still gets its normal answer, the
    server takes no new connection meanwhile, and it exits 0 once the request is done."""
    server = serve_process(RULES.format(limit=5), env_for(
        lone_redis.url, key_prefix, RATEKEEPER_REDIS_TIMEOUT_MS="5000"))
    async with aiohttp.ClientSession() as session:
        assert (await check(session, server, action="a", ip="192.0.2.1"))[0] == 200
        lone_redis.pause()
        in_flight = asyncio.ensure_future(check(session, server, action="a", ip="192.0.2.1"))
        await asyncio.sleep(0.3)  # the request is now waiting on the paused Redis
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "draining")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as other:
                await check(other, server, action="a", ip="192.0.2.2")
        assert server.process.poll() is None  # still waiting for the request
        lone_redis.resume()
        status, body = await in_flight
    assert status == 200 and body["allowed"] and not body["degraded"]
    assert body["limits"][0]["remaining"] == 3
    assert server.process.wait(15) == 0


async def test_rolling_restart_under_load_fails_no_request(
        serve_process: Callable[..., ServerProcess], redis_server: RedisServer,
        key_prefix: str) -> None:
    """SIGUSR2 replaces both workers one at a time while 16 clients keep checking: every
    request gets a 200 decision from Redis, and afterwards only new workers answer."""
    # a deadline that the CPU load of spawning workers on a small test machine cannot miss:
    # this test is about connections, not about Redis being slow
    server = serve_process(RULES.format(limit=1_000_000), env_for(
        redis_server.url, key_prefix, RATEKEEPER_REDIS_TIMEOUT_MS="2000"), workers=2)
    wait_for_log(server, r"supervisor pid \d+: 2 workers serving")
    old_pids = {int(p) for p in re.findall(r"worker pid (\d+) serving",
                                           server.log.read_text())}
    statuses: list[int] = []
    degraded: list[bool] = []
    failures: list[BaseException] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        while not done.is_set():
            try:
                status, body = await check(session, server, action="a", ip=f"192.0.2.{n}")
                statuses.append(status)
                degraded.append(body["degraded"])
            except Exception as exc:  # any failed request fails the test below
                failures.append(exc)

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.ensure_future(client(session, n)) for n in range(16)]
        await first_answers(lambda: len(statuses) >= 16 or bool(failures))
        before = len(statuses)
        server.process.send_signal(signal.SIGUSR2)
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for_log, server, "rolling restart done")
        during = len(statuses) - before
        await asyncio.sleep(0.3)
        done.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert set(statuses) == {200} and before > 0 and during > 0
    assert not any(degraded)
    replaced = re.findall(r"worker pid (\d+) replaces pid (\d+)", server.log.read_text())
    assert {int(old) for _, old in replaced} == old_pids
    for _, old in replaced:
        assert not Path(f"/proc/{old}").exists()
    for new, _ in replaced:
        assert Path(f"/proc/{new}").exists()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_swaps_the_rules_and_keeps_them_when_the_file_is_bad(
        serve_process: Callable[..., ServerProcess], redis_server: RedisServer,
        key_prefix: str, workers: int) -> None:
    """SIGHUP loads a changed limit and a new action together; a broken file then leaves
    them in place, with the error logged."""
    server = serve_process(RULES.format(limit=5), env_for(redis_server.url, key_prefix),
                           workers=workers)
    if workers > 1:
        wait_for_log(server, r"2 workers serving")
    config = server.config_path
    async with aiohttp.ClientSession() as session:
        _, body = await check(session, server, action="a", ip="192.0.2.1")
        assert body["limits"][0]["limit"] == 5
        config.write_text(RULES_WITH_NEW_ACTION.format(limit=7))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for_log(server, "reload: now serving", count=workers)
        for i in range(2 * workers + 2):  # whichever worker answers
            _, body = await check(session, server, action="a", ip=f"192.0.2.{i + 10}")
            assert body["limits"][0]["limit"] == 7
            status, body = await check(session, server, action="b", user=f"u{i}")
            assert status == 200 and body["limits"][0]["limit"] == 3

        config.write_text(RULES.format(limit="seven") + "\n[bogus]\n")
        os.kill(server.process.pid, signal.SIGHUP)
        errors = wait_for_log(server, "ERROR .*reload: .*(invalid|limit)")
        assert any(str(config) in line for line in errors)
        await asyncio.sleep(0.2)  # give every worker the time a reload would have taken
        for i in range(2 * workers + 2):
            _, body = await check(session, server, action="a", ip=f"192.0.2.{i + 30}")
            assert body["limits"][0]["limit"] == 7
            assert (await check(session, server, action="b", user=f"v{i}"))[0] == 200
    assert "Traceback" not in server.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_refuses_new_connections_and_resets_none(
        serve_process: Callable[..., ServerProcess], redis_server: RedisServer,
        key_prefix: str, workers: int) -> None:
    """16 clients open a connection per check while SIGTERM stops the server: every request
    sent is answered, and a connection tried once the server has stopped accepting is
    refused at once, never taken and then reset."""
    server = serve_process(RULES.format(limit=1_000_000), env_for(
        redis_server.url, key_prefix, RATEKEEPER_REDIS_TIMEOUT_MS="2000"), workers=workers)
    if workers > 1:
        wait_for_log(server, r"supervisor pid \d+: 2 workers serving")
    request = post("/v1/check", b'{"action": "a", "ip": "192.0.2.9"}', "Connection: close")
    answered, refused = [0], [0]
    failures: list[str] = []
    done = asyncio.Event()

    async def client() -> None:
        while not done.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            except (ConnectionRefusedError, ConnectionResetError):
                # (a connection still in the queue when the socket closed is reset before it
                # was taken: refused as well, before any request went out)
                refused[0] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                writer.write(request)
                raw = await read_to_end(reader, wait=20)
                if raw.startswith(b"HTTP/1.1 200 "):
                    answered[0] += 1
                else:
                    failures.append(f"answer {raw[:40]!r}")
            except OSError as exc:  # reset, or anything else after the request went out
                failures.append(type(exc).__name__)
            finally:
                writer.close()
            # a few hundred connections a second: a steady load, not one that starves the last
            # worker of CPU between its final accept and its close (the one moment, inherent
            # in a kernel accept queue, in which a connection can still be queued and reset)
            await asyncio.sleep(0.02)

    clients = [asyncio.ensure_future(client()) for _ in range(16)]
    await first_answers(lambda: answered[0] >= 16 or bool(failures))
    before = answered[0]
    server.process.send_signal(signal.SIGTERM)
    code = await asyncio.get_running_loop().run_in_executor(None, server.process.wait, 30)
    await asyncio.sleep(0.2)  # clients now meet a closed port
    done.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert code == 0 and before > 0 and refused[0] > 0

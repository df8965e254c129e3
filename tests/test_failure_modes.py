"""Redis down, stopped, slow or restarted: every answer is a 200 decided by the rules' fail
modes within about the deadline, the circuit breaker stops waiting and probes for Redis's
return, /readyz says so, and decisions are normal again soon after Redis is back. Each test
has its own redis-server, which it stops, pauses or restarts."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from ratekeeper.settings import Settings
from ratekeeper.storage.breaker import Breaker

from support.common import SALT
from support.redis_servers import RedisServer

CONFIG = """
[rules.soft]
limit = "100 per minute"
key = ["ip"]
[rules.hard]
limit = "100 per minute"
key = ["ip"]
fail = "closed"
[actions.open]
rules = ["soft"]
[actions.closed]
rules = ["soft", "hard"]
"""

DEADLINE_MS = 50
# a bound far above the deadline and far below anything a missing deadline would take (a
# stopped Redis never answers, and the socket timeouts are deadline + 1 s)
PROMPT = 0.6


class Clock:
    """Seconds that move only when the test moves them."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_only() -> None:
    """Failures in a row open the circuit; a success in between starts the count again."""
    breaker = Breaker(threshold=3, cooldown=1.0, clock=Clock())
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()


def test_breaker_half_open_lets_exactly_one_probe_through() -> None:
    """After the cooldown one call probes; others still fail fast; its verdict decides."""
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=0.5, clock=clock)
    breaker.failure()
    clock.now += 0.49
    assert not breaker.allow()
    clock.now += 0.01
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow()
    breaker.failure()  # the probe failed: open for another cooldown
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_breaker_cancelled_probe_lets_the_next_call_probe() -> None:
    """A probe that ends without a verdict (cancelled) does not leave the circuit stuck."""
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=0.5, clock=clock)
    breaker.failure()
    clock.now += 0.5
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()


@pytest.fixture
def lone_settings(lone_redis: RedisServer, key_prefix: str) -> Settings:
    """Settings for the test's own redis-server with the default 50 ms deadline."""
    return Settings(redis_url=lone_redis.url, ip_salt=SALT, key_prefix=key_prefix,
                    redis_timeout_ms=DEADLINE_MS)


async def timed_check(client: Any, action: str, ip: str = "192.0.2.1") -> tuple[float, Any]:
    started = time.monotonic()
    resp = await client.post("/v1/check", json={"action": action, "ip": ip})
    elapsed = time.monotonic() - started
    assert resp.status == 200
    return elapsed, await resp.json()


async def wait_until(predicate: Callable[[], Any], timeout: float) -> float:
    """Poll an async predicate every 20 ms; the seconds it took to hold."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_redis_down_each_rule_fail_mode_decides(make_client: Any, lone_redis: RedisServer,
                                                      lone_settings: Settings) -> None:
    """Redis stopped: fail-open rules allow, a fail-closed rule denies, both say degraded;
    /healthz still answers and /readyz is 503."""
    client = await make_client(CONFIG, app_settings=lone_settings)
    _, normal = await timed_check(client, "open")
    assert normal["allowed"] and not normal["degraded"]
    lone_redis.stop()
    for _ in range(8):  # past the breaker's threshold: the answers stay the same
        elapsed, soft = await timed_check(client, "open")
        assert elapsed < PROMPT
        assert soft["allowed"] and soft["degraded"] and soft["reason"] is None
        elapsed, hard = await timed_check(client, "closed")
        assert elapsed < PROMPT
        assert not hard["allowed"] and hard["degraded"] and hard["reason"] == "rate_limited"
        assert hard["retry_after"] == 1
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["breaker"] == "open"


async def test_paused_redis_degrades_within_the_deadline_then_recovers(
        make_client: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """SIGSTOP: answers come within about the deadline, degraded, then at once once the
    circuit opens; after SIGCONT decisions are normal again within about a second."""
    client = await make_client(CONFIG, app_settings=lone_settings)
    assert not (await timed_check(client, "open"))[1]["degraded"]
    lone_redis.pause()
    for _ in range(10):
        elapsed, body = await timed_check(client, "open")
        assert elapsed < PROMPT and body["degraded"] and body["allowed"]
    assert (await client.get("/readyz")).status == 503
    lone_redis.resume()

    async def normal() -> bool:
        return not (await timed_check(client, "open"))[1]["degraded"]

    # the circuit probes every 0.5 s; a second is the promise, two the test's margin
    assert await wait_until(normal, timeout=2.0) < 2.0
    assert (await client.get("/readyz")).status == 200


async def test_deadline_covers_connecting(make_client: Any, lone_redis: RedisServer,
                                          lone_settings: Settings) -> None:
    """A Redis stopped before the first connection: the kernel completes the TCP handshake,
    the client's handshake commands hang, and the deadline still bounds the answer."""
    lone_redis.pause()
    client = await make_client(CONFIG, app_settings=lone_settings)
    elapsed, body = await timed_check(client, "closed")
    assert elapsed < PROMPT and body["degraded"] and not body["allowed"]


async def test_slow_redis_debug_sleep_gives_degraded_answers(
        make_client: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """While Redis is busy (DEBUG SLEEP 1) checks are answered degraded within the deadline,
    and normally once it is done."""
    client = await make_client(CONFIG, app_settings=lone_settings)
    assert not (await timed_check(client, "open"))[1]["degraded"]
    sleeper = subprocess.Popen(["redis-cli", "-p", str(lone_redis.port), "DEBUG", "SLEEP", "1"],
                               stdout=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.1)  # let the DEBUG SLEEP reach the server first
        elapsed, body = await timed_check(client, "open")
        assert elapsed < PROMPT and body["degraded"]
    finally:
        sleeper.wait(10)

    async def normal() -> bool:
        return not (await timed_check(client, "open"))[1]["degraded"]

    await wait_until(normal, timeout=2.0)


async def test_restarted_redis_is_used_again(make_client: Any, lone_redis: RedisServer,
                                             lone_settings: Settings) -> None:
    """After a Redis restart the pooled connections are dead; decisions are normal again at
    once (a broken connection is retried), and counting starts over (no persistence)."""
    client = await make_client(CONFIG, app_settings=lone_settings)
    for expected in (99, 98):
        assert (await timed_check(client, "open"))[1]["limits"][0]["remaining"] == expected
    lone_redis.restart()
    _, body = await timed_check(client, "open")
    assert not body["degraded"] and body["limits"][0]["remaining"] == 99


async def test_no_5xx_when_redis_dies_under_load(make_client: Any, lone_redis: RedisServer,
                                                 lone_settings: Settings) -> None:
    """300 concurrent checks while Redis is killed mid-way: every one is a 200 decision."""
    client = await make_client(CONFIG, app_settings=lone_settings)

    async def one(i: int) -> tuple[int, Any]:
        resp = await client.post("/v1/check", json={"action": "closed" if i % 2 else "open",
                                                    "ip": f"198.51.100.{i % 200}"})
        return resp.status, await resp.json()

    tasks = [asyncio.ensure_future(one(i)) for i in range(300)]
    await asyncio.sleep(0.01)
    lone_redis.kill()
    results = await asyncio.gather(*tasks)
    assert {status for status, _ in results} == {200}
    assert all(set(body) >= {"allowed", "degraded"} for _, body in results)
    status, after = await one(1)
    assert status == 200 and after["degraded"] and not after["allowed"]

"""`ratekeeper serve` as a real process: 2-worker exactness, embedded mode, start-up checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import aiohttp

from support.redis_servers import RedisServer

HOT = """
[rules.hot]
limit = "50 per minute"
key = ["ip"]
[actions.a]
rules = ["hot"]
"""


async def fire(url: str, n: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    """n concurrent checks, each on its own connection."""
    connector = aiohttp.TCPConnector(limit=n, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> dict[str, Any]:
            async with session.post(f"{url}/v1/check", json=body) as resp:
                assert resp.status == 200
                result: dict[str, Any] = await resp.json()
                return result

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_400_concurrent_checks_with_2_workers_admit_exactly_50(
        serve_process: Any, redis_server: RedisServer, key_prefix: str) -> None:
    """Two worker processes on one port, one Redis: exactly the limit is admitted."""
    # A generous deadline: this checks exactness, not the fail-open answer a 400-request
    # burst on two cores would otherwise get once the 50 ms default passes.
    server = serve_process(HOT, {"RATEKEEPER_REDIS_URL": redis_server.url,
                                 "RATEKEEPER_IP_SALT": "a-salt-for-the-exactness-test",
                                 "RATEKEEPER_KEY_PREFIX": key_prefix,
                                 "RATEKEEPER_REDIS_TIMEOUT_MS": "5000"}, workers=2)
    results = await fire(server.url, 400, {"action": "a", "ip": "198.51.100.23"})
    assert not any(r["degraded"] for r in results)
    allowed = [r for r in results if r["allowed"]]
    assert len(allowed) == 50
    assert sorted(r["limits"][0]["remaining"] for r in allowed) == list(range(50))
    assert all(r["reason"] == "rate_limited" for r in results if not r["allowed"])


async def test_embedded_mode_answers_the_walk_without_redis(serve_process: Any) -> None:
    """No RATEKEEPER_REDIS_URL: memory:// answers the 5-per-minute walk, with a warning."""
    env = {"RATEKEEPER_REDIS_URL": "", "RATEKEEPER_IP_SALT": ""}
    server = serve_process(HOT.replace("50 per minute", "5 per minute"), env)
    async with aiohttp.ClientSession() as session:
        remaining = []
        for _ in range(6):
            async with session.post(f"{server.url}/v1/check",
                                    json={"action": "a", "ip": "2001:db8::1"}) as resp:
                body = await resp.json()
                remaining.append(body["limits"][0]["remaining"] if body["allowed"] else None)
                last = resp
        assert remaining == [4, 3, 2, 1, 0, None]
        assert int(last.headers["Retry-After"]) > 0
        async with session.get(f"{server.url}/readyz") as resp:
            assert (await resp.json())["store"] == "memory"
    log = server.stop()
    assert "memory://" in log and "neither shared" in log
    assert "2001:db8" not in log


def test_serve_refuses_a_real_redis_without_salt(tmp_path: Any,
                                                 redis_server: RedisServer) -> None:
    """With RATEKEEPER_REDIS_URL set and no salt, serve exits non-zero and says why."""
    config = tmp_path / "c.toml"
    config.write_text(HOT)
    env = {**os.environ, "RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": ""}
    out = subprocess.run([sys.executable, "-m", "ratekeeper", "serve", "--config", str(config),
                          "--port", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "RATEKEEPER_IP_SALT is required" in out.stderr


def test_memory_mode_refuses_several_workers(tmp_path: Any) -> None:
    """memory:// state lives in one process, so --workers 2 is refused."""
    config = tmp_path / "c.toml"
    config.write_text(HOT)
    env = {**os.environ, "RATEKEEPER_REDIS_URL": ""}
    out = subprocess.run([sys.executable, "-m", "ratekeeper", "serve", "--config", str(config),
                          "--workers", "2", "--port", "1"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0
    assert "--workers 1" in out.stderr

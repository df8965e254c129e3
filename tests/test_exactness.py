"""Zero over-admission on a hot key: 400 concurrent checks against a limit of 50 admit exactly
50, with 2 workers, with 2 instances on one Redis, and on a Redis Cluster (where the action's
two rules live in different slots and denied requests are refunded)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from support.common import SALT
from support.processes import ServerProcess
from support.redis_servers import ClusterServers, RedisServer

pytestmark = pytest.mark.slow

LIMIT, REQUESTS = 50, 400

HOT = f"""
[rules.hot-ip]
limit = "{LIMIT} per hour"
key = ["ip"]
fail = "closed"
[rules.user]
limit = "1000 per hour"
key = ["user"]
fail = "closed"
[actions.hot]
rules = ["hot-ip", "user"]
[actions.peek-user]
rules = ["user"]
"""


def env_for(url: str, prefix: str) -> dict[str, str]:
    # a deadline no burst on a small test machine can miss: this is about atomicity
    return {"RATEKEEPER_REDIS_URL": url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": prefix, "RATEKEEPER_REDIS_TIMEOUT_MS": "5000"}


async def storm(servers: list[ServerProcess]) -> list[Any]:
    """REQUESTS concurrent checks of one IP and user, spread over ``servers``."""
    connector = aiohttp.TCPConnector(limit=REQUESTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> Any:
            url = f"{servers[i % len(servers)].url}/v1/check"
            async with session.post(url, json={"action": "hot", "ip": "203.0.113.1",
                                               "user": "alice"}) as resp:
                assert resp.status == 200
                return await resp.json()

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


async def user_remaining(server: ServerProcess) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            f"{server.url}/v1/check",
            json={"action": "peek-user", "user": "alice", "cost": 0}) as resp:
        return int((await resp.json())["limits"][0]["remaining"])


def assert_exact(decisions: list[Any], servers: list[ServerProcess]) -> None:
    failures = [line for server in servers for line in server.log.read_text().splitlines()
                if "WARNING" in line or "ERROR" in line]
    assert not any(d["degraded"] for d in decisions), failures
    assert sum(d["allowed"] for d in decisions) == LIMIT
    assert all(d["reason"] == "rate_limited" for d in decisions if not d["allowed"])


async def test_two_workers_one_redis(serve_process: Callable[..., ServerProcess],
                                     redis_server: RedisServer, key_prefix: str) -> None:
    """2 workers of one instance: exactly 50 of 400 pass; the user rule counts those 50."""
    server = serve_process(HOT, env_for(redis_server.url, key_prefix), workers=2)
    assert_exact(await storm([server]), [server])
    assert await user_remaining(server) == 1000 - LIMIT


async def test_two_instances_one_redis(serve_process: Callable[..., ServerProcess],
                                       redis_server: RedisServer, key_prefix: str) -> None:
    """2 instances on one Redis, requests alternating between them: exactly 50 pass."""
    env = env_for(redis_server.url, key_prefix)
    servers = [serve_process(HOT, env), serve_process(HOT, env)]
    assert_exact(await storm(servers), servers)
    assert await user_remaining(servers[1]) == 1000 - LIMIT


async def test_cluster(serve_process: Callable[..., ServerProcess],
                       redis_cluster: ClusterServers, key_prefix: str) -> None:
    """On the 3-master cluster, 2 workers: exactly 50 pass, and once the denied requests'
    refunds have run the user rule (another slot) counts exactly those 50."""
    server = serve_process(HOT, env_for(redis_cluster.url, key_prefix), workers=2)
    assert_exact(await storm([server]), [server])
    assert await user_remaining(server) == 1000 - LIMIT

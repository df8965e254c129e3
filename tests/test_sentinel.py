"""Sentinel: with a real master, replica and sentinel, the master is killed; decisions go on
(degraded while the sentinel fails over, then normal ones from the promoted replica). A
master demoted in place is left for the new one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from ratekeeper.settings import Settings

from support.common import SALT
from support.redis_servers import SentinelServers, start_sentinel

pytestmark = pytest.mark.slow

CONFIG = """
[rules.r]
limit = "100 per minute"
key = ["ip"]
[actions.a]
rules = ["r"]
"""


@pytest.fixture
def sentinel() -> Iterator[SentinelServers]:
    """A master, a replica and a sentinel of this test alone."""
    servers = start_sentinel()
    yield servers
    servers.stop()


async def three_hits_replicated(make_client: Any, sentinel: SentinelServers, key_prefix: str,
                                timeout_ms: int) -> tuple[Any, Callable[[], Awaitable[Any]]]:
    """A sidecar on the sentinel's service, and its ``ask`` (one check, always a 200): three
    checks counted on the master, and on the replica too (replication is asynchronous)."""
    settings = Settings(redis_url=sentinel.url, ip_salt=SALT, key_prefix=key_prefix,
                        redis_timeout_ms=timeout_ms)
    client = await make_client(CONFIG, app_settings=settings)

    async def ask() -> Any:
        resp = await client.post("/v1/check", json={"action": "a", "ip": "192.0.2.1"})
        assert resp.status == 200
        return await resp.json()

    for expected in (99, 98, 97):
        body = await ask()
        assert not body["degraded"] and body["limits"][0]["remaining"] == expected
    await asyncio.to_thread(sentinel.wait_replicated)
    return client, ask


async def test_decisions_go_on_after_failover(make_client: Any, sentinel: SentinelServers,
                                              key_prefix: str) -> None:
    """Kill the master: every answer is still a 200 decision; once the sentinel has promoted
    the replica, decisions are normal again and keep counting the replicated hits."""
    client, ask = await three_hits_replicated(make_client, sentinel, key_prefix, 100)
    old_master = sentinel.master.port
    sentinel.master.kill()

    degraded = 0
    started = time.monotonic()
    while True:
        body = await ask()
        if not body["degraded"]:
            break
        degraded += 1
        assert body["allowed"]  # fail open
        assert time.monotonic() - started < 30, "no failover within 30 s"
        await asyncio.sleep(0.05)
    assert degraded > 0  # the failover was noticed, not skipped
    assert sentinel.master_port() == sentinel.replica.port != old_master
    assert body["limits"][0]["remaining"] == 96
    assert (await ask())["limits"][0]["remaining"] == 95
    # ready again too, once the sentinel has finished the failover: it names the promoted
    # replica before it clears the master's s_down flag (seconds later on a busy machine),
    # and until then redis-py finds no master for a new connection
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() - started < 30, "not ready within 30 s of the failover"
        await asyncio.sleep(0.05)


async def test_a_master_demoted_in_place_is_left_for_the_new_one(
        make_client: Any, sentinel: SentinelServers, key_prefix: str) -> None:
    """A manual failover turns the master into a replica while the sidecar's connections to
    it stay open: its write meets READONLY, and the check goes again to the new master
    (nothing was written on the replica), so the answer is a normal decision counted once."""
    _, ask = await three_hits_replicated(make_client, sentinel, key_prefix, 500)
    old_master = sentinel.master.port
    started = time.monotonic()
    while True:  # (NOGOODSLAVE until the sentinel has seen the replica caught up)
        out = await asyncio.to_thread(sentinel.cli, "FAILOVER")
        if out == "OK":
            break
        assert time.monotonic() - started < 30, f"SENTINEL FAILOVER refused: {out}"
        await asyncio.sleep(0.2)
    while not (sentinel.master_port() == sentinel.replica.port
               and "role:slave" in sentinel.master.cli("INFO", "replication")):
        assert time.monotonic() - started < 30, "no failover within 30 s"
        await asyncio.sleep(0.05)
    assert sentinel.master_port() != old_master
    for expected in (96, 95):
        body = await ask()
        assert not body["degraded"] and body["limits"][0]["remaining"] == expected

"""Known abusers stay denied while Redis is down or the change channel is lost, until the
reset each denial named; changes made meanwhile are applied once the channel is back.

Every test runs real redis-servers of its own (a crash, a restart, a cut connection, a
Sentinel failover) and walks an injected clock: the cache's deadlines and check.lua's windows
follow it, so "until its known reset" is tested without waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.control.sync import REPLAY_HORIZON

from support.admin import ADMIN, admin_of, admin_settings, call, check, runtime_of, wait_until
from support.common import FakeClock
from support.redis_servers import (
    ClusterServers,
    RedisServer,
    SentinelServers,
    start_redis,
    start_sentinel,
)

ABUSER = "198.51.100.7"  # pushed over its limit before the outage
EARLY = "198.51.100.8"  # over its limit too, with a reset that comes during the outage
FRESH = "203.0.113.9"  # never seen before the outage
BYSTANDER = "198.51.100.9"  # over its limit; no change names it

# sliding-log: a denial's reset is exactly when its oldest hit leaves the window
CONFIG = """
[rules.per-ip]
limit = "3 per minute"
key = ["ip"]
algorithm = "sliding-log"

[rules.strict]
limit = "3 per minute"
key = ["ip"]
algorithm = "sliding-log"
fail = "closed"

[rules.per-user]
limit = "5 per minute"
key = ["user"]
algorithm = "sliding-log"

[actions.register]
rules = ["per-ip"]

[actions.upload]
rules = ["strict"]

[actions.login]
rules = ["per-user"]
"""


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may kill and restart."""
    server = start_redis()
    yield server
    server.stop()


class Partition:
    """A TCP proxy to one Redis that can be cut (every connection through it dropped, new ones
    closed at once) and healed: one sidecar loses Redis while another keeps it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.is_cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The redis:// URL that goes through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Drop every connection; refuse new ones until healed."""
        self.is_cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def heal(self) -> None:
        """Let connections through again."""
        self.is_cut = False

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            for end in (writer, up_writer):
                end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def partition(own_redis: RedisServer) -> AsyncIterator[Partition]:
    """A proxy to this test's Redis that the test can cut."""
    proxy = Partition(own_redis.port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def subscribed(client: Any) -> bool:
    """Whether the client's process is subscribed to the change channel."""
    return bool(admin_of(client).sync.subscribed)


async def unsubscribed(client: Any) -> bool:
    """Whether the client's process has noticed it lost the change channel."""
    return not admin_of(client).sync.subscribed


async def heard(client: Any) -> bool:
    """Whether the client's process has received a change from the log's channel."""
    return admin_of(client).sync.seen is not None


async def over_limit(client: Any, ip: str, action: str = "register") -> dict[str, Any]:
    """Three allowed checks and a fourth that Redis denies; the denial."""
    for _ in range(3):
        assert (await check(client, action=action, ip=ip))["allowed"]
    denied = await check(client, action=action, ip=ip)
    assert denied["reason"] == "rate_limited" and not denied["degraded"]
    return denied


async def redis_answers(client: Any) -> bool:
    """Whether a look (cost 0) at a subject nobody checks is decided by Redis again."""
    return not (await check(client, action="register", ip="192.0.2.250", cost=0))["degraded"]


def from_cache(decision: dict[str, Any], reason: str = "rate_limited") -> bool:
    """A denial with ``reason`` that no fail mode made."""
    return decision["allowed"] is False and decision["reason"] == reason and (
        decision["degraded"] is False)


async def test_known_abusers_stay_denied_through_a_redis_crash(
        make_client: Any, own_redis: RedisServer, key_prefix: str, clock: FakeClock) -> None:
    """Redis is killed: every check of a subject already over its limit is denied (not
    degraded) until the reset Redis named, then gets its fail mode; a fresh subject gets
    its fail mode (open or closed) throughout. Redis restarts empty: the denial still holds,
    and a reset made then is honoured at once."""
    client = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        own_redis.url, key_prefix, sync_interval_ms=50))
    await wait_until(lambda: subscribed(client))
    await over_limit(client, EARLY)
    await over_limit(client, EARLY, action="upload")
    clock.advance(30)
    denied = await over_limit(client, ABUSER)
    await over_limit(client, ABUSER, action="upload")
    assert denied["retry_after"] == 60  # its oldest hit leaves the window in 60 s

    own_redis.kill()
    await wait_until(lambda: unsubscribed(client))
    for step in range(40):  # 28 s of the outage: EARLY's reset (30 s away) not yet reached
        for action in ("register", "upload"):
            for ip in (ABUSER, EARLY):
                assert from_cache(await check(client, action=action, ip=ip)), (step, action, ip)
        fresh = await check(client, action="register", ip=FRESH)
        assert fresh["allowed"] and fresh["degraded"]
        strict = await check(client, action="upload", ip=FRESH)
        assert not strict["allowed"] and strict["degraded"]
        clock.advance(0.7)

    clock.advance(2.5)  # past EARLY's reset, not ABUSER's
    assert (await check(client, action="register", ip=EARLY))["degraded"]
    assert not (await check(client, action="upload", ip=EARLY))["allowed"]  # fail closed
    assert from_cache(await check(client, action="register", ip=ABUSER))

    own_redis.restart()  # no persistence: the counters are gone
    await wait_until(lambda: subscribed(client), timeout=10)
    await wait_until(lambda: redis_answers(client))  # the circuit breaker probes again
    assert from_cache(await check(client, action="register", ip=ABUSER))
    assert admin_of(client).sync.emptied == 0
    await call(client, "POST", "/v1/admin/reset", json={"action": "register", "ip": ABUSER})
    after = await check(client, action="register", ip=ABUSER)
    assert after["allowed"] and not after["degraded"]
    assert from_cache(await check(client, action="upload", ip=ABUSER))  # not reset


async def test_changes_made_while_the_channel_was_down_are_applied_when_it_is_back(
        make_client: Any, own_redis: RedisServer, partition: Partition, key_prefix: str,
        clock: FakeClock) -> None:
    """A second sidecar is cut off from Redis while the first keeps it. Meanwhile the first
    lifts a ban and resets a subject the second remembers as denied; the second goes on
    denying both (it cannot know) until its connection is back, then honours both at once,
    while what no change named (another subject over its limit) stays remembered."""
    settings = admin_settings(own_redis.url, key_prefix, sync_interval_ms=50)
    first = await make_client(CONFIG, clock=clock, app_settings=settings)
    second = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        partition.url, key_prefix, sync_interval_ms=50))
    await wait_until(lambda: subscribed(second))
    ban = await call(first, "POST", "/v1/admin/bans", expect=201,
                     json={"user": "mallory", "duration": 600})
    await wait_until(lambda: heard(second))  # the ban empties the cache as it arrives
    assert from_cache(await check(second, action="login", user="mallory"), "banned")
    await over_limit(second, ABUSER)
    await over_limit(second, BYSTANDER)
    cache = runtime_of(second).cache
    assert cache is not None and len(cache) == 3

    partition.cut()
    await wait_until(lambda: unsubscribed(second))
    await call(first, "DELETE", f"/v1/admin/bans/{ban['id']}")
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": ABUSER})
    assert (await check(first, action="register", ip=ABUSER))["allowed"]
    assert (await check(first, action="login", user="mallory"))["allowed"]
    for _ in range(5):  # the second one cannot know yet
        assert from_cache(await check(second, action="login", user="mallory"), "banned")
        assert from_cache(await check(second, action="register", ip=ABUSER))
        assert from_cache(await check(second, action="register", ip=BYSTANDER))
        assert (await check(second, action="register", ip=FRESH))["degraded"]

    partition.heal()
    await wait_until(lambda: subscribed(second), timeout=10)
    await wait_until(lambda: redis_answers(second))
    sync = admin_of(second).sync
    assert sync.caught_up == 2 and sync.emptied == 0
    hits = cache.hits
    assert from_cache(await check(second, action="register", ip=BYSTANDER))
    assert cache.hits == hits + 1  # still remembered: answered without Redis
    lifted = await check(second, action="login", user="mallory")
    assert lifted["allowed"] and not lifted["degraded"]
    reset = await check(second, action="register", ip=ABUSER)
    assert reset["allowed"] and not reset["degraded"]
    assert reset["limits"][0]["remaining"] == 1  # first's check above, and this one


async def test_changes_in_a_log_that_restarted_empty_are_applied(
        make_client: Any, own_redis: RedisServer, partition: Partition, key_prefix: str,
        clock: FakeClock) -> None:
    """While a sidecar is cut off, Redis restarts without persistence (the change log with
    it) and a reset is made on the new one: once back, the sidecar applies that reset from
    the new log and keeps the denials no change named."""
    first = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        own_redis.url, key_prefix, sync_interval_ms=50))
    second = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        partition.url, key_prefix, sync_interval_ms=50))
    await wait_until(lambda: subscribed(second))
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": FRESH})
    await wait_until(lambda: heard(second))  # a place in the old log
    await over_limit(second, ABUSER)
    await over_limit(second, BYSTANDER)

    partition.cut()
    await wait_until(lambda: unsubscribed(second))
    own_redis.restart()
    await wait_until(lambda: redis_answers(first))
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": ABUSER})
    assert from_cache(await check(second, action="register", ip=ABUSER))

    partition.heal()
    await wait_until(lambda: subscribed(second), timeout=10)
    await wait_until(lambda: redis_answers(second))
    sync = admin_of(second).sync
    assert sync.caught_up == 1 and sync.emptied == 0
    assert (await check(second, action="register", ip=ABUSER))["allowed"]
    assert from_cache(await check(second, action="register", ip=BYSTANDER))


@pytest.mark.parametrize("gap", ["trimmed", "long"])
async def test_the_cache_is_emptied_when_missed_changes_cannot_be_known(
        make_client: Any, own_redis: RedisServer, partition: Partition, key_prefix: str,
        clock: FakeClock, gap: str) -> None:
    """If the change log lost entries past the last one a sidecar saw (trimmed), or its
    channel was down longer than the log is sure to last, it cannot know what it missed:
    once back it forgets every denial and asks Redis again."""
    first = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        own_redis.url, key_prefix, sync_interval_ms=50))
    second = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
        partition.url, key_prefix, sync_interval_ms=50))
    await wait_until(lambda: subscribed(second))
    await call(first, "POST", "/v1/admin/bans", expect=201,
               json={"user": "mallory", "duration": 7200})
    await wait_until(lambda: heard(second))  # the ban empties the cache as it arrives
    assert from_cache(await check(second, action="login", user="mallory"), "banned")
    cache = runtime_of(second).cache
    assert cache is not None and len(cache) == 1

    partition.cut()
    await wait_until(lambda: unsubscribed(second))
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": FRESH})
    if gap == "trimmed":
        async with aioredis.Redis(port=own_redis.port) as redis:
            await redis.xtrim(admin_of(first).sync.log_key, maxlen=0, approximate=False)
    else:
        clock.advance(REPLAY_HORIZON + 1)
    assert from_cache(await check(second, action="login", user="mallory"), "banned")

    partition.heal()
    await wait_until(lambda: subscribed(second), timeout=10)
    await wait_until(lambda: redis_answers(second))
    assert admin_of(second).sync.emptied == 1 and len(cache) == 0
    hits = cache.hits
    again = await check(second, action="login", user="mallory")  # Redis: still banned
    assert from_cache(again, "banned") and cache.hits == hits


async def test_a_dropped_channel_connection_is_caught_up_not_forgotten(
        make_client: Any, own_redis: RedisServer, key_prefix: str) -> None:
    """Redis closes the subscriber's connection (CLIENT KILL TYPE pubsub): the sidecar
    subscribes again and keeps what it knew."""
    client = await make_client(CONFIG, app_settings=admin_settings(
        own_redis.url, key_prefix, sync_interval_ms=50))
    await wait_until(lambda: subscribed(client))
    await over_limit(client, ABUSER)
    sync = admin_of(client).sync
    before = sync.subscriptions
    await asyncio.to_thread(own_redis.cli, "CLIENT", "KILL", "TYPE", "pubsub")

    async def again() -> bool:
        return sync.subscribed and sync.subscriptions > before

    await wait_until(again, timeout=10)
    assert sync.emptied == 0
    assert from_cache(await check(client, action="register", ip=ABUSER))
    cache = runtime_of(client).cache
    assert cache is not None and len(cache) == 1


async def test_changes_reach_every_sidecar_on_a_cluster(
        make_client: Any, redis_cluster: ClusterServers, key_prefix: str) -> None:
    """On Redis Cluster the change log lives on one node and its script publishes there:
    a reset made through one sidecar still reaches another at once."""
    settings = admin_settings(redis_cluster.url, key_prefix, sync_interval_ms=3_600_000)
    first = await make_client(CONFIG, app_settings=settings)
    second = await make_client(CONFIG, app_settings=settings)
    await wait_until(lambda: subscribed(second))
    await over_limit(second, ABUSER)
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": ABUSER})
    await wait_until(lambda: _reason_is(second, None, action="register", ip=ABUSER))
    assert await heard(second)  # by the script's PUBLISH, with its log entry's id


@pytest.mark.slow
async def test_known_abusers_stay_denied_through_a_sentinel_failover(
        make_client: Any, key_prefix: str, clock: FakeClock) -> None:
    """The master is killed and the sentinel promotes the replica: every check of a subject
    over its limit is denied (not degraded) throughout, a fresh subject meanwhile gets its
    fail mode, and a reset made on the new master is honoured."""
    sentinel: SentinelServers = start_sentinel()
    try:
        client = await make_client(CONFIG, clock=clock, app_settings=admin_settings(
            sentinel.url, key_prefix, sync_interval_ms=50, redis_timeout_ms=200))
        await wait_until(lambda: subscribed(client), timeout=10)
        await over_limit(client, ABUSER)
        await asyncio.to_thread(sentinel.wait_replicated)
        old_master = sentinel.master.port
        sentinel.master.kill()

        degraded = 0
        started = time.monotonic()
        for n in range(1, 1 << 16):
            assert from_cache(await check(client, action="register", ip=ABUSER))
            fresh = await check(client, action="register", ip=f"10.{n >> 8}.{n & 255}.1")
            assert fresh["allowed"]
            if fresh["degraded"]:
                degraded += 1
            elif await subscribed(client):
                break
            assert time.monotonic() - started < 30, "no failover within 30 s"
            await asyncio.sleep(0.02)
        assert degraded > 0  # the outage was seen, not skipped
        assert sentinel.master_port() == sentinel.replica.port != old_master
        # until the sentinel has cleared the old master's down state, a new connection can
        # find no master (see test_sentinel.py): ready means it has
        while (await client.get("/readyz")).status != 200:
            assert from_cache(await check(client, action="register", ip=ABUSER))
            assert time.monotonic() - started < 30, "not ready within 30 s of the failover"
            await asyncio.sleep(0.05)
        # (the Sentinels may still name no master for a moment: an admin change is safe to
        # repeat, and a 503 says it was not made)

        async def reset() -> bool:
            response = await client.post("/v1/admin/reset", headers=ADMIN,
                                         json={"action": "register", "ip": ABUSER})
            return response.status == 200

        await wait_until(reset, timeout=10)

        async def decided() -> bool:  # a look (cost 0) takes nothing
            return not (await check(client, action="register", ip=ABUSER, cost=0))["degraded"]

        await wait_until(decided, timeout=10)
        after = await check(client, action="register", ip=ABUSER)
        assert after["allowed"] and not after["degraded"]
    finally:
        sentinel.stop()


async def _reason_is(client: Any, reason: str | None, **fields: Any) -> bool:
    return bool((await check(client, **fields))["reason"] == reason)

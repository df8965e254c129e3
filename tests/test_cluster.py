"""Redis Cluster: checks whose keys span slots are decided per slot, and a denial anywhere gives
back what the other slots took, so a denied request consumes nothing (on a real 3-master
cluster the tests start)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter
from ratekeeper.storage.store import open_store

from support.common import SALT, FakeClock, config_from, opened
from support.redis_servers import ClusterServers, start_cluster

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

TWO_SUBJECTS = """
[rules.ip]
limit = "{ip_limit} per minute"
key = ["ip"]
[rules.user]
limit = "{user_limit} per minute"
key = ["user"]
[rules.global]
limit = "1000 per minute"
key = []
algorithm = "sliding-counter"
[actions.a]
rules = ["ip", "user"]
[actions.g]
rules = ["global"]
"""

IP, USER = "203.0.113.9", "alice"


def make_checker(client: Any, prefix: str, clock: FakeClock | None = None, *,
                 ip_limit: int = 10, user_limit: int = 2) -> Checker:
    config = config_from(TWO_SUBJECTS.format(ip_limit=ip_limit, user_limit=user_limit))
    return Checker(config, Keyspace(SALT, prefix=prefix),
                   opened(Limiter(client, timeout=2.0, clock=clock)), FlagBoard(config.flags))


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decode(json.dumps(fields).encode()))


def rule_key(checker: Checker, rule: str, field: str, value: str) -> str:
    keyspace = checker.keyspace
    raw = keyspace.ip_value(value) if field == "ip" else keyspace.text_value(value)
    return keyspace.rule_keys(checker.config.rules[rule], {field: raw})[0]


def ban_key(checker: Checker, field: str, value: str) -> str:
    keyspace = checker.keyspace
    raw = keyspace.ip_value(value) if field == "ip" else keyspace.text_value(value)
    return keyspace.subject_ban_keys({field: raw})[0]


async def test_store_url_builds_a_cluster_client_that_splits(redis_cluster: ClusterServers,
                                                             redis: aioredis.Redis) -> None:
    """redis+cluster:// gives a RedisCluster whose limiter splits by slot; one Redis never does."""
    store = open_store(Settings(redis_url=redis_cluster.url, ip_salt=SALT))
    try:
        assert store.kind == "cluster" and isinstance(store.redis, RedisCluster)
        limiter = opened(Limiter(store.redis, timeout=2.0))
        assert limiter.sharded and await limiter.ready()
    finally:
        await store.close()
    assert not opened(Limiter(redis, timeout=2.0)).sharded


async def test_ip_and_user_rules_live_in_different_slots(cluster_client: RedisCluster,
                                                         key_prefix: str) -> None:
    """The premise of the split: the IP rule and the user rule hash to different slots, and a
    subject's ban key shares the slot of the rule keyed on that subject alone."""
    checker = make_checker(cluster_client, key_prefix)
    ip_key, user_key = rule_key(checker, "ip", "ip", IP), rule_key(checker, "user", "user", USER)
    assert key_slot(ip_key.encode()) != key_slot(user_key.encode())
    assert key_slot(ban_key(checker, "ip", IP).encode()) == key_slot(ip_key.encode())
    assert key_slot(ban_key(checker, "user", USER).encode()) == key_slot(user_key.encode())


async def test_denial_in_the_ip_slot_gives_back_the_user_slots_hit(
        cluster_client: RedisCluster, key_prefix: str, clock: FakeClock) -> None:
    """The IP rule denies: the user rule (other slot) took a hit and got it back."""
    checker = make_checker(cluster_client, key_prefix, clock, ip_limit=2, user_limit=10)
    for _ in range(2):
        assert (await ask(checker, action="a", ip=IP, user=USER)).allowed
    user_key = rule_key(checker, "user", "user", USER)
    for _ in range(3):
        denied = await ask(checker, action="a", ip=IP, user=USER)
        assert not denied.allowed and denied.reason == "rate_limited"
        # the answer reports the user rule as it stands: nothing of this request counted
        assert [lim.remaining for lim in denied.limits] == [0, 8]
    assert await cluster_client.llen(user_key) == 2


async def test_a_ban_in_one_slot_leaves_the_other_slots_untouched(
        cluster_client: RedisCluster, key_prefix: str, clock: FakeClock) -> None:
    """A banned user is refused, and the IP rule in another slot keeps no hit of it."""
    checker = make_checker(cluster_client, key_prefix, clock)
    await cluster_client.set(ban_key(checker, "user", USER), "1", px=60_000)
    decision = await ask(checker, action="a", ip=IP, user=USER)
    assert not decision.allowed and decision.reason == "banned"
    assert 0 < decision.retry_after <= 60
    assert await cluster_client.exists(rule_key(checker, "ip", "ip", IP)) == 0
    # the banned user's IP is not banned: another user from it passes and is counted once
    assert (await ask(checker, action="a", ip=IP, user="bob")).allowed
    assert await cluster_client.llen(rule_key(checker, "ip", "ip", IP)) == 1


async def test_bans_are_checked_in_their_own_slot_for_a_global_rule(
        cluster_client: RedisCluster, key_prefix: str, clock: FakeClock) -> None:
    """A global rule's key shares no slot with the IP's ban key; the ban still holds and the
    global counter is given back its hit."""
    checker = make_checker(cluster_client, key_prefix, clock)
    assert (await ask(checker, action="g", ip=IP)).limits[0].remaining == 999
    await cluster_client.set(ban_key(checker, "ip", IP), "1", px=60_000)
    assert (await ask(checker, action="g", ip=IP)).reason == "banned"
    assert (await ask(checker, action="g", ip="198.51.100.1", cost=0)).limits[0].remaining == 999


async def test_concurrent_cross_slot_checks_never_over_admit_and_leak_nothing(
        cluster_client: RedisCluster, key_prefix: str) -> None:
    """200 concurrent checks, the IP rule binding (limit 20): exactly 20 pass, and once every
    refund has run the user rule in the other slot counts exactly those 20."""
    checker = make_checker(cluster_client, key_prefix, ip_limit=20, user_limit=1000)
    decisions = await asyncio.gather(*(ask(checker, action="a", ip=IP, user=USER)
                                       for _ in range(200)))
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 20
    assert await cluster_client.llen(rule_key(checker, "user", "user", USER)) == 20
    assert await cluster_client.llen(rule_key(checker, "ip", "ip", IP)) == 20


async def test_concurrent_cross_slot_checks_user_rule_binding(
        cluster_client: RedisCluster, key_prefix: str) -> None:
    """The same with the user rule binding: exactly 20 pass and the IP rule counts those 20."""
    checker = make_checker(cluster_client, key_prefix, ip_limit=1000, user_limit=20)
    decisions = await asyncio.gather(*(ask(checker, action="a", ip=IP, user=USER)
                                       for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 20
    assert await cluster_client.llen(rule_key(checker, "ip", "ip", IP)) == 20


async def test_refund_token_gives_back_every_slot(cluster_client: RedisCluster,
                                                 key_prefix: str) -> None:
    """With Redis TIME (no test clock) a check spanning two slots stamps one time in both, so
    its refund token gives back the hit of the IP rule and of the user rule."""
    checker = make_checker(cluster_client, key_prefix, ip_limit=5, user_limit=5)
    await ask(checker, action="a", ip=IP, user=USER)
    taken = await ask(checker, action="a", ip=IP, user=USER)
    assert [lim.remaining for lim in taken.limits] == [3, 3] and taken.refund
    ip_key, user_key = rule_key(checker, "ip", "ip", IP), rule_key(checker, "user", "user", USER)
    assert await cluster_client.lindex(ip_key, 0) == await cluster_client.lindex(user_key, 0)
    result = await checker.refund(taken.refund)
    assert result.refunded
    peek = await ask(checker, action="a", ip=IP, user=USER, cost=0)
    assert [lim.remaining for lim in peek.limits] == [4, 4]


@pytest.fixture
async def own_cluster() -> AsyncIterator[tuple[ClusterServers, RedisCluster]]:
    """A 3-master cluster of this test alone (it pauses and kills nodes), and a client; the
    nodes left go on serving their slots when one dies, as a rate limiter's cluster should."""
    cluster = start_cluster(3, extra=("--cluster-require-full-coverage", "no"))
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    await client.initialize()
    yield cluster, client
    for node in cluster.nodes:
        if node.process.poll() is None:
            node.resume()
    await client.aclose()
    cluster.stop()


async def test_a_slot_that_fails_gets_the_others_hits_given_back(
        own_cluster: tuple[ClusterServers, RedisCluster], key_prefix: str) -> None:
    """The user slot's node paused (deadline) and then killed (error) while the IP slot's node
    answers: each check is decided by the fail modes, and the hit the IP slot took is given
    back (in the background, after the degraded answer)."""
    cluster, client = own_cluster
    store = open_store(Settings(redis_url=cluster.url, ip_salt=SALT, key_prefix=key_prefix,
                                redis_timeout_ms=200))
    checker = make_checker(store.redis, key_prefix)
    try:
        ip_key = rule_key(checker, "ip", "ip", IP)
        user = next(u for u in (f"user{i}" for i in range(100))
                    if client.get_node_from_key(rule_key(checker, "user", "user", u)).port
                    != client.get_node_from_key(ip_key).port)
        user_port = client.get_node_from_key(rule_key(checker, "user", "user", user)).port
        user_node = next(n for n in cluster.nodes if n.port == user_port)
        assert (await ask(checker, action="a", ip=IP, user=user)).allowed
        for stop in (user_node.pause, user_node.kill):
            stop()
            decision = await ask(checker, action="a", ip=IP, user=user)
            assert decision.degraded and decision.allowed
            for _ in range(100):  # the refund runs in the background
                if await client.llen(ip_key) == 1:
                    break
                await asyncio.sleep(0.02)
            assert await client.llen(ip_key) == 1
    finally:
        await store.close()


async def test_a_dead_master_degrades_only_the_checks_of_its_slots() -> None:
    """With a master killed (and the cluster told to serve without full coverage), checks
    whose keys live on the other masters are decided by Redis every time, past the node
    timeout too; only the checks of the dead master's slots are degraded."""
    cluster = start_cluster(extra=("--cluster-require-full-coverage", "no"))
    store = open_store(Settings(redis_url=cluster.url, ip_salt=SALT))
    limiter = opened(Limiter(store.redis, timeout=0.05))
    try:
        assert await limiter.ready()
        victim = cluster.nodes[0]
        lost = set(_slots_of(victim))
        victim.stop()
        outcomes: dict[str, set[bool]] = {"lost": set(), "healthy": set()}
        for round_ in range(60):  # about 3 s: past the 2 s node timeout
            calls = [([f"t:{{s{round_}-{i}}}:r"], 1, 0, 1, ("c", "0", 0, 1, 1000, 60_000))
                     for i in range(30)]
            for (keys, *_), reply in zip(calls, await limiter.decide(calls), strict=True):
                where = "lost" if key_slot(keys[0].encode()) in lost else "healthy"
                outcomes[where].add(isinstance(reply, StoreUnavailable))
            await asyncio.sleep(0.05)
        assert outcomes == {"lost": {True}, "healthy": {False}}
    finally:
        await limiter.close()
        await store.close()
        cluster.stop()


def _slots_of(node: Any) -> list[int]:
    """The slots ``node`` serves, from its own CLUSTER SLOTS."""
    port = str(node.port)
    lines = node.cli("CLUSTER", "SLOTS").split()
    slots: list[int] = []
    # redis-cli prints each range as: start, end, host, port, id (per node of the range)
    for i in range(len(lines) - 3):
        if (lines[i].isdigit() and lines[i + 1].isdigit() and lines[i + 2] == "127.0.0.1"
                and lines[i + 3] == port):
            slots += range(int(lines[i]), int(lines[i + 1]) + 1)
    return slots

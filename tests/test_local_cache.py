"""The per-process cache of denials: no Redis call for repeat offenders, never a wrong answer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from ratekeeper.config.rules import Action, Rule, Window
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.identity.keys import Keyspace
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter, Outcome, Status, WindowState

from support.admin import (
    CONFIG,
    SALT,
    admin_of,
    admin_settings,
    call,
    check,
    runtime_of,
    wait_until,
)
from support.common import FakeClock, config_from, opened
from support.redis_servers import RedisServer

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

IP = "198.51.100.200"


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


async def script_calls(redis: aioredis.Redis) -> int:
    """How many times Redis has run a script (EVALSHA or EVAL) since it started."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0))
               for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_repeat_offenders_cost_no_redis_call(make_client: Any, settings_for: Any,
                                                   redis: aioredis.Redis) -> None:
    """Once Redis said a subject is over a limit (or banned), its next 50 requests are
    denied by this process alone: Redis runs no script for them."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for _ in range(3):
        await check(client, action="register", ip=IP)
    before = await script_calls(redis)
    first = await check(client, action="register", ip=IP)
    assert first["reason"] == "rate_limited"
    for _ in range(50):
        again = await check(client, action="register", ip=IP)
        assert again["reason"] == "rate_limited"
        assert 1 <= again["retry_after"] <= first["retry_after"]
        assert again["limits"][0]["rule"] == "per-ip"
    assert await script_calls(redis) - before == 1
    assert runtime_of(client).cache is not None and runtime_of(client).cache.hits == 50

    await call(client, "POST", "/v1/admin/bans", expect=201,
               json={"user": "mallory", "duration": 600})
    before = await script_calls(redis)
    for _ in range(20):
        decision = await check(client, action="login", ip="192.0.2.1", user="mallory")
        assert decision["reason"] == "banned"
    assert await script_calls(redis) - before == 1


async def test_a_denial_at_a_high_cost_says_nothing_about_a_lower_one(
        make_client: Any, settings_for: Any, clock: FakeClock) -> None:
    """Denied at cost 3 with 2 left, the same subject is still allowed at cost 1 and 2."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    await check(client, action="login", ip=IP, user="bob", cost=1)  # per-ip: 2 left
    denied = await check(client, action="login", ip=IP, user="bob", cost=3)
    assert denied["reason"] == "rate_limited"
    assert (await check(client, action="login", ip=IP, user="bob", cost=3))["reason"] == (
        "rate_limited")
    assert (await check(client, action="login", ip=IP, user="bob", cost=1))["allowed"]
    assert (await check(client, action="login", ip=IP, user="bob", cost=0))["allowed"]
    assert (await check(client, action="login", ip=IP, user="bob", cost=1))["allowed"]
    assert (await check(client, action="login", ip=IP, user="bob", cost=0))["reason"] == (
        "rate_limited")


# Keys expire in real time (longest window + 1 s) while this test walks a fake clock; every
# rule has a window longer than the test could ever take, so no key expires under it.
RANDOM_CONFIG = """
[rules.small]
limit = "3 per 10 seconds, 5 per minute, 40 per 10 minutes"
key = ["ip"]
[rules.counter]
limit = "4 per 20 seconds, 60 per 10 minutes"
key = ["user"]
algorithm = "sliding-counter"
[rules.boxed]
limit = "6 per minute, 50 per 10 minutes"
key = ["ip"]
penalty = "1 hour"         # Redis times the box in real time: longer than this test's fake time
[actions.a]
rules = ["small", "counter"]
[actions.b]
rules = ["boxed", "counter"]
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_cache_never_changes_a_decision(redis: aioredis.Redis, key_prefix: str,
                                                  seed: int) -> None:
    """Random traffic (costs 0-4, several subjects, time moving in small random steps) gets
    exactly the same answers with the cache as without it, while the cache answers some."""
    rng = random.Random(seed)
    config = config_from(RANDOM_CONFIG)
    clock = FakeClock()
    checkers = []
    for name, cache in (("plain", None), ("cached", LocalCache(1000, now_ms=clock))):
        keyspace = Keyspace(SALT, prefix=f"{key_prefix}-{name}", grouping=config.ip)
        checkers.append(Checker(config, keyspace, opened(Limiter(redis, timeout=2.0, clock=clock)),
                                FlagBoard(config.flags), cache=cache))
    plain, cached = checkers
    for _ in range(600):
        fields = {"action": rng.choice("ab"), "ip": f"192.0.2.{rng.randint(1, 3)}",
                  "user": rng.choice(["u1", "u2"]), "cost": rng.choice([0, 1, 1, 1, 2, 4])}
        body = json.dumps(fields).encode()
        expected = await plain.check(plain.decode(body))
        got = await cached.check(cached.decode(body))
        assert (got.allowed, got.reason) == (expected.allowed, expected.reason), fields
        if not got.allowed:
            assert got.retry_after <= expected.retry_after, fields
            assert got.retry_after_ms <= expected.retry_after_ms, fields
        clock.advance(rng.choice([0, 0, 0.001, 0.1, 0.5, 1, 3]))
    assert cached.cache is not None and cached.cache.hits > 50


async def test_lift_and_reset_reach_every_process_at_once(make_client: Any, settings_for: Any,
                                                          redis: aioredis.Redis) -> None:
    """A second process that remembers a ban and a limit denial answers normally right
    after a lift or a reset made in the first one (pub/sub; the resync is an hour away)."""
    settings = settings_for(sync_interval_ms=3_600_000)
    first = await make_client(CONFIG, app_settings=settings)
    second = await make_client(CONFIG, app_settings=settings)
    await wait_until(lambda: _subscribed(second))

    ban = await call(first, "POST", "/v1/admin/bans", expect=201,
                     json={"ip": IP, "duration": 600})
    await wait_until(lambda: _reason_is(second, "banned", action="register", ip=IP))
    before = await script_calls(redis)
    assert await _reason_is(second, "banned", action="register", ip=IP)
    assert await script_calls(redis) == before  # the second process answers from its cache
    await call(first, "DELETE", f"/v1/admin/bans/{ban['id']}")
    took = await wait_until(lambda: _reason_is(second, None, action="register", ip=IP))
    assert took < 1.0

    for _ in range(3):
        await check(second, action="register", ip=IP)
    assert await _reason_is(second, "rate_limited", action="register", ip=IP)
    await call(first, "POST", "/v1/admin/reset", json={"action": "register", "ip": IP})
    took = await wait_until(lambda: _reason_is(second, None, action="register", ip=IP))
    assert took < 1.0


async def test_a_refund_ends_remembered_denials_everywhere(make_client: Any,
                                                           settings_for: Any) -> None:
    """Both processes remember a subject as over its limit; a refund of one of its hits, made
    in the first, lets the next request through in both (no stale denial)."""
    settings = settings_for(sync_interval_ms=3_600_000)
    first = await make_client(CONFIG, app_settings=settings)
    second = await make_client(CONFIG, app_settings=settings)
    await wait_until(lambda: _subscribed(second))
    tokens = [(await check(first, action="register", ip=IP))["refund"] for _ in range(3)]
    for client in (first, second):
        assert await _reason_is(client, "rate_limited", action="register", ip=IP)
    for client in (first, second):  # a look (cost 0) is answered from the cache too
        assert await _reason_is(client, "rate_limited", action="register", ip=IP, cost=0)
    response = await first.post("/v1/refund", json={"token": tokens[-1]})
    assert (await response.json())["refunded"] is True
    assert await _reason_is(first, None, action="register", ip=IP, cost=0)
    took = await wait_until(lambda: _reason_is(second, None, action="register", ip=IP, cost=0))
    assert took < 1.0


async def test_embedded_memory_mode_bans_and_flags(make_client: Any) -> None:
    """memory:// (one process, fakeredis): flags, bans, lifts and the cache all work without
    a pub/sub channel."""
    settings = Settings(redis_url="memory://", ip_salt=SALT,
                        admin_tokens=admin_settings("memory://", "rk").admin_tokens)
    client = await make_client(CONFIG, app_settings=settings)
    assert runtime_of(client).store.kind == "memory"
    assert isinstance(runtime_of(client).store.redis, fakeredis.FakeAsyncRedis)
    ban = await call(client, "POST", "/v1/admin/bans", expect=201,
                     json={"ip": IP, "duration": 60})
    for _ in range(3):
        assert (await check(client, action="register", ip=IP))["reason"] == "banned"
    await call(client, "DELETE", f"/v1/admin/bans/{ban['id']}")
    assert (await check(client, action="register", ip=IP))["allowed"]
    await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    assert (await check(client, action="register", ip=IP))["reason"] == "disabled"
    assert admin_of(client).sync.listen is False


def test_the_cache_is_bounded() -> None:
    """However many subjects are denied, the cache holds at most its size, oldest out."""
    clock = FakeClock()
    cache = LocalCache(10, now_ms=clock)
    rule = Rule(name="r", windows=(Window(limit=1, seconds=60),), key=("ip",))
    action = Action(name="a", rules=(rule,), flags=())
    outcome = Outcome(status=Status.LIMITED, now_ms=0, shadowed=False, culprit=0, wait_ms=5000,
                      windows=(WindowState(remaining=0, reset_ms=5000, retry_ms=5000),))
    for i in range(100):
        cache.remember(action, [], [f"subject-{i:016d}"], 1, outcome, clock.ms)
        assert len(cache) <= 10
    assert cache.lookup(action, [], ["subject-0000000000000099"], 1, False) is not None
    assert cache.lookup(action, [], ["subject-0000000000000000"], 1, False) is None
    clock.advance(5)
    assert cache.lookup(action, [], ["subject-0000000000000099"], 1, False) is None
    assert cache.sweep() == 9 and len(cache) == 0


async def _reason_is(client: Any, reason: str | None, **fields: Any) -> bool:
    return bool((await check(client, **fields))["reason"] == reason)


async def _subscribed(client: Any) -> bool:
    return bool(admin_of(client).sync.subscribed)


def test_a_remembered_answer_is_the_one_computed_afresh() -> None:
    """An answer is reused within its millisecond only: at every ms it equals an answer built
    from nothing (random deadlines, random steps of time, some of them 0)."""
    rng = random.Random(11)
    rule = Rule(name="r", windows=(Window(limit=5, seconds=60), Window(limit=50, seconds=3600)),
                key=("ip",))
    actions = [Action(name=name, rules=(rule,), flags=()) for name in ("a", "b")]
    for _ in range(40):
        clock = FakeClock()
        cache, fresh = LocalCache(100, now_ms=clock), LocalCache(100, now_ms=clock)
        retry = rng.randrange(1, 9000)
        outcome = Outcome(status=Status.LIMITED, now_ms=0, shadowed=False, culprit=0,
                          wait_ms=retry, windows=(
                              WindowState(remaining=0, reset_ms=rng.randrange(1, 9000),
                                          retry_ms=retry),
                              WindowState(remaining=rng.randrange(0, 40),
                                          reset_ms=rng.randrange(0, 9000), retry_ms=0)))
        start = clock.ms
        cache.remember(actions[0], [], ["s" * 22], 1, outcome, start)
        while True:
            action = rng.choice(actions)
            got = cache.lookup(action, [], ["s" * 22], 1, False)
            fresh.clear()
            fresh.remember(actions[0], [], ["s" * 22], 1, outcome, start)
            want = fresh.lookup(action, [], ["s" * 22], 1, False)
            assert got == want
            if got is None:
                break
            clock.ms += rng.choice([0, rng.randrange(1, 400)])


EXACT_CONFIG = """
[rules.r]
limit = "3 per 10 seconds"
key = ["ip"]
[actions.a]
rules = ["r"]
"""


async def test_a_cached_denial_says_its_waits_to_the_millisecond(redis: aioredis.Redis,
                                                                 key_prefix: str) -> None:
    """A denial answered from the cache is the one Redis gives at that moment, to the
    millisecond: retry_after_ms and every window's reset_ms count down with the clock."""
    config = config_from(EXACT_CONFIG)
    clock = FakeClock()
    checkers = []
    for name, cache in (("plain", None), ("cached", LocalCache(100, now_ms=clock))):
        keyspace = Keyspace(SALT, prefix=f"{key_prefix}-{name}", grouping=config.ip)
        checkers.append(Checker(config, keyspace, opened(Limiter(redis, timeout=2.0, clock=clock)),
                                FlagBoard(config.flags), cache=cache))
    plain, cached = checkers
    body = json.dumps({"action": "a", "ip": IP}).encode()
    for _ in range(3):
        for checker in checkers:
            assert (await checker.check(checker.decode(body))).allowed
        clock.advance(0.25)
    first = await cached.check(cached.decode(body))  # Redis denies; the cache remembers
    assert first == await plain.check(plain.decode(body))
    assert (first.retry_after_ms, first.limits[0].reset_ms) == (9250, 9250)
    assert cached.cache is not None and cached.cache.hits == 0
    clock.advance(1.234)
    again = await cached.check(cached.decode(body))
    assert cached.cache.hits == 1
    assert again == await plain.check(plain.decode(body))
    assert (again.retry_after, again.retry_after_ms) == (9, 8016)
    assert (again.limits[0].reset, again.limits[0].reset_ms) == (9, 8016)


def test_cached_bans_and_boxes_say_their_waits_to_the_millisecond() -> None:
    """A ban or penalty box answered from the cache says the time left to the millisecond
    (whole seconds rounded up), and a box's windows reset no later than the box ends."""
    clock = FakeClock()
    cache = LocalCache(10, now_ms=clock)
    rule = Rule(name="r", windows=(Window(limit=1, seconds=2), Window(limit=9, seconds=60)),
                key=("ip",))
    action = Action(name="a", rules=(rule,), flags=())
    banned = Outcome(status=Status.BANNED, now_ms=0, shadowed=False, culprit=1, wait_ms=5000,
                     windows=())
    boxed = Outcome(status=Status.PENALTY, now_ms=0, shadowed=False, culprit=1, wait_ms=5000,
                    windows=())
    cache.remember(action, ["b" * 22], ["s" * 22], 1, banned, clock.ms)
    cache.remember(action, ["c" * 22], ["t" * 22], 1, boxed, clock.ms)
    clock.ms += 1234
    ban = cache.lookup(action, ["b" * 22], ["s" * 22], 1, False)
    box = cache.lookup(action, ["c" * 22], ["t" * 22], 1, False)
    assert ban is not None and box is not None
    assert (ban.decision.reason, ban.decision.retry_after, ban.decision.retry_after_ms) == (
        "banned", 4, 3766)
    assert (box.decision.reason, box.decision.retry_after, box.decision.retry_after_ms) == (
        "banned", 4, 3766)
    assert [(w.reset, w.reset_ms) for w in box.decision.limits] == [(2, 2000), (4, 3766)]


BOX_CONFIG = """
[rules.r]
limit = "1 per 10 seconds, 100 per hour"
key = ["ip"]
penalty = "1 hour"
[actions.a]
rules = ["r"]
"""


async def test_a_box_says_its_wait_to_the_millisecond_from_redis_and_the_cache(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A penalty box Redis reports says its key's PTTL to the millisecond (whole seconds
    rounded up), in retry_after_ms and in the reset_ms of a window longer than what is left;
    the cache that remembers that answer counts down from the same millisecond."""
    config = config_from(BOX_CONFIG)
    clock = FakeClock()
    keyspace = Keyspace(SALT, prefix=key_prefix, grouping=config.ip)
    plain, cached = (Checker(config, keyspace, opened(Limiter(redis, timeout=2.0, clock=clock)),
                             FlagBoard(config.flags), cache=cache)
                     for cache in (None, LocalCache(100, now_ms=clock)))
    body = json.dumps({"action": "a", "ip": IP}).encode()
    assert (await plain.check(plain.decode(body))).allowed
    assert (await plain.check(plain.decode(body))).reason == "rate_limited"  # and boxed
    key = keyspace.penalty_key(keyspace.subject((("ip", keyspace.ip_value(IP)),)),
                               config.rules["r"])
    assert await redis.pexpire(key, 1_234_567)  # a box with a part second left
    before = await redis.pttl(key)
    boxed = await cached.check(cached.decode(body))  # Redis answers; the cache remembers
    after = await redis.pttl(key)
    assert cached.cache is not None and cached.cache.hits == 0
    assert boxed.reason == "banned" and after <= boxed.retry_after_ms <= before
    assert boxed.retry_after == -(-boxed.retry_after_ms // 1000)
    assert [w.reset_ms for w in boxed.limits] == [10_000, boxed.retry_after_ms]
    clock.advance(1.5)
    again = await cached.check(cached.decode(body))
    assert cached.cache.hits == 1
    assert again.retry_after_ms == boxed.retry_after_ms - 1500
    assert [w.reset_ms for w in again.limits] == [10_000, again.retry_after_ms]

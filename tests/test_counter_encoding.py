"""The sliding counter's compact state ("bucket:current:previous" per window) across config
changes, against a real redis-server: a window's count is kept, never misread."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.limiter import Limiter
from ratekeeper.storage.scripts import LuaScript, read_script

from support.common import SALT, FakeClock, config_from, opened

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

RULE = """
[rules.r]
limit = "{limit}"
key = ["ip"]
algorithm = "sliding-counter"
[actions.a]
rules = ["r"]
"""


def checker(limit: str, redis: aioredis.Redis, prefix: str, clock: FakeClock) -> Checker:
    config = config_from(RULE.format(limit=limit))
    return Checker(config, Keyspace(SALT, prefix=prefix, grouping=config.ip),
                   opened(Limiter(redis, timeout=2.0, clock=clock)), FlagBoard(config.flags))


async def ask(checker: Checker, **fields: Any) -> Any:
    body = {"action": "a", "ip": "192.0.2.9", **fields}
    return await checker.check(checker.decode(json.dumps(body).encode()))


async def test_the_state_holds_no_window_lengths(redis: aioredis.Redis, key_prefix: str,
                                                 clock: FakeClock) -> None:
    """Two windows are stored as two bucket:current:previous segments, short enough that
    Redis keeps the value inside its object (memory per subject)."""
    hourly = checker("3 per hour, 10 per day", redis, key_prefix, clock)
    await ask(hourly)
    [key] = await redis.keys(f"{key_prefix}:*")
    value = (await redis.get(key)).decode()
    hour, day = clock.ms // 3_600_000, clock.ms // 86_400_000
    assert value == f"{hour}:1:0,{day}:1:0"


async def test_adding_a_shorter_window_keeps_the_longer_windows_count(
        redis: aioredis.Redis, key_prefix: str, clock: FakeClock) -> None:
    """After a rule gains a window in front of its old one, the old window's hits still
    count (its segment is found by its bucket) and the new window starts from zero."""
    hourly = checker("3 per hour", redis, key_prefix, clock)
    assert [(await ask(hourly)).limits[0].remaining for _ in range(2)] == [2, 1]
    both = checker("10 per minute, 3 per hour", redis, key_prefix, clock)
    third = await ask(both)
    assert third.allowed
    assert [(s.window, s.remaining) for s in third.limits] == [(60, 9), (3600, 0)]
    fourth = await ask(both)
    assert not fourth.allowed and fourth.reason == "rate_limited"


async def test_removing_a_window_keeps_the_remaining_windows_count(
        redis: aioredis.Redis, key_prefix: str, clock: FakeClock) -> None:
    """After a rule loses its first window, the other window's hits still count."""
    both = checker("10 per minute, 3 per hour", redis, key_prefix, clock)
    await ask(both)
    await ask(both)
    hourly = checker("3 per hour", redis, key_prefix, clock)
    assert (await ask(hourly)).limits[0].remaining == 0
    assert not (await ask(hourly)).allowed


async def test_a_segment_of_another_window_is_never_read_as_this_one(
        redis: aioredis.Redis, key_prefix: str, clock: FakeClock) -> None:
    """A window whose own segment is missing counts from zero, whatever the others hold."""
    minute = checker("2 per minute", redis, key_prefix, clock)
    await ask(minute, cost=2)
    assert not (await ask(minute)).allowed
    # the same key now read as a day window: the minute's bucket is not a day bucket
    daily = checker("2 per day", redis, key_prefix, clock)
    assert (await ask(daily, cost=0)).limits[0].remaining == 2


async def test_refund_finds_the_window_after_the_rule_changed(
        redis: aioredis.Redis, key_prefix: str, clock: FakeClock) -> None:
    """A refund under a config that gained a window gives back the hour window's hit."""
    hourly = checker("3 per hour", redis, key_prefix, clock)
    taken = await ask(hourly, cost=2)
    assert taken.limits[0].remaining == 1
    both = checker("10 per minute, 3 per hour", redis, key_prefix, clock)
    plan = both.plans["a"]
    [key] = await redis.keys(f"{key_prefix}:*")
    given = await both.limiter.refund([key.decode()], 1, clock.ms, plan.refund_args)
    assert given == [1]
    assert (await ask(hourly, cost=0)).limits[0].remaining == 2


async def test_requests_of_one_call_write_the_same_state(redis: aioredis.Redis,
                                                         key_prefix: str, clock: FakeClock
                                                         ) -> None:
    """Two hits of one subject decided in one check.lua call leave the value two calls
    leave: one segment per window, both hits counted."""
    key = f"{key_prefix}:{{s}}:r"
    rule_set: list[str | int] = ["c", "0", 0, 2, 3, 3_600_000, 10, 86_400_000]
    args: list[str | int] = [clock.ms, 2, 1, len(rule_set), *rule_set, 1, 1, 1, 1, 1, 1]
    replies = await LuaScript(redis, "check", read_script("check"))(keys=[key, key], args=args)
    assert [reply[5] for reply in replies] == [2, 1]
    hour, day = clock.ms // 3_600_000, clock.ms // 86_400_000
    assert (await redis.get(key)).decode() == f"{hour}:2:0,{day}:2:0"

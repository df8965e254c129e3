"""The penalty box and shadow mode (per rule and global) against real Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.identity.keys import Keyspace

from support.admin import CONFIG, SALT, admin_settings, call, check
from support.common import FakeClock, config_from
from support.redis_servers import RedisServer

IP = "192.0.2.55"


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


def penalty_key(prefix: str, rule: str, ip: str) -> str:
    config = config_from(CONFIG)
    keyspace = Keyspace(SALT, prefix=prefix)
    subject = keyspace.subject((("ip", keyspace.ip_value(ip)),))
    return keyspace.penalty_key(subject, config.rules[rule])


async def test_penalty_box_outlasts_the_window(make_client: Any, settings_for: Any,
                                               clock: FakeClock, redis: aioredis.Redis,
                                               key_prefix: str) -> None:
    """Exceeding a rule with penalty = "1 hour" answers rate_limited once, then banned for
    the hour, even after the rule's own window has passed; a reset lets it out."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    for _ in range(2):
        assert (await check(client, action="create", ip=IP))["allowed"]
    first = await check(client, action="create", ip=IP)
    assert (first["allowed"], first["reason"]) == (False, "rate_limited")
    assert 3_590_000 < await redis.pttl(penalty_key(key_prefix, "boxed", IP)) <= 3_600_000

    boxed = await check(client, action="create", ip=IP)
    assert (boxed["allowed"], boxed["reason"]) == (False, "banned")
    assert 3590 <= boxed["retry_after"] <= 3600
    clock.advance(120)  # the 2-per-minute window is long gone
    assert (await check(client, action="create", ip=IP))["reason"] == "banned"
    assert (await check(client, action="create", ip="192.0.2.56"))["allowed"]

    await call(client, "POST", "/v1/admin/reset", json={"rule": "boxed", "ip": IP})
    assert await redis.exists(penalty_key(key_prefix, "boxed", IP)) == 0
    assert (await check(client, action="create", ip=IP))["allowed"]


async def test_a_penalty_box_denial_names_its_rule(make_client: Any, settings_for: Any,
                                                  clock: FakeClock) -> None:
    """A boxed client's answer names the rule that boxed it: in ``limits`` (nothing left, a
    reset no longer than the window), in the RateLimit headers and in the metric's label;
    the same whether Redis or the local cache answers."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    for _ in range(3):
        await check(client, action="create", ip=IP)
    for _ in range(2):  # Redis answers the first, the local cache the second
        response = await client.post("/v1/check", json={"action": "create", "ip": IP})
        boxed = await response.json()
        assert boxed["reason"] == "banned"
        assert [(s["rule"], s["remaining"]) for s in boxed["limits"]] == [("boxed", 0)]
        assert all(s["reset"] <= s["window"] for s in boxed["limits"])
        assert '"boxed"' in response.headers["RateLimit"]
        assert int(response.headers["Retry-After"]) == boxed["retry_after"] > 60
    metrics = await (await client.get("/metrics")).text()
    assert 'ratekeeper_decisions_total{action="create",outcome="banned",rule="boxed"}' in metrics


async def test_a_peek_never_boxes(make_client: Any, settings_for: Any, clock: FakeClock,
                                  redis: aioredis.Redis, key_prefix: str) -> None:
    """A cost-0 look at an exhausted rule says rate_limited but puts nobody in the box."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    for _ in range(2):
        await check(client, action="create", ip=IP)
    for _ in range(3):
        assert (await check(client, action="create", ip=IP, cost=0))["reason"] == "rate_limited"
    assert await redis.exists(penalty_key(key_prefix, "boxed", IP)) == 0
    clock.advance(61)
    assert (await check(client, action="create", ip=IP))["allowed"]


async def test_shadow_rule_reports_but_never_denies(make_client: Any, settings_for: Any,
                                                    clock: FakeClock) -> None:
    """A rule with shadow = true computes its limit and reports the would-be denial
    (shadow: true, reason rate_limited) while allowing; denials are counted in its top."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    first = await check(client, action="try", ip=IP)
    assert (first["allowed"], first["reason"], first["shadow"]) == (True, None, False)
    for _ in range(3):
        decision = await check(client, action="try", ip=IP)
        assert (decision["allowed"], decision["reason"], decision["shadow"]) == (
            True, "rate_limited", True)
        assert decision["limits"][0]["remaining"] == 0
    top = await call(client, "GET", "/v1/admin/top?rule=trial")
    assert [s["denied"] for s in top["subjects"]] == [3]


async def test_global_shadow_mode_flag(make_client: Any, settings_for: Any, clock: FakeClock,
                                       redis: aioredis.Redis, key_prefix: str) -> None:
    """With the built-in shadow-mode flag on, no rule denies and no penalty is given (even
    for subjects the local cache knew were over), bans still apply; turning it off enforces
    again."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    for _ in range(3):
        await check(client, action="register", ip=IP)
    assert (await check(client, action="register", ip=IP))["reason"] == "rate_limited"

    await call(client, "PUT", "/v1/admin/flags/shadow-mode",
               json={"enabled": True, "reason": "trying new limits"})
    decision = await check(client, action="register", ip=IP)
    assert (decision["allowed"], decision["reason"], decision["shadow"]) == (
        True, "rate_limited", True)
    for _ in range(4):
        decision = await check(client, action="create", ip=IP)
        assert decision["allowed"] is True
    assert decision["shadow"] is True
    assert await redis.exists(penalty_key(key_prefix, "boxed", IP)) == 0

    await call(client, "POST", "/v1/admin/bans", expect=201,
               json={"ip": "192.0.2.99", "duration": 60})
    assert (await check(client, action="register", ip="192.0.2.99"))["reason"] == "banned"

    await call(client, "PUT", "/v1/admin/flags/shadow-mode", json={"enabled": False})
    assert (await check(client, action="register", ip=IP))["reason"] == "rate_limited"
    assert (await check(client, action="create", ip=IP))["reason"] == "rate_limited"

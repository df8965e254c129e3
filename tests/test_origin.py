"""The origin's endpoints and the check answer's milliseconds, against real Redis: reading the
kill switches (and the state a flag is assumed to have when Redis holds none), exact state past
the local cache, and clears that only the origin can make, only of clearable actions."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ratekeeper.client import AsyncClient, SyncClient
from ratekeeper.config.rules import config_warnings
from ratekeeper.decision.flags import FlagState
from ratekeeper.errors import ConfigError
from ratekeeper.server.origin import ORIGIN_TOKEN_ENV
from ratekeeper.server.state import RUNTIME
from ratekeeper.settings import Settings

from support.admin import admin_of, check, dump, wait_until
from support.common import SALT, FakeClock, config_from
from support.redis_servers import free_port

TOKEN = "origin-token-9b2e71c4"
ORIGIN = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = """
[rules.per-ip]
limit = "2 per minute"
key = ["ip"]

[rules.boxed]
limit = "1 per minute"
key = ["user"]
penalty = "1 hour"

[actions.verify]
rules = ["per-ip"]
clearable = true

[actions.create]
rules = ["per-ip"]

[actions.boxed]
rules = ["boxed"]
clearable = true

[actions.write]
rules = []
flags = ["read-only", "disallow-deletion"]

[flags.read-only]
description = "Read-only mode"
message = "Read-only mode: writes are disabled."
assume = true
notify = true

[flags.disallow-deletion]
description = "Disallow deletion"

[flags.disable-scanning]
description = "Upload scanning off"
origin = true
"""

Make = Callable[..., Any]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings with the sidecar's origin tokens, one of them being rotated
    out, as an operator sets them."""
    return dataclasses.replace(settings, origin_tokens=(b"old-token-0000", TOKEN.encode()))


async def origin(client: TestClient[Any, Any], method: str, path: str, expect: int = 200,
                 **kwargs: Any) -> Any:
    kwargs.setdefault("headers", ORIGIN)
    resp = await client.request(method, path, **kwargs)
    assert resp.status == expect, await resp.text()
    return await resp.json()


def test_origin_tokens_are_read_from_the_environment() -> None:
    """RATEKEEPER_ORIGIN_TOKEN is a comma-separated list (rotation) that repr never shows;
    unset means none."""
    settings = Settings.from_env({ORIGIN_TOKEN_ENV: " a-secret , b-secret,"})
    assert settings.origin_tokens == (b"a-secret", b"b-secret")
    assert "secret" not in repr(settings)
    assert Settings.from_env({}).origin_tokens == ()


async def test_without_the_origin_token_nothing_is_read_or_cleared(make_client: Make) -> None:
    """No token, a wrong one, or an admin-style header: 401 on every origin endpoint, and the
    counters a clear names stay as they were."""
    client = await make_client(CONFIG)
    for _ in range(2):
        await check(client, action="verify", ip="203.0.113.7")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        body = {"action": "verify", "ip": "203.0.113.7"}
        for method, path in (("GET", "/v1/origin/flags"), ("POST", "/v1/origin/state"),
                             ("POST", "/v1/origin/clear")):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401
            assert "origin token" in (await resp.json())["error"]
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert not (await check(client, action="verify", ip="203.0.113.7"))["allowed"]


async def test_with_no_token_configured_the_endpoints_are_closed(make_client: Make,
                                                                 settings: Settings) -> None:
    """An unset RATEKEEPER_ORIGIN_TOKEN admits no one, whatever is sent."""
    client = await make_client(CONFIG,
                               app_settings=dataclasses.replace(settings, origin_tokens=()))
    await origin(client, "GET", "/v1/origin/flags", expect=401)
    await origin(client, "GET", "/v1/origin/flags", expect=401,
                 headers={"Authorization": "Bearer "})


async def test_a_clear_forgets_the_counters_and_this_process_cached_denial(
        make_client: Make) -> None:
    """A clearable action's counters are deleted for the subject given (another subject keeps
    its own), and the denial this process cached for it no longer answers."""
    client = await make_client(CONFIG)
    for ip in ("203.0.113.7", "203.0.113.8"):
        for _ in range(2):
            assert (await check(client, action="verify", ip=ip))["allowed"]
    denied = await check(client, action="verify", ip="203.0.113.7")
    assert denied["reason"] == "rate_limited"  # now cached in this process
    result = await origin(client, "POST", "/v1/origin/clear",
                          json={"action": "verify", "ip": "203.0.113.7"})
    assert result == {"cleared": True, "deleted": 1, "reason": None, "degraded": False}
    again = await check(client, action="verify", ip="203.0.113.7")
    assert again["allowed"] and again["limits"][0]["remaining"] == 1
    assert not (await check(client, action="verify", ip="203.0.113.8"))["allowed"]


async def test_only_a_clearable_action_is_cleared(make_client: Make) -> None:
    """An action without ``clearable = true`` answers 403 and keeps its counters, even though
    another action that is clearable shares its rule."""
    client = await make_client(CONFIG)
    for _ in range(2):
        await check(client, action="create", ip="198.51.100.1")
    resp = await client.post("/v1/origin/clear", headers=ORIGIN,
                             json={"action": "create", "ip": "198.51.100.1"})
    assert resp.status == 403
    assert "not clearable" in (await resp.json())["error"]
    assert not (await check(client, action="create", ip="198.51.100.1"))["allowed"]
    bad = await client.post("/v1/origin/clear", headers=ORIGIN, json={"action": "verify"})
    assert bad.status == 400  # a subject the rule needs is missing


async def test_a_clear_leaves_a_penalty_box(make_client: Make) -> None:
    """Penalty boxes are the admins' to lift: a clear deletes the counter, the box holds."""
    client = await make_client(CONFIG)
    await check(client, action="boxed", user="mallory")
    await check(client, action="boxed", user="mallory")  # over the limit: boxed
    assert (await check(client, action="boxed", user="mallory"))["reason"] == "banned"
    await origin(client, "POST", "/v1/origin/clear", json={"action": "boxed", "user": "mallory"})
    assert (await check(client, action="boxed", user="mallory"))["reason"] == "banned"


async def test_the_answer_carries_milliseconds(make_client: Make, clock: FakeClock) -> None:
    """reset_ms and retry_after_ms give what the whole seconds round up; an empty window
    resets in 0 with every hit left."""
    client = await make_client(CONFIG, clock=clock)
    empty = await check(client, action="create", ip="192.0.2.5", cost=0)
    assert empty["limits"] == [{"rule": "per-ip", "limit": 2, "window": 60, "remaining": 2,
                                "reset": 0, "reset_ms": 0}]
    await check(client, action="create", ip="192.0.2.5", cost=2)
    clock.advance(0.25)
    denied = await check(client, action="create", ip="192.0.2.5")
    assert (denied["retry_after"], denied["retry_after_ms"]) == (60, 59_750)
    assert (denied["limits"][0]["reset"], denied["limits"][0]["reset_ms"]) == (60, 59_750)


async def _subscribed(client: TestClient[Any, Any]) -> bool:
    return bool(admin_of(client).sync.subscribed)


async def test_state_reads_redis_where_the_cache_remembers(make_client: Make,
                                                           clock: FakeClock) -> None:
    """A denial this process caches keeps the remaining hits Redis gave it, to the
    millisecond of its reset; the origin's state reads Redis past the cache, so it sees a hit
    taken since, and it takes nothing."""
    client = await make_client(CONFIG, clock=clock)
    # (the first subscription to the change channel empties the cache: before it, then)
    await wait_until(lambda: _subscribed(client), timeout=10)
    await check(client, action="create", ip="192.0.2.6")
    clock.advance(0.5)
    denied = await check(client, action="create", ip="192.0.2.6", cost=2)  # Redis; remembered
    assert (denied["reason"], denied["limits"][0]["remaining"]) == ("rate_limited", 1)
    assert denied["limits"][0]["reset_ms"] == 59_500
    assert (await check(client, action="create", ip="192.0.2.6"))["allowed"]  # the last hit
    clock.advance(0.2)
    cached = await check(client, action="create", ip="192.0.2.6", cost=2)
    assert cached["limits"][0]["remaining"] == 1  # what Redis said when it denied
    assert cached["limits"][0]["reset_ms"] == 59_300
    state = await origin(client, "POST", "/v1/origin/state",
                         json={"action": "create", "ip": "192.0.2.6"})
    assert state["allowed"] is False
    assert (state["limits"][0]["remaining"], state["limits"][0]["reset_ms"]) == (0, 59_300)
    clock.advance(59.5)  # 60.2 s: the hit at 0 s has left, the one at 0.5 s still counts
    assert (await check(client, action="create", ip="192.0.2.6", cost=0))["limits"][0][
        "remaining"] == 1  # so the state call took nothing


async def test_flags_list_states_messages_and_banners(make_client: Make) -> None:
    """Every declared flag, with its message and notify; a flag Redis holds no state for is
    the config's assumption (read-only: on), until an admin's state replaces it."""
    client = await make_client(CONFIG)
    body = await origin(client, "GET", "/v1/origin/flags")
    flags = {flag["name"]: flag for flag in body["flags"]}
    assert set(flags) == {"read-only", "disallow-deletion", "disable-scanning", "shadow-mode"}
    assert flags["read-only"] == {"name": "read-only", "enabled": True,
                                  "message": "Read-only mode: writes are disabled.",
                                  "notify": True, "assumed": True, "expires_at": None}
    assert flags["disallow-deletion"]["enabled"] is False
    assert flags["disallow-deletion"]["message"] == "Disallow deletion"
    assert (await check(client, action="write"))["flag"] == "read-only"
    board = client.app[RUNTIME].flags
    board.update(FlagState("read-only", enabled=False, updated_by="alice", updated_at=1.0))
    board.update(FlagState("disallow-deletion", enabled=True, updated_by="alice",
                           updated_at=1.0))
    flags = {f["name"]: f for f in (await origin(client, "GET", "/v1/origin/flags"))["flags"]}
    assert flags["read-only"]["enabled"] is False and flags["read-only"]["assumed"] is False
    assert flags["disallow-deletion"]["enabled"] is True
    assert (await check(client, action="write"))["flag"] == "disallow-deletion"


async def test_an_assumed_flag_holds_while_redis_cannot_be_read(make_client: Make) -> None:
    """A sidecar started while Redis is down has read-only on (assume = true) and the
    others off, and says so."""
    dead = Settings(redis_url=f"redis://127.0.0.1:{free_port()}", ip_salt=SALT,
                    redis_timeout_ms=200, origin_tokens=(TOKEN.encode(),))
    client = await make_client(CONFIG, app_settings=dead)
    decision = await check(client, action="write")
    assert decision["reason"] == "disabled" and decision["flag"] == "read-only"
    flags = {f["name"]: f for f in (await origin(client, "GET", "/v1/origin/flags"))["flags"]}
    assert flags["read-only"]["enabled"] and flags["read-only"]["assumed"]
    assert not flags["disallow-deletion"]["enabled"]
    cleared = await origin(client, "POST", "/v1/origin/clear",
                           json={"action": "verify", "ip": "203.0.113.7"})
    assert cleared == {"cleared": False, "deleted": 0, "reason": "unavailable",
                       "degraded": True}


async def test_a_clear_stores_nothing_raw(make_client: Make,
                                          redis: aioredis.Redis, key_prefix: str) -> None:
    """The subjects of a clear reach Redis hashed, as a check's do."""
    client = await make_client(CONFIG)
    await check(client, action="verify", ip="203.0.113.77")
    await origin(client, "POST", "/v1/origin/clear", json={"action": "verify",
                                                            "ip": "203.0.113.77"})
    await check(client, action="verify", ip="203.0.113.77")
    assert b"203.0.113.77" not in await dump(redis, key_prefix)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_clients_read_flags_briefly_cached_and_clear(make_client: Make,
                                                           kind: str) -> None:
    """flags() is reused for flags_ttl; a fresh client sees a change; clear() and state()
    carry the origin token; an unreachable sidecar gives the last flags, marked stale."""
    client = await make_client(CONFIG)
    url = str(client.make_url("")).rstrip("/")
    board = client.app[RUNTIME].flags

    async def call(rk: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(rk, AsyncClient):
            return await getattr(rk, name)(*args, **kwargs)
        return await asyncio.to_thread(getattr(rk, name), *args, **kwargs)

    def make(base: str, **kwargs: Any) -> Any:
        cls = AsyncClient if kind == "async" else SyncClient
        return cls(base, timeout=2.0, origin_token=TOKEN, **kwargs)

    kept, fresh = make(url, flags_ttl=3600), make(url, flags_ttl=0)
    try:
        first = await call(kept, "flags")
        assert first.enabled("read-only") and not first.stale
        assert [f.name for f in first.notifications()] == ["read-only"]
        board.update(FlagState("read-only", enabled=False, updated_by="a", updated_at=1.0))
        assert (await call(kept, "flags")).enabled("read-only")  # within its ttl
        assert not (await call(fresh, "flags")).enabled("read-only")
        await check(client, action="verify", ip="192.0.2.9", cost=2)
        state = await call(fresh, "state", "verify", "192.0.2.9")
        assert state.limits[0].remaining == 0 and state.limits[0].reset_ms > 0
        result = await call(fresh, "clear", "verify", "192.0.2.9")
        assert result.cleared and result.deleted == 1
        await client.server.close()  # the sidecar goes away
        stale = await call(fresh, "flags")
        assert stale.stale and not stale.enabled("read-only")
        assert stale.get("read-only") is not None
        assert (await call(fresh, "clear", "verify", "192.0.2.9")).reason == "unavailable"
    finally:
        for rk in (kept, fresh):
            if isinstance(rk, AsyncClient):
                await rk.close()
            else:
                rk.close()


def test_flag_and_action_keys_are_checked() -> None:
    """assume, notify, origin and clearable are booleans; a flag the origin reads draws no
    'no action lists it' warning, an undeclared one still does."""
    bad = CONFIG.replace("assume = true", 'assume = "yes"').replace(
        "clearable = true\n\n[actions.create]", 'clearable = 1\n\n[actions.create]')
    with pytest.raises(ConfigError) as caught:
        config_from(bad)
    assert any("flags.read-only.assume: must be true or false" in e
               for e in caught.value.errors)
    assert any("actions.verify.clearable: must be true or false" in e
               for e in caught.value.errors)
    config = config_from(CONFIG + '\n[flags.forgotten]\ndescription = "x"\n')
    assert config.flags["read-only"].assume and config.actions["verify"].clearable
    warnings = config_warnings(config)
    assert len(warnings) == 1 and "flags.forgotten" in warnings[0]

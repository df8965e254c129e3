"""Bans against real Redis: any subject, hashed on the way in, listed by hash, lifted by id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from support.admin import CONFIG, admin_settings, call, check, dump, keys_under
from support.common import FakeClock
from support.redis_servers import RedisServer

IP = "203.0.113.77"


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


async def test_ban_an_ip_then_lift_it(make_client: Any, settings_for: Any,
                                      redis: aioredis.Redis, key_prefix: str) -> None:
    """A banned IP is denied (reason banned, retry_after the ban's time) on every action,
    before any counter; the list shows its hash, never the IP; lifting it by id restores
    access; ban and lift are audited by hash. The IP is nowhere in Redis."""
    client = await make_client(CONFIG, app_settings=settings_for())
    ban = await call(client, "POST", "/v1/admin/bans", expect=201,
                     json={"ip": IP, "duration": 3600, "reason": "signup spam"})
    assert len(ban["id"]) == 22 and ban["field"] == "ip" and ban["created_by"] == "alice"
    assert ban["expires_at"] == pytest.approx(ban["created_at"] + 3600)

    for action, extra in (("register", {}), ("login", {"user": "anyone"})):
        decision = await check(client, action=action, ip=IP, **extra)
        assert decision["allowed"] is False and decision["reason"] == "banned"
        assert 3590 <= decision["retry_after"] <= 3600
        assert decision["limits"] == []
    assert (await check(client, action="register", ip="203.0.113.78"))["allowed"]

    listed = await call(client, "GET", "/v1/admin/bans")
    assert [(b["id"], b["field"], b["reason"]) for b in listed["bans"]] == [
        (ban["id"], "ip", "signup spam")]
    assert IP not in str(listed)

    lifted = await call(client, "DELETE", f"/v1/admin/bans/{ban['id']}",
                        json={"reason": "appeal accepted"})
    assert lifted == {"id": ban["id"], "lifted": True}
    assert (await check(client, action="register", ip=IP))["allowed"]
    assert (await call(client, "GET", "/v1/admin/bans"))["bans"] == []

    events = (await call(client, "GET", "/v1/admin/audit"))["events"]
    assert [(e["kind"], e["target"], e["actor"], e["reason"]) for e in events] == [
        ("lift", f"ban:{ban['id']}", "alice", "appeal accepted"),
        ("ban", f"ban:{ban['id']}", "alice", "signup spam"),
    ]
    assert events[1]["detail"]["duration"] == 3600
    stored = await dump(redis, key_prefix)
    assert IP.encode() not in stored and b"203.0.113" not in stored


async def test_ban_other_subjects(make_client: Any, settings_for: Any) -> None:
    """A user, a CDN ip_hash and a subject hash taken from the top list can all be banned;
    each ban hits exactly that subject."""
    client = await make_client(CONFIG, app_settings=settings_for())
    await call(client, "POST", "/v1/admin/bans", expect=201,
               json={"user": "spammer", "duration": 600})
    assert (await check(client, action="login", ip=IP, user="spammer"))["reason"] == "banned"
    assert (await check(client, action="login", ip=IP, user="alice"))["allowed"]

    cdn = await call(client, "POST", "/v1/admin/bans", expect=201,
                     json={"ip_hash": "cdn-hash-of-some-ip", "duration": 600})
    assert cdn["field"] == "ip"
    decision = await check(client, action="register", ip_hash="cdn-hash-of-some-ip")
    assert decision["reason"] == "banned"

    for _ in range(5):
        await check(client, action="register", ip="192.0.2.200")
    top = await call(client, "GET", "/v1/admin/top?rule=per-ip")
    subject = top["subjects"][0]["subject"]
    by_hash = await call(client, "POST", "/v1/admin/bans", expect=201,
                         json={"subject_hash": subject, "duration": 600, "reason": "top #1"})
    assert by_hash["id"] == subject and by_hash["field"] == ""
    assert (await check(client, action="login", ip="192.0.2.200", user="x"))["reason"] == "banned"
    ids = {b["id"] for b in (await call(client, "GET", "/v1/admin/bans"))["bans"]}
    assert len(ids) == 3 and subject in ids


async def test_ipv6_ban_covers_the_whole_64(make_client: Any, settings_for: Any) -> None:
    """Banning one IPv6 address bans its /64 (the configured grouping), nothing else."""
    client = await make_client(CONFIG, app_settings=settings_for())
    await call(client, "POST", "/v1/admin/bans", expect=201,
               json={"ip": "2001:db8:1:2::1", "duration": 600})
    assert (await check(client, action="register", ip="2001:db8:1:2:ffff::9"))["reason"] == "banned"
    assert (await check(client, action="register", ip="2001:db8:1:3::1"))["allowed"]


async def test_banning_again_replaces_the_ban(make_client: Any, settings_for: Any,
                                              redis: aioredis.Redis, key_prefix: str) -> None:
    """A second ban of one subject keeps one entry with the new duration and reason."""
    client = await make_client(CONFIG, app_settings=settings_for())
    first = await call(client, "POST", "/v1/admin/bans", expect=201,
                       json={"ip": IP, "duration": 86400, "reason": "first"})
    await check(client, action="register", ip=IP)  # remembered as banned for a day
    second = await call(client, "POST", "/v1/admin/bans", expect=201,
                        json={"ip": IP, "duration": 60, "reason": "shorter"})
    assert first["id"] == second["id"]
    bans = (await call(client, "GET", "/v1/admin/bans"))["bans"]
    assert [(b["reason"], b["expires_at"] - b["created_at"]) for b in bans] == [("shorter", 60)]
    assert 0 < await redis.pttl(f"{key_prefix}:{{{first['id']}}}:b") <= 60_000
    assert (await check(client, action="register", ip=IP))["retry_after"] <= 60


async def test_expired_bans_leave_the_list(make_client: Any, settings_for: Any,
                                           clock: FakeClock) -> None:
    """A ban past its expiry is no longer listed (and is pruned from the index)."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    await call(client, "POST", "/v1/admin/bans", expect=201, json={"user": "u1", "duration": 60})
    await call(client, "POST", "/v1/admin/bans", expect=201, json={"user": "u2", "duration": 600})
    clock.advance(61)
    bans = (await call(client, "GET", "/v1/admin/bans"))["bans"]
    assert [b["expires_at"] - b["created_at"] for b in bans] == [600]


@pytest.mark.parametrize(("given", "seconds"), [
    (3600, 3600), ("3600", 3600), ("1h", 3600), ("90s", 90), ("1 day", 86400), ("2W", 14 * 86400),
])
async def test_duration_takes_seconds_or_a_duration(make_client: Any, settings_for: Any,
                                                    given: Any, seconds: int) -> None:
    """A ban's duration is whole seconds, or a duration as the CLI and the admin page take it
    ("1h", "90s", "1 day"): the ban lasts that many seconds, and so does its key in Redis."""
    client = await make_client(CONFIG, app_settings=settings_for())
    ban = await call(client, "POST", "/v1/admin/bans", expect=201,
                     json={"user": "mallory", "duration": given})
    assert ban["expires_at"] - ban["created_at"] == pytest.approx(seconds)
    event = (await call(client, "GET", "/v1/admin/audit"))["events"][0]
    assert event["detail"]["duration"] == seconds
    decision = await check(client, action="login", ip=IP, user="mallory")
    assert decision["reason"] == "banned" and seconds - 10 <= decision["retry_after"] <= seconds


@pytest.mark.parametrize(("body", "needle"), [
    ({"duration": 60}, "give exactly one subject"),
    ({"ip": IP, "user": "x", "duration": 60}, "give exactly one subject"),
    ({"ip": IP}, "missing required field `duration`"),
    ({"ip": IP, "duration": 0}, "duration"),
    ({"ip": IP, "duration": -1}, "duration"),
    ({"ip": IP, "duration": "forever"}, "duration must be a duration such as"),
    ({"ip": IP, "duration": "0d"}, "duration must be at least one second"),
    ({"ip": IP, "duration": "3661d"}, "duration must be at most 3660 days"),
    ({"ip": IP, "duration": True}, "duration"),
    ({"ip": "203.0.113.300", "duration": 60}, "not a valid IPv4 or IPv6 address"),
    ({"email": "a@b.c", "duration": 60}, "unknown field"),
    ({"subject_hash": "not-a-hash", "duration": 60}, "subject_hash"),
    ({"user": "x", "duration": 60, "reason": "also " + IP}, "must not contain an IP"),
])
async def test_bad_bans_are_400_and_change_nothing(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str,
        body: dict[str, Any], needle: str) -> None:
    """Every bad ban request is a 400 naming the problem, never echoing an IP; Redis stays
    empty."""
    client = await make_client(CONFIG, app_settings=settings_for())
    answer = await call(client, "POST", "/v1/admin/bans", json=body, expect=400)
    assert needle in answer["error"]
    assert IP not in answer["error"] and "203.0.113.300" not in answer["error"]
    assert "forever" not in answer["error"]
    assert await keys_under(redis, key_prefix) == []


async def test_lifting_what_is_not_there(make_client: Any, settings_for: Any,
                                         redis: aioredis.Redis, key_prefix: str) -> None:
    """Lifting an unknown id is a 404, a malformed id or body a 400; nothing is audited."""
    client = await make_client(CONFIG, app_settings=settings_for())
    answer = await call(client, "DELETE", "/v1/admin/bans/AAAAAAAAAAAAAAAAAAAAAA", expect=404)
    assert answer == {"error": "no active ban with that id"}
    await call(client, "DELETE", "/v1/admin/bans/203.0.113.77", expect=400)
    await call(client, "DELETE", "/v1/admin/bans/AAAAAAAAAAAAAAAAAAAAAA", expect=400,
               json={"why": "x"})
    assert await keys_under(redis, key_prefix) == []

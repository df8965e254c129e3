"""The admin API against real Redis: authentication, viewers, audit, reset, top lists."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.errors import SettingsError
from ratekeeper.server.auth import TokenAuth
from ratekeeper.settings import AdminToken, Settings

from support.admin import (
    ADMIN,
    ALICE_TOKEN,
    CONFIG,
    VICTOR_TOKEN,
    VIEWER,
    admin_of,
    admin_settings,
    call,
    check,
    dump,
    keys_under,
    runtime_of,
    wait_until,
)
from support.redis_servers import RedisServer, start_redis

IP = "198.51.100.23"
CHANGES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("PUT", "/v1/admin/flags/read-only", {"enabled": True}),
    ("POST", "/v1/admin/bans", {"ip": IP, "duration": 60, "reason": "spam"}),
    ("DELETE", "/v1/admin/bans/AAAAAAAAAAAAAAAAAAAAAA", None),
    ("POST", "/v1/admin/reset", {"action": "register", "ip": IP}),
]
READS = ["/v1/admin/flags", "/v1/admin/audit", "/v1/admin/bans", "/v1/admin/top?rule=per-ip"]


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer"},
    {"Authorization": ""},
    {"Authorization": ALICE_TOKEN},
    {"Authorization": "Basic " + base64.b64encode(f"alice:{ALICE_TOKEN}".encode()).decode()},
    {"Authorization": f"Bearer {ALICE_TOKEN}x"},
    {"Authorization": f"Bearer {ALICE_TOKEN[:-1]}"},
], ids=["none", "wrong", "empty", "bare-scheme", "empty-header", "no-scheme", "basic",
        "longer", "shorter"])
async def test_401_without_a_valid_token_and_nothing_changes(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str,
        headers: dict[str, str]) -> None:
    """Every admin call without a valid bearer token is a 401 JSON error with a
    WWW-Authenticate challenge; no key appears in Redis and checks still pass."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for method, path, body in CHANGES:
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"].startswith("a valid admin token is required")
    for path in READS:
        assert (await client.get(path, headers=headers)).status == 401
    assert (await client.get("/v1/admin/no-such-thing", headers=headers)).status == 401
    assert await keys_under(redis, key_prefix) == []
    assert (await check(client, action="register", ip=IP))["allowed"]


async def test_no_configured_token_means_no_admin(make_client: Any, settings_for: Any,
                                                  redis: aioredis.Redis,
                                                  key_prefix: str) -> None:
    """With no tokens configured, nothing at all gets in (not even an empty bearer)."""
    client = await make_client(CONFIG, app_settings=settings_for(admin_tokens=(),
                                                                 viewer_tokens=()))
    for headers in ({}, {"Authorization": "Bearer "}, ADMIN):
        response = await client.put("/v1/admin/flags/read-only", json={"enabled": True},
                                    headers=headers)
        assert response.status == 401
    assert await keys_under(redis, key_prefix) == []


async def test_viewer_reads_but_cannot_change(make_client: Any, settings_for: Any,
                                              redis: aioredis.Redis, key_prefix: str) -> None:
    """A viewer token may GET every admin list; every change it tries is a 403 naming the
    token's name, and changes nothing."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for path in READS:
        await call(client, "GET", path, headers=VIEWER)
    for method, path, body in CHANGES:
        answer = await call(client, method, path, headers=VIEWER, expect=403, json=body)
        assert answer == {"error": "token 'victor' may only read"}
    assert await keys_under(redis, key_prefix) == []


async def test_tokens_never_reach_logs_redis_or_answers(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """After changes made with a token and refused with another, neither token appears in
    the logs, in Redis or in any answer; the audit trail names the actor only."""
    caplog.set_level(logging.DEBUG)
    client = await make_client(CONFIG, app_settings=settings_for())
    answers = []
    for method, path, body in CHANGES:
        response = await client.request(method, path, json=body, headers=ADMIN)
        answers.append(await response.text())
        response = await client.request(method, path, json=body,
                                        headers={"Authorization": "Bearer guess-" + ALICE_TOKEN})
        answers.append(await response.text())
    for path in READS:
        answers.append(await (await client.get(path, headers=ADMIN)).text())
    stored = await dump(redis, key_prefix)
    for secret in (ALICE_TOKEN, VICTOR_TOKEN):
        assert secret not in caplog.text
        assert secret.encode() not in stored
        assert all(secret not in answer for answer in answers)
    assert b"alice" in stored  # the actor's name is what the audit trail keeps


async def test_audit_limit_and_order(make_client: Any, settings_for: Any) -> None:
    """?limit=N returns the N newest events; a bad limit or an unknown parameter is a 400."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for flag in ("read-only", "shadow-mode", "disallow-new-user-registration"):
        await call(client, "PUT", f"/v1/admin/flags/{flag}", json={"enabled": True})
    events = (await call(client, "GET", "/v1/admin/audit?limit=2"))["events"]
    assert [e["target"] for e in events] == ["disallow-new-user-registration", "shadow-mode"]
    assert all(set(e) >= {"at", "actor", "kind", "target", "detail", "reason"} for e in events)
    for query in ("limit=0", "limit=1001", "limit=x", "limit=", "colour=red"):
        body = await call(client, "GET", f"/v1/admin/audit?{query}", expect=400)
        assert set(body) == {"error"}


async def test_reset_clears_a_subjects_counters(make_client: Any, settings_for: Any,
                                                redis: aioredis.Redis, key_prefix: str) -> None:
    """POST /v1/admin/reset by action clears each of its rules for the given subjects, by
    rule only that rule; other subjects keep their counts; it is audited."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for ip, user in ((IP, "mallory"), ("203.0.113.5", "trudy")):
        for _ in range(3):
            assert (await check(client, action="login", ip=ip, user=user))["allowed"]
    assert (await check(client, action="login", ip=IP, user="bob"))["reason"] == "rate_limited"

    answer = await call(client, "POST", "/v1/admin/reset",
                        json={"action": "login", "ip": IP, "user": "mallory",
                              "reason": "false positive"})
    assert [c["rule"] for c in answer["cleared"]] == ["per-ip", "per-user"]
    assert all(c["deleted"] == 1 for c in answer["cleared"])
    decision = await check(client, action="login", ip=IP, user="mallory")
    assert decision["allowed"]
    assert [item["remaining"] for item in decision["limits"]] == [2, 4]
    assert (await check(client, action="login", ip="203.0.113.5",
                        user="x"))["reason"] == "rate_limited"

    answer = await call(client, "POST", "/v1/admin/reset", json={"rule": "per-ip",
                                                                 "ip": "203.0.113.5"})
    assert answer["cleared"][0]["deleted"] == 1
    assert (await check(client, action="login", ip="203.0.113.5", user="x"))["allowed"]
    event = (await call(client, "GET", "/v1/admin/audit?limit=2"))["events"][1]
    assert (event["kind"], event["target"], event["reason"]) == ("reset", "action:login",
                                                                 "false positive")
    assert IP.encode() not in await dump(redis, key_prefix)


@pytest.mark.parametrize(("body", "needle"), [
    ({}, "give either action or rule"),
    ({"action": "login", "rule": "per-ip", "ip": IP}, "give either action or rule"),
    ({"action": "nope", "ip": IP}, "unknown action"),
    ({"rule": "nope", "ip": IP}, "unknown rule"),
    ({"action": "login", "ip": IP}, "needs 'user'"),
    ({"rule": "per-ip", "user": "x"}, "needs ip or ip_hash"),
    ({"rule": "per-ip", "ip": "300.1.2.3"}, "not a valid IPv4 or IPv6 address"),
    ({"rule": "per-ip", "ip": IP, "ip_hash": "abc"}, "either ip or ip_hash"),
    ({"rule": "per-ip", "ip": IP, "colour": "red"}, "unknown field"),
    ({"rule": "global", "subject_hash": "A" * 22}, "global bucket"),
    ({"action": "login", "subject_hash": "A" * 22}, "subject_hash goes with rule alone"),
    ({"rule": "per-ip", "subject_hash": "short"}, "subject_hash"),
])
async def test_bad_resets_are_400_and_change_nothing(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str,
        body: dict[str, Any], needle: str) -> None:
    """Every bad reset is a 400 naming the problem (never echoing the IP); counters stay."""
    client = await make_client(CONFIG, app_settings=settings_for())
    for _ in range(3):
        await check(client, action="login", ip=IP, user="x")
    before = await dump(redis, key_prefix)
    answer = await call(client, "POST", "/v1/admin/reset", json=body, expect=400)
    assert needle in answer["error"] and "300.1.2.3" not in answer["error"]
    assert await dump(redis, key_prefix) == before
    assert (await check(client, action="login", ip=IP, user="y"))["reason"] == "rate_limited"


async def test_top_lists_the_most_denied_hashed_subjects(
        make_client: Any, settings_for: Any) -> None:
    """GET /v1/admin/top counts denials per hashed subject across processes (shadow rules
    included), most denied first, and never shows a raw IP."""
    first = await make_client(CONFIG, app_settings=settings_for())
    second = await make_client(CONFIG, app_settings=settings_for())
    plan = {"203.0.113.1": 5, "203.0.113.2": 2, "203.0.113.3": 0}
    for ip, denials in plan.items():
        for i in range(3 + denials):
            await check(first if i % 2 else second, action="register", ip=ip)
    for _ in range(3):
        await check(first, action="try", ip="203.0.113.9")

    await call(second, "GET", "/v1/admin/top?rule=per-ip")  # flushes the second's counts
    answer = await call(first, "GET", "/v1/admin/top?rule=per-ip")  # and the first's
    assert answer["rule"] == "per-ip" and answer["key"] == ["ip"] and answer["window"] == 3600
    assert [s["denied"] for s in answer["subjects"]] == [5, 2]
    assert all(len(s["subject"]) == 22 for s in answer["subjects"])
    answer = await call(first, "GET", "/v1/admin/top?rule=per-ip&limit=1")
    assert [s["denied"] for s in answer["subjects"]] == [5]
    shadow = await call(first, "GET", "/v1/admin/top?rule=trial")
    assert [s["denied"] for s in shadow["subjects"]] == [2]
    text = str(answer) + str(shadow)
    assert all(ip not in text for ip in plan)

    for query in ("", "?rule=", "?rule=nope", "?rule=per-ip&limit=0", "?rule=per-ip&x=1"):
        assert set(await call(first, "GET", f"/v1/admin/top{query}", expect=400)) == {"error"}


async def test_admin_changes_are_503_when_redis_is_down(make_client: Any,
                                                        key_prefix: str) -> None:
    """With Redis gone, every admin change and read that needs Redis is a 503 JSON error;
    the flags list answers this process's last known state, marked stale."""
    server = start_redis()
    try:
        client = await make_client(CONFIG, app_settings=admin_settings(server.url, key_prefix))
        server.stop()
        for method, path, body in CHANGES:
            answer = await call(client, method, path, json=body, expect=503)
            assert "Redis is unavailable" in answer["error"]
        for path in READS[1:]:
            await call(client, "GET", path, expect=503)
        assert (await call(client, "GET", "/v1/admin/flags"))["stale"] is True
    finally:
        server.stop()


def test_viewer_tokens_come_from_their_own_variable() -> None:
    """RATEKEEPER_VIEWER_TOKENS parses like the admin tokens; a token in both is refused."""
    env = {"RATEKEEPER_ADMIN_TOKENS": "alice:a-token,bob:b-token",
           "RATEKEEPER_VIEWER_TOKENS": "victor:v-token"}
    settings = Settings.from_env(env)
    assert [t.name for t in settings.admin_tokens] == ["alice", "bob"]
    assert [(t.name, t.token) for t in settings.viewer_tokens] == [("victor", "v-token")]
    assert "v-token" not in repr(settings)
    with pytest.raises(SettingsError, match="must not repeat a token"):
        Settings.from_env({**env, "RATEKEEPER_VIEWER_TOKENS": "eve:a-token"})
    with pytest.raises(SettingsError, match="RATEKEEPER_VIEWER_TOKENS"):
        Settings.from_env({"RATEKEEPER_VIEWER_TOKENS": "no-colon"})


def test_token_auth_knows_roles() -> None:
    """Bearer tokens map to their name and role; the scheme is case-insensitive."""
    auth = TokenAuth([AdminToken("alice", "t1")], [AdminToken("victor", "t2")])
    alice = auth.authenticate("bearer t1")
    victor = auth.authenticate("Bearer  t2 ")
    assert alice is not None and (alice.name, alice.can_write) == ("alice", True)
    assert victor is not None and (victor.name, victor.can_write) == ("victor", False)
    assert auth.authenticate("Bearer t3") is None
    assert auth.authenticate(None) is None


async def test_the_admin_api_on_a_redis_cluster(make_client: Any, redis_cluster: Any,
                                                key_prefix: str) -> None:
    """On a real 3-master cluster: a flag reaches a second process over plain pub/sub, a ban
    and its lift work and reach the other process's cache, reset and top work, and the audit
    trail has every change."""
    settings = admin_settings(redis_cluster.url, key_prefix, sync_interval_ms=3_600_000)
    first = await make_client(CONFIG, app_settings=settings)
    second = await make_client(CONFIG, app_settings=settings)
    assert runtime_of(second).store.kind == "cluster"

    async def second_says(reason: str | None, **fields: Any) -> bool:
        return bool((await check(second, **fields))["reason"] == reason)

    await wait_until(lambda: _subscribed(second))
    await call(first, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    await wait_until(lambda: second_says("disabled", action="signup-page"))
    await call(first, "PUT", "/v1/admin/flags/read-only", json={"enabled": False})
    await wait_until(lambda: second_says(None, action="signup-page"))

    ban = await call(first, "POST", "/v1/admin/bans", expect=201,
                     json={"ip": IP, "duration": 600, "reason": "spam"})
    assert await second_says("banned", action="login", ip=IP, user="u")
    assert [b["id"] for b in (await call(second, "GET", "/v1/admin/bans"))["bans"]] == [ban["id"]]
    await call(first, "DELETE", f"/v1/admin/bans/{ban['id']}")
    await wait_until(lambda: second_says(None, action="login", ip=IP, user="u", cost=0))

    for _ in range(4):
        await check(first, action="login", ip=IP, user="v")
    top = await call(first, "GET", "/v1/admin/top?rule=per-ip")
    assert [s["denied"] for s in top["subjects"]] == [1]
    cleared = await call(first, "POST", "/v1/admin/reset",
                         json={"action": "login", "ip": IP, "user": "v"})
    assert [c["deleted"] for c in cleared["cleared"]] == [1, 1]
    assert (await check(first, action="login", ip=IP, user="v"))["allowed"]

    kinds = [e["kind"] for e in (await call(second, "GET", "/v1/admin/audit"))["events"]]
    assert kinds == ["reset", "lift", "ban", "flag", "flag"]


async def _subscribed(client: Any) -> bool:
    return bool(admin_of(client).sync.subscribed)

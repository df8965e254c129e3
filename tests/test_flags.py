"""Kill switches against real Redis: round trip, audit, expiry, propagation, Redis outages."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.errors import StoreUnavailable

from support.admin import (
    ADMIN,
    ALICE_TOKEN,
    CONFIG,
    admin_of,
    admin_settings,
    call,
    check,
    keys_under,
    runtime_of,
    wait_until,
)
from support.common import FakeClock
from support.redis_servers import RedisServer, start_redis


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


async def test_flag_round_trip_with_audit_and_actor(make_client: Any,
                                                    settings_for: Any) -> None:
    """PUT on: the list shows who and when, a check is disabled with the message, the audit
    trail records actor, kind, target, detail and reason; PUT off undoes it, newest first."""
    client = await make_client(CONFIG, app_settings=settings_for())
    assert (await check(client, action="register", ip="192.0.2.1"))["allowed"]

    before = time.time()
    view = await call(client, "PUT", "/v1/admin/flags/disallow-new-user-registration",
                      json={"enabled": True, "message": "Spam wave: registrations paused.",
                            "reason": "incident 42"})
    assert view["enabled"] is True and view["updated_by"] == "alice"
    listed = {f["name"]: f for f in (await call(client, "GET", "/v1/admin/flags"))["flags"]}
    flag = listed["disallow-new-user-registration"]
    assert flag["enabled"] is True
    assert flag["message"] == "Spam wave: registrations paused."
    assert flag["updated_by"] == "alice" and flag["updated_at"] >= before - 1
    assert flag["expires_at"] is None
    assert listed["read-only"]["enabled"] is False

    decision = await check(client, action="register", ip="192.0.2.1")
    assert decision["allowed"] is False and decision["reason"] == "disabled"
    assert decision["flag"] == "disallow-new-user-registration"
    assert decision["message"] == "Spam wave: registrations paused."
    assert decision["limits"] == []  # decided before any counter was touched

    await call(client, "PUT", "/v1/admin/flags/disallow-new-user-registration",
               json={"enabled": False, "reason": "wave over"})
    assert (await check(client, action="register", ip="192.0.2.1"))["allowed"]

    events = (await call(client, "GET", "/v1/admin/audit?limit=10"))["events"]
    assert [(e["kind"], e["target"], e["actor"]) for e in events] == [
        ("flag", "disallow-new-user-registration", "alice"),
        ("flag", "disallow-new-user-registration", "alice"),
    ]
    off, on = events
    assert off["detail"] == {"enabled": False} and off["reason"] == "wave over"
    assert on["detail"] == {"enabled": True, "message": "Spam wave: registrations paused."}
    assert on["reason"] == "incident 42"
    assert off["at"] >= on["at"] >= before - 1


async def test_default_message_is_the_declared_one(make_client: Any,
                                                   settings_for: Any) -> None:
    """A flag turned on without a message shows users the message from the config."""
    client = await make_client(CONFIG, app_settings=settings_for())
    await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    decision = await check(client, action="login", ip="192.0.2.1", user="u")
    assert decision["allowed"]  # login is not blocked by read-only
    decision = await check(client, action="register", ip="192.0.2.1")
    assert decision["flag"] == "read-only"
    assert decision["message"] == "Read-only mode: writes are disabled."


async def test_unknown_flag_is_404_and_changes_nothing(make_client: Any, settings_for: Any,
                                                       redis: aioredis.Redis,
                                                       key_prefix: str) -> None:
    """PUT on a flag the config does not declare is a 404 JSON error; Redis stays empty."""
    client = await make_client(CONFIG, app_settings=settings_for())
    body = await call(client, "PUT", "/v1/admin/flags/disallow-everything", expect=404,
                      json={"enabled": True})
    assert body == {"error": "unknown flag: GET /v1/admin/flags lists them"}
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize(("body", "needle"), [
    (b"{", "malformed JSON"),
    (b"[]", "Expected `object`"),
    (b'{"enabled": true, "colour": "red"}', "unknown field"),
    (b'{"message": "x"}', "missing required field `enabled`"),
    (b'{"enabled": "yes"}', "Expected `bool`"),
    (b'{"enabled": true, "expires_in": 0}', "expires_in"),
    (b'{"enabled": true, "expires_in": -5}', "expires_in"),
    (b'{"enabled": true, "expires_in": "soon"}', "expires_in"),
    (b'{"enabled": true, "expires_in": 1.5}', "expires_in"),
    (b'{"enabled": false, "expires_in": 60}', "expires_in only applies"),
    (b'{"enabled": true, "reason": "spam from 203.0.113.9"}', "must not contain an IP"),
    (b'{"enabled": true, "message": "blocked 2001:db8::/64"}', "must not contain an IP"),
    (f'{{"enabled": true, "reason": "oops {ALICE_TOKEN}"}}'.encode(), "must not contain an"),
])
async def test_bad_flag_bodies_are_400_and_change_nothing(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str,
        body: bytes, needle: str) -> None:
    """Every malformed or unsafe body is a 400 naming the problem; nothing reaches Redis."""
    client = await make_client(CONFIG, app_settings=settings_for())
    response = await client.put("/v1/admin/flags/read-only", data=body, headers=ADMIN)
    assert response.status == 400
    error = (await response.json())["error"]
    assert needle in error
    assert ALICE_TOKEN not in error and "203.0.113.9" not in error
    assert await keys_under(redis, key_prefix) == []
    assert (await check(client, action="register", ip="192.0.2.1"))["allowed"]


@pytest.mark.parametrize(("given", "seconds"), [
    (7200, 7200), ("7200", 7200), ("2h", 7200), ("90 minutes", 5400), ("1d", 86400),
    (" 30S ", 30), ("366d", 366 * 86400),
])
async def test_expires_in_takes_seconds_or_a_duration(make_client: Any, settings_for: Any,
                                                      clock: FakeClock, given: Any,
                                                      seconds: int) -> None:
    """expires_in is whole seconds, or a duration as the CLI and the admin page take it
    ("2h", "1d", "90 minutes"): the flag ends that many seconds later, and the audit trail
    records the seconds."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    view = await call(client, "PUT", "/v1/admin/flags/read-only",
                      json={"enabled": True, "expires_in": given})
    assert view["expires_at"] == pytest.approx(clock.ms / 1000 + seconds, abs=0.01)
    event = (await call(client, "GET", "/v1/admin/audit"))["events"][0]
    assert event["detail"]["expires_in"] == seconds


@pytest.mark.parametrize(("given", "error"), [
    ("soon", "expires_in must be a duration such as 3600, 90s, 2h or 1d"),
    ("2 fortnights", "expires_in must be a duration such as 3600, 90s, 2h or 1d"),
    ("-5", "expires_in must be a duration such as 3600, 90s, 2h or 1d"),
    ("0h", "expires_in must be at least one second"),
    ("367d", "expires_in must be at most 366 days"),
    ("", "Expected `str` of length >= 1 - at `$.expires_in`"),
    ("9" * 40, "Expected `str` of length <= 32 - at `$.expires_in`"),
    (366 * 86400 + 1, "Expected `int` <= 31622400 - at `$.expires_in`"),
])
async def test_a_bad_expires_in_is_400_without_echo(make_client: Any, settings_for: Any,
                                                    redis: aioredis.Redis, key_prefix: str,
                                                    given: Any, error: str) -> None:
    """A duration that does not parse or is out of bounds is a 400 whose sentence says what
    is accepted, without the text sent; nothing reaches Redis."""
    client = await make_client(CONFIG, app_settings=settings_for())
    answer = await call(client, "PUT", "/v1/admin/flags/read-only", expect=400,
                        json={"enabled": True, "expires_in": given})
    assert answer == {"error": error}
    assert await keys_under(redis, key_prefix) == []


async def test_flag_expires_by_itself_once(make_client: Any, settings_for: Any,
                                           clock: FakeClock, redis: aioredis.Redis,
                                           key_prefix: str) -> None:
    """A flag with expires_in stops blocking when its time passes; one of the two processes
    records the expiry in Redis and the audit trail, exactly once."""
    settings = settings_for(sync_interval_ms=20)
    first = await make_client(CONFIG, clock=clock, app_settings=settings)
    second = await make_client(CONFIG, clock=clock, app_settings=settings)
    view = await call(first, "PUT", "/v1/admin/flags/read-only",
                      json={"enabled": True, "expires_in": 60})
    assert view["expires_at"] == pytest.approx(clock.ms / 1000 + 60, abs=0.01)

    async def both_blocked() -> bool:
        return all([(await check(c, action="register", ip="192.0.2.1"))["reason"] == "disabled"
                    for c in (first, second)])
    await wait_until(both_blocked)
    clock.advance(59)
    assert await both_blocked()

    clock.advance(2)
    for client in (first, second):
        assert (await check(client, action="register", ip="192.0.2.1"))["allowed"]
    flag = {f["name"]: f for f in (await call(second, "GET", "/v1/admin/flags"))["flags"]}
    assert flag["read-only"]["enabled"] is False

    async def expired_in_redis() -> bool:
        raw = await redis.hget(f"{key_prefix}:{{flags}}", "read-only")
        return raw is not None and json.loads(raw)["enabled"] is False
    await wait_until(expired_in_redis)
    for _ in range(3):  # more resync rounds by both processes add nothing
        await admin_of(first).sync.resync()
        await admin_of(second).sync.resync()
    events = (await call(first, "GET", "/v1/admin/audit"))["events"]
    assert [(e["kind"], e["actor"]) for e in events] == [("flag-expired", "ratekeeper"),
                                                         ("flag", "alice")]
    assert events[0]["target"] == "read-only"


async def test_shadow_mode_is_a_built_in_flag(make_client: Any, settings_for: Any) -> None:
    """The global shadow switch is listed and settable although the config does not declare it."""
    client = await make_client(CONFIG, app_settings=settings_for())
    names = [f["name"] for f in (await call(client, "GET", "/v1/admin/flags"))["flags"]]
    assert names == ["disallow-new-user-registration", "read-only", "shadow-mode"]
    await call(client, "PUT", "/v1/admin/flags/shadow-mode", json={"enabled": True})
    assert runtime_of(client).checker.shadow_all is True


async def test_lost_flags_are_restored_from_the_last_known_state(
        make_client: Any, settings_for: Any, redis: aioredis.Redis, key_prefix: str) -> None:
    """If Redis loses the flags (a restart without persistence), a process that knew them
    writes them back instead of letting every kill switch turn itself off."""
    client = await make_client(CONFIG, app_settings=settings_for(sync_interval_ms=20))
    await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    await redis.delete(f"{key_prefix}:{{flags}}")

    async def restored() -> bool:
        raw = await redis.hget(f"{key_prefix}:{{flags}}", "read-only")
        return raw is not None and json.loads(raw)["enabled"] is True
    await wait_until(restored)
    assert (await check(client, action="register", ip="192.0.2.1"))["reason"] == "disabled"
    kinds = [e["kind"] for e in (await call(client, "GET", "/v1/admin/audit"))["events"]]
    assert kinds == ["flags-restored", "flag"]


async def test_flag_state_is_kept_while_redis_is_down_and_refreshed_when_back(
        make_client: Any, key_prefix: str) -> None:
    """Two processes on a Redis that goes away: both keep blocking (no flag flips by itself,
    the list says its view is stale, admin changes get 503); when Redis comes back (empty),
    the flags are restored and a new change reaches the other process again."""
    server = start_redis()
    try:
        settings = admin_settings(server.url, key_prefix, sync_interval_ms=50)
        first = await make_client(CONFIG, app_settings=settings)
        second = await make_client(CONFIG, app_settings=settings)

        async def second_says(reason: str | None) -> bool:
            decision = await check(second, action="signup-page")
            return bool(decision["reason"] == reason)

        await call(first, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
        await wait_until(lambda: second_says("disabled"))

        server.stop()
        for client in (first, second):
            with pytest.raises(StoreUnavailable):
                await admin_of(client).sync.resync()
        await wait_until(lambda: _unsubscribed(second))
        assert await second_says("disabled")
        listed = await call(second, "GET", "/v1/admin/flags")
        assert listed["stale"] is True
        assert {f["name"]: f["enabled"] for f in listed["flags"]}["read-only"] is True
        body = await call(first, "PUT", "/v1/admin/flags/read-only", expect=503,
                          json={"enabled": False})
        assert "Redis is unavailable" in body["error"]
        assert await second_says("disabled")

        server.restart()  # no persistence: this Redis comes back empty
        client = aioredis.Redis.from_url(server.url)
        try:
            async def restored() -> bool:
                return bool(await client.hexists(f"{key_prefix}:{{flags}}", "read-only"))
            await wait_until(restored)
        finally:
            await client.aclose()
        await wait_until(lambda: _subscribed(second))
        assert await second_says("disabled")

        await call(first, "PUT", "/v1/admin/flags/read-only", json={"enabled": False})
        await wait_until(lambda: second_says(None))
    finally:
        server.stop()


async def _unsubscribed(client: Any) -> bool:
    return not admin_of(client).sync.subscribed


async def _subscribed(client: Any) -> bool:
    return bool(admin_of(client).sync.subscribed)


# -- every worker of a real server ------------------------------------------------------------

SIGNUP = {"action": "signup-page"}  # flags only: no Redis call, so only the flag state decides


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def _pin_workers(port: int, workers: int) -> dict[int, http.client.HTTPConnection]:
    """One keep-alive connection per worker process, found by the pid /healthz reports.

    The workers accept from one shared socket, so which one takes a new connection is up to
    the scheduler: keep opening connections, a little apart, until every worker took one.
    """
    pinned: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + 20
    while len(pinned) < workers and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        _, health = _request(conn, "GET", "/healthz")
        if health["pid"] in pinned:
            conn.close()
            time.sleep(0.01)
        else:
            pinned[health["pid"]] = conn
    if len(pinned) < workers:
        for conn in pinned.values():
            conn.close()
        raise AssertionError(f"only reached workers {sorted(pinned)}")
    return pinned


@pytest.mark.slow
def test_flag_change_reaches_every_worker_within_100ms(
        serve_process: Any, redis_server: RedisServer, key_prefix: str) -> None:
    """With 2 workers (SO_REUSEPORT), each worker's own checks answer with the new flag state
    within 100 ms after the PUT returns, for turning it on and off again."""
    env = {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": "x" * 24,
           "RATEKEEPER_KEY_PREFIX": key_prefix,
           "RATEKEEPER_ADMIN_TOKENS": f"alice:{ALICE_TOKEN}",
           # a long resync, so pub/sub alone must carry the change
           "RATEKEEPER_SYNC_INTERVAL_MS": "60000"}
    server = serve_process(CONFIG, env, workers=2)
    workers = _pin_workers(server.port, 2)
    admin = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for conn in workers.values():
            assert _request(conn, "POST", "/v1/check", SIGNUP)[1]["allowed"] is True
        figures = []
        for enabled, expected in ((True, "disabled"), (False, None)):
            status, _ = _request(admin, "PUT", "/v1/admin/flags/read-only",
                                 {"enabled": enabled}, ADMIN)
            assert status == 200
            put_returned = time.monotonic()
            seen: dict[int, float] = {}
            while len(seen) < len(workers) and time.monotonic() - put_returned < 5:
                for pid, conn in workers.items():
                    if pid not in seen:
                        _, decision = _request(conn, "POST", "/v1/check", SIGNUP)
                        if decision["reason"] == expected:
                            seen[pid] = time.monotonic() - put_returned
            figures.append(seen)
            assert set(seen) == set(workers), f"workers never saw the change: {seen}"
            assert max(seen.values()) <= 0.100, f"seconds per worker: {seen}"
    finally:
        for conn in (admin, *workers.values()):
            conn.close()
    print("propagation, seconds after the PUT returned, per worker pid:", figures)

"""POST /v1/check and /v1/check/batch over HTTP: fields, headers, and every bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from support.common import FakeClock

WALK = """
[rules.five]
limit = "5 per minute"
key = ["ip"]
[rules.user-day]
limit = "100 per day"
key = ["user"]
algorithm = "sliding-counter"
[actions.login]
rules = ["five"]
[actions.upload]
rules = ["five", "user-day"]
flags = ["no-uploads"]
[flags.no-uploads]
description = "stop uploads"
"""


async def test_five_per_minute_walk_over_http(make_client: Any, clock: FakeClock) -> None:
    """remaining 4, 3, 2, 1, 0, then denied with retry_after > 0 and the IETF headers."""
    client = await make_client(WALK, clock=clock)
    for expected in (4, 3, 2, 1, 0):
        resp = await client.post("/v1/check", json={"action": "login", "ip": "203.0.113.7"})
        assert resp.status == 200
        body = await resp.json()
        assert body["allowed"] is True and body["reason"] is None
        # reset: until the oldest counted hit (the first, at 0 s) leaves the window
        reset = 60 - 2 * (4 - expected)
        assert body["limits"] == [{"rule": "five", "limit": 5, "window": 60,
                                   "remaining": expected, "reset": reset,
                                   "reset_ms": reset * 1000}]
        assert resp.headers["RateLimit-Policy"] == '"five";q=5;w=60'
        assert resp.headers["RateLimit"] == f'"five";r={expected};t={reset}'
        assert "Retry-After" not in resp.headers
        clock.advance(2)
    resp = await client.post("/v1/check", json={"action": "login", "ip": "203.0.113.7"})
    assert resp.status == 200
    body = await resp.json()
    # hits at 0, 2, 4, 6, 8 s; at 10 s the first leaves the window in 50 s
    assert body == {"allowed": False, "reason": "rate_limited", "action": "login",
                    "retry_after": 50, "retry_after_ms": 50_000, "flag": None,
                    "message": None, "degraded": False, "shadow": False,
                    "limits": [{"rule": "five", "limit": 5, "window": 60, "remaining": 0,
                                "reset": 50, "reset_ms": 50_000}]}
    assert resp.headers["Retry-After"] == "50"
    assert resp.headers["RateLimit"] == '"five";r=0;t=50'
    for value in resp.headers.values():
        assert "203.0.113.7" not in value


async def test_multi_window_rules_get_numbered_policies(make_client: Any) -> None:
    """A rule with two windows shows up as rule-0 and rule-1 in the headers."""
    client = await make_client(WALK.replace('"100 per day"', '"10 per hour, 100 per day"'))
    resp = await client.post("/v1/check", json={"action": "upload", "ip": "192.0.2.1",
                                                "user": "alice"})
    assert resp.headers["RateLimit-Policy"] == (
        '"five";q=5;w=60, "user-day-0";q=10;w=3600, "user-day-1";q=100;w=86400')


async def test_batch_answers_in_order(make_client: Any) -> None:
    """A batch decides each check and answers in the order asked."""
    client = await make_client(WALK)
    checks = [{"action": "login", "ip": "192.0.2.2", "cost": 5},
              {"action": "login", "ip": "192.0.2.2"},
              {"action": "login", "ip": "192.0.2.3", "cost": 0}]
    resp = await client.post("/v1/check/batch", json={"checks": checks})
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert [r["allowed"] for r in results] == [True, False, True]
    assert [r["limits"][0]["remaining"] for r in results] == [0, 0, 5]


BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("malformed json", b'{"action": "login", "ip": ', "malformed JSON"),
    ("not an object", b'["login"]', "Expected `object`"),
    ("missing action", b'{"ip": "192.0.2.1"}', "missing required field `action`"),
    ("action not a string", b'{"action": 7, "ip": "192.0.2.1"}', "Expected `str`"),
    ("unknown action", b'{"action": "nope", "ip": "192.0.2.1"}', "unknown action"),
    ("unknown field", b'{"action": "login", "ip": "192.0.2.1", "colour": "red"}',
     "unknown field"),
    ("missing subject", b'{"action": "upload", "ip": "192.0.2.1"}',
     "needs 'user' (rule 'user-day')"),
    ("missing ip", b'{"action": "login"}', "needs ip or ip_hash"),
    ("bad ip", b'{"action": "login", "ip": "192.0.2.300"}', "not a valid IPv4 or IPv6"),
    ("ip with a port", b'{"action": "login", "ip": "192.0.2.1:80"}', "not a valid IPv4"),
    ("ip and ip_hash", b'{"action": "login", "ip": "192.0.2.1", "ip_hash": "abc"}',
     "either ip or ip_hash"),
    ("negative cost", b'{"action": "login", "ip": "192.0.2.1", "cost": -1}', ">= 0"),
    ("fractional cost", b'{"action": "login", "ip": "192.0.2.1", "cost": 1.5}',
     "Expected `int`"),
    ("string cost", b'{"action": "login", "ip": "192.0.2.1", "cost": "1"}', "Expected `int`"),
    ("bool cost", b'{"action": "login", "ip": "192.0.2.1", "cost": true}', "Expected `int`"),
    ("huge cost", b'{"action": "login", "ip": "192.0.2.1", "cost": 10000000000}', "<="),
    ("user not a string", b'{"action": "upload", "ip": "192.0.2.1", "user": 5}',
     "got `int` - at `$.user`"),
    ("empty user", b'{"action": "upload", "ip": "192.0.2.1", "user": ""}', "length >= 1"),
    ("null action", b'{"action": null}', "Expected `str`"),
    ("empty body", b"", "malformed JSON"),
]


@pytest.mark.parametrize(("name", "body", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_a_400_and_changes_nothing(
        make_client: Any, redis: aioredis.Redis, key_prefix: str, name: str, body: bytes,
        message: str) -> None:
    """Each bad input gets 400 with a sentence naming the problem; no key is written."""
    client = await make_client(WALK)
    resp = await client.post("/v1/check", data=body,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert message in error
    assert "192.0.2" not in error
    batch = await client.post("/v1/check/batch",
                              data=b'{"checks": [{"action": "login", "ip": "192.0.2.9"}, '
                                   + (body or b"null") + b"]}")
    assert batch.status == 400
    assert [k async for k in redis.scan_iter(match=f"{key_prefix}:*")] == []


async def test_batch_input_errors(make_client: Any) -> None:
    """An empty batch and a non-list batch are 400s."""
    client = await make_client(WALK)
    for body in ({"checks": []}, {"checks": {}}, {}, {"checks": [], "extra": 1}):
        resp = await client.post("/v1/check/batch", json=body)
        assert resp.status == 400, body
        assert (await resp.json())["error"]


async def test_body_over_64_kib_is_a_413(make_client: Any, redis: aioredis.Redis,
                                        key_prefix: str) -> None:
    """A body over 64 KiB gets 413 with a JSON error and changes nothing."""
    client = await make_client(WALK)
    padding = "x" * (64 * 1024)
    body = json.dumps({"action": "login", "ip": "192.0.2.1", "pad": padding}).encode()
    resp = await client.post("/v1/check", data=body)
    assert resp.status == 413
    assert "64 KiB" in (await resp.json())["error"]
    assert [k async for k in redis.scan_iter(match=f"{key_prefix}:*")] == []


async def test_wrong_method_and_path_are_json_4xx(make_client: Any) -> None:
    """GET on the check endpoint is a 405 and an unknown path a 404, both JSON."""
    client = await make_client(WALK)
    resp = await client.get("/v1/check")
    assert resp.status == 405
    assert (await resp.json())["error"]
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"]


async def test_ip_hash_is_a_separate_bucket_and_rehashed(
        make_client: Any, redis: aioredis.Redis, key_prefix: str) -> None:
    """ip_hash input is keyed again: the CDN's hash never appears in Redis."""
    client = await make_client(WALK)
    cdn_hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    for _ in range(5):
        resp = await client.post("/v1/check", json={"action": "login", "ip_hash": cdn_hash})
        assert (await resp.json())["allowed"]
    resp = await client.post("/v1/check", json={"action": "login", "ip_hash": cdn_hash})
    assert not (await resp.json())["allowed"]
    async for key in redis.scan_iter(match=f"{key_prefix}:*"):
        assert cdn_hash[:16].encode() not in key
        assert cdn_hash[:16].encode() not in (await redis.dump(key) or b"")


async def test_health_and_readiness(make_client: Any) -> None:
    """/healthz answers; /readyz reports Redis reachable with scripts loaded."""
    client = await make_client(WALK)
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"


async def test_a_405_is_json_and_says_which_method_is_allowed(make_client: Any) -> None:
    """GET or PUT on a POST-only path: a JSON 405 with ``Allow: POST``; GET-only paths say
    GET (and HEAD)."""
    client = await make_client(WALK)
    for method, path in (("GET", "/v1/check"), ("PUT", "/v1/check/batch"),
                         ("DELETE", "/v1/refund")):
        resp = await client.request(method, path)
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert set(await resp.json()) == {"error"}
    resp = await client.post("/healthz")
    assert resp.status == 405 and "GET" in resp.headers["Allow"]

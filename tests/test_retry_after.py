"""Retry-After: one rule on every path, sent only when trying again can succeed at a known
time (a rate limit, a ban with an end, a kill switch with an expiry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ratekeeper.api.headers import rate_limit_headers, retry_after
from ratekeeper.api.problem import denial, passing_headers
from ratekeeper.api.wire import Decision, LimitState

from support.admin import admin_settings, call
from support.redis_servers import RedisServer

CONFIG = """
[rules.per-ip]
limit = "1 per minute"
key = ["ip"]
[actions.upload]
rules = ["per-ip"]
flags = ["no-uploads"]
[flags.no-uploads]
description = "stop uploads"
[[routes]]
method = "POST"
path = "/upload"
action = "upload"
"""
AUTHZ = {"X-Original-Method": "POST", "X-Original-URI": "/upload"}
Client = TestClient[Any, Any]
LIMIT = [LimitState(rule="per-ip", limit=1, window=60, remaining=0, reset=40)]


@pytest.mark.parametrize(("decision", "expected"), [
    (Decision(allowed=True, reason=None, action="a", limits=LIMIT), None),
    (Decision(allowed=False, reason="rate_limited", action="a", retry_after=40,
              limits=LIMIT), 40),
    (Decision(allowed=False, reason="rate_limited", action="a", retry_after=0), 1),
    (Decision(allowed=False, reason="rate_limited", action="a", retry_after=1,
              degraded=True), 1),
    (Decision(allowed=True, reason="rate_limited", action="a", shadow=True, limits=LIMIT),
     None),
    (Decision(allowed=False, reason="banned", action="a", retry_after=300), 300),
    (Decision(allowed=False, reason="banned", action="a"), None),
    (Decision(allowed=False, reason="disabled", action="a", flag="f"), None),
    (Decision(allowed=False, reason="disabled", action="a", flag="f", retry_after=90), 90),
], ids=["allowed", "limited", "limited-now", "fail-closed", "shadow", "banned-until",
        "banned-forever", "switch-no-expiry", "switch-expiring"])
def test_one_rule_for_every_path(decision: Decision, expected: int | None) -> None:
    """The check answer's headers and a proxy's or middleware's denial agree, case by case."""
    assert retry_after(decision) == expected
    check_headers = rate_limit_headers(decision)
    refusal = denial(decision)
    proxy_headers = passing_headers(decision) if refusal is None else refusal.headers
    for headers in (check_headers, proxy_headers):
        assert headers.get("Retry-After") == (None if expected is None else str(expected))


@pytest.fixture
async def client(make_client: Callable[..., Any], redis_server: RedisServer,
                 key_prefix: str) -> Client:
    """The service with an admin token, on real Redis."""
    made: Client = await make_client(CONFIG, app_settings=admin_settings(redis_server.url,
                                                                         key_prefix))
    return made


async def test_a_kill_switch_without_expiry_sends_no_retry_after_anywhere(
        client: Client) -> None:
    """With the switch on until turned off, /v1/check and /v1/authz both refuse without a
    Retry-After; a rate limit still sends one on both."""
    await call(client, "PUT", "/v1/admin/flags/no-uploads", json={"enabled": True})
    check = await client.post("/v1/check", json={"action": "upload", "ip": "192.0.2.1"})
    body = await check.json()
    assert (body["reason"], body["retry_after"]) == ("disabled", 0)
    assert "Retry-After" not in check.headers
    authz = await client.get("/v1/authz", headers={**AUTHZ, "X-Real-IP": "192.0.2.1"})
    assert authz.status == 403 and "Retry-After" not in authz.headers
    await call(client, "PUT", "/v1/admin/flags/no-uploads", json={"enabled": False})
    for _ in range(2):
        check = await client.post("/v1/check", json={"action": "upload", "ip": "192.0.2.2"})
    assert (await check.json())["reason"] == "rate_limited"
    assert 0 < int(check.headers["Retry-After"]) <= 60
    authz = await client.get("/v1/authz", headers={**AUTHZ, "X-Real-IP": "192.0.2.2"})
    assert authz.status == 429 and 0 < int(authz.headers["Retry-After"]) <= 60


async def test_an_expiring_kill_switch_says_the_same_on_both_paths(client: Client) -> None:
    """A switch with an expiry: the header, on /v1/check and /v1/authz, is the answer's
    retry_after when it carries one (the seconds until the switch turns itself off), and
    absent when it does not; never more than the expiry."""
    await call(client, "PUT", "/v1/admin/flags/no-uploads",
               json={"enabled": True, "expires_in": 120})
    check = await client.post("/v1/check", json={"action": "upload", "ip": "192.0.2.3"})
    body = await check.json()
    assert body["reason"] == "disabled" and 0 <= body["retry_after"] <= 120
    expected = str(body["retry_after"]) if body["retry_after"] > 0 else None
    assert check.headers.get("Retry-After") == expected
    authz = await client.get("/v1/authz", headers={**AUTHZ, "X-Real-IP": "192.0.2.3"})
    assert authz.status == 403
    shown = authz.headers.get("Retry-After")
    assert (shown is None) == (expected is None)
    assert shown is None or 0 < int(shown) <= 120

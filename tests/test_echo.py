"""Client text never comes back: error bodies and log lines name what is wrong in the
schema's or the config's terms, never in the client's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from support.admin import CONFIG, admin_settings, call, keys_under
from support.redis_servers import RedisServer

MARKERS = ["2001:db8:1:2::5", "203.0.113.7", "evil\nname", "<script>", "s3cr3t-m4rker"]
Client = TestClient[Any, Any]


@pytest.fixture
async def client(make_client: Callable[..., Any], redis_server: RedisServer,
                 key_prefix: str) -> Client:
    """The service with an admin token (alice), on real Redis."""
    made: Client = await make_client(CONFIG, app_settings=admin_settings(redis_server.url,
                                                                         key_prefix))
    return made


def assert_no_marker(text: str, marker: str) -> None:
    assert marker not in text, text
    assert marker.replace("\n", "\\n") not in text, text


@pytest.mark.parametrize("marker", MARKERS)
async def test_an_unknown_field_is_named_by_where_it_is_not_by_its_name(
        client: Client, marker: str) -> None:
    """An unknown field in a check, a batch, a refund, a ban or a flag change is a 400 that
    gives its JSON path and the fields we know there, never the name the client sent."""
    check = await client.post("/v1/check", json={"action": "register", "ip": "192.0.2.1",
                                                 marker: "x"})
    assert check.status == 400
    error = (await check.json())["error"]
    assert_no_marker(error, marker)
    assert "unknown field" in error and "action, ip, ip_hash, cost" in error
    checks: list[dict[str, Any]] = [{"action": "register", "ip": "192.0.2.1"}] * 3
    batch = await client.post("/v1/check/batch", json={"checks": [
        *checks, {"action": "register", "ip": "192.0.2.1", marker: 1}]})
    assert batch.status == 400
    error = (await batch.json())["error"]
    assert_no_marker(error, marker)
    assert "unknown field" in error and "$.checks[3]" in error
    refund = await client.post("/v1/refund", json={"token": "x", marker: 1})
    assert refund.status == 400
    assert_no_marker((await refund.json())["error"], marker)
    ban = await call(client, "POST", "/v1/admin/bans", expect=400,
                     json={"ip": "192.0.2.1", "duration": 60, marker: 1})
    assert_no_marker(ban["error"], marker)
    flag = await call(client, "PUT", "/v1/admin/flags/read-only", expect=400,
                      json={"enabled": True, marker: 1})
    assert_no_marker(flag["error"], marker)
    assert "enabled, message, reason, expires_in" in flag["error"]


async def test_schema_errors_still_say_what_is_wrong(client: Client) -> None:
    """What the schema expects is kept: types, bounds, required names, malformed JSON."""
    cases = {
        b'{"action": 7, "ip": "192.0.2.1"}': "Expected `str`, got `int` - at `$.action`",
        b'{"ip": "192.0.2.1"}': "Object missing required field `action`",
        b'{"action": "register", "ip": "192.0.2.1", "cost": -1}': "Expected `int` >= 0",
        b'{"action": "register"} 203.0.113.7': "malformed JSON",
        b'{"action": "203.0.113.7': "malformed JSON",
    }
    for body, needle in cases.items():
        resp = await client.post("/v1/check", data=body,
                                 headers={"Content-Type": "application/json"})
        error = (await resp.json())["error"]
        assert resp.status == 400 and needle in error, (body, error)
        assert "203.0.113.7" not in error


@pytest.mark.parametrize("marker", ["203.0.113.7", "no-such-thing", "2001:db8::5"])
async def test_unknown_admin_names_are_not_repeated(client: Client, redis: aioredis.Redis,
                                                   key_prefix: str, marker: str) -> None:
    """An unknown flag, action, rule, query parameter or ban id: a 4xx that does not repeat
    it (even when it looks like a name), and nothing written."""
    answers = [
        await call(client, "PUT", f"/v1/admin/flags/{marker}", expect=404,
                   json={"enabled": True}),
        await call(client, "POST", "/v1/admin/reset", expect=400,
                   json={"action": marker, "ip": "192.0.2.1"}),
        await call(client, "POST", "/v1/admin/reset", expect=400,
                   json={"rule": marker, "ip": "192.0.2.1"}),
        await call(client, "GET", f"/v1/admin/top?rule={marker}", expect=400),
        await call(client, "GET", f"/v1/admin/audit?{marker}=1", expect=400),
        await call(client, "DELETE", "/v1/admin/bans/AAAAAAAAAAAAAAAAAAAAAA", expect=404),
    ]
    for answer in answers:
        assert marker not in answer["error"], answer
        assert "AAAAAAAAAAAAAAAAAAAAAA" not in answer["error"]
    assert "unknown flag" in answers[0]["error"]
    assert "unknown action" in answers[1]["error"]
    assert "unknown rule" in answers[2]["error"] and "unknown rule" in answers[3]["error"]
    assert "limit" in answers[4]["error"]  # what the path does take
    assert await keys_under(redis, key_prefix) == []


async def test_config_names_are_still_named(client: Client) -> None:
    """A name the config defines may appear: a rule that needs a subject says which."""
    answer = await call(client, "POST", "/v1/admin/reset", expect=400,
                        json={"rule": "per-user"})
    assert "per-user" in answer["error"]


async def test_refused_admin_page_posts_log_the_route_not_the_path(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """Posts without a session to paths the client chose, and a cross-site post with a
    made-up Sec-Fetch-Site: the page and the log name our route and our sentence only."""
    caplog.set_level(logging.DEBUG)
    for path in ("/admin/flags/203.0.113.7%0a2026-01-01%20ERROR%20forged",
                 "/admin/bans/2001:db8::5/lift"):
        resp = await client.post(path, data={"csrf": "x"}, allow_redirects=False)
        assert resp.status == 401
        assert "203.0.113.7" not in await resp.text()
    resp = await client.post("/admin/signin", data={"csrf": "x", "token": "t"},
                             headers={"Sec-Fetch-Site": "evil-203.0.113.7"})
    assert resp.status == 403
    page = await resp.text()
    assert "203.0.113.7" not in page and "evil" not in page
    assert "the browser says the form came from elsewhere" in page
    resp = await client.post("/admin/signin", data={"csrf": "x", "token": "t"},
                             headers={"Sec-Fetch-Site": "cross-site"})
    assert "came from another site" in await resp.text()
    # (aiohttp's access log, which the test server keeps, never runs in ratekeeper serve)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ratekeeper")]
    assert any("/admin/flags/{name}" in line for line in lines), lines
    assert any("/admin/bans/{id}/lift" in line for line in lines), lines
    for marker in ("203.0.113.7", "2001:db8::5", "forged", "evil"):
        assert not any(marker in line for line in lines), (marker, lines)

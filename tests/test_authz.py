"""GET /v1/authz (nginx, Traefik) and /v1/authz/envoy: routes, trusted proxies, answers."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.api.problem import QUOTA_EXCEEDED
from ratekeeper.config.routes import RouteTable
from ratekeeper.config.rules import parse_config
from ratekeeper.decision.flags import FlagState
from ratekeeper.errors import ConfigError
from ratekeeper.server.state import RUNTIME
from ratekeeper.settings import Settings

from support.common import SALT, FakeClock
from support.redis_servers import free_port

CONFIG = """
[rules.upload-ip]
limit = "2 per minute"
key = ["ip"]
[rules.search-ip]
limit = "1 per 10 seconds, 3 per hour"
key = ["ip"]
algorithm = "sliding-counter"
[rules.global]
limit = "100 per minute"
key = []
fail = "closed"
[actions.upload]
rules = ["upload-ip"]
flags = ["no-uploads"]
[actions.search]
rules = ["search-ip"]
[actions.strict]
rules = ["global"]
[flags.no-uploads]
description = "stop uploads"
message = "Uploads are paused: \\"maintenance\\" until 10:00."

[[routes]]
method = "POST"
path = "/legacy/*"
action = "upload"
[[routes]]
method = "GET"
path = "/search/*"
action = "search"
[[routes]]
method = "*"
path = "/strict"
action = "strict"
"""


def nginx(method: str, uri: str, real_ip: str, **extra: str) -> dict[str, str]:
    """The headers the nginx snippet sends on its auth subrequest."""
    return {"X-Original-Method": method, "X-Original-URI": uri, "X-Real-IP": real_ip, **extra}


def assert_no_ip(headers: Any, *addresses: str) -> None:
    for value in headers.values():
        for address in addresses:
            assert address not in value


async def test_nginx_limit_then_429_with_headers_and_problem_body(make_client: Any,
                                                                  clock: FakeClock) -> None:
    """Two uploads pass with RateLimit headers, the third is a 429 quota-exceeded problem."""
    client = await make_client(CONFIG, clock=clock)
    for left in (1, 0):
        resp = await client.get("/v1/authz", headers=nginx("POST", "/legacy/?x=1", "203.0.113.7"))
        assert resp.status == 204
        assert resp.headers["RateLimit-Policy"] == '"upload-ip";q=2;w=60'
        assert resp.headers["RateLimit"].startswith(f'"upload-ip";r={left};')
        assert "Retry-After" not in resp.headers
    clock.advance(10)
    resp = await client.get("/v1/authz", headers=nginx("POST", "/legacy/", "203.0.113.7"))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "50"
    assert resp.headers["RateLimit"] == '"upload-ip";r=0;t=50'
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = await resp.json(content_type=None)
    assert body == {"type": QUOTA_EXCEEDED,
                    "title": "Request cannot be satisfied as assigned quota has been exceeded",
                    "status": 429, "detail": "Too many requests: retry in 50 seconds.",
                    "violated-policies": ["upload-ip"]}
    assert resp.headers["Ratekeeper-Detail"] == body["detail"]
    assert_no_ip(resp.headers, "203.0.113.7")
    # another client is not affected
    resp = await client.get("/v1/authz", headers=nginx("POST", "/legacy/", "203.0.113.8"))
    assert resp.status == 204


async def test_unrouted_requests_pass_and_count_nothing(make_client: Any) -> None:
    """No matching route (path or method): 204 without headers; the bucket stays untouched."""
    client = await make_client(CONFIG)
    for method, uri in (("GET", "/legacy/"), ("POST", "/simple/numpy/"), ("POST", "/legacy"),
                        ("PUT", "/search/x")):
        for _ in range(3):
            resp = await client.get("/v1/authz", headers=nginx(method, uri, "192.0.2.1"))
            assert resp.status == 204
            assert "RateLimit" not in resp.headers
    resp = await client.get("/v1/authz", headers=nginx("POST", "/legacy/", "192.0.2.1"))
    assert resp.headers["RateLimit"].startswith('"upload-ip";r=1;')


async def test_path_tricks_land_in_the_same_route(make_client: Any) -> None:
    """Encoded, doubled-slash and dot-segment forms of a routed path are the same route."""
    client = await make_client(CONFIG)
    statuses = []
    for uri in ("//legacy/./file", "/%6cegacy/file", "/x/../legacy/file?y"):
        resp = await client.get("/v1/authz", headers=nginx("POST", uri, "192.0.2.2"))
        statuses.append(resp.status)
    assert statuses == [204, 204, 429]


async def test_head_follows_get_routes(make_client: Any) -> None:
    """HEAD /search/ is counted like GET /search/."""
    client = await make_client(CONFIG)
    first = await client.get("/v1/authz", headers=nginx("HEAD", "/search/?q=a", "192.0.2.3"))
    second = await client.get("/v1/authz", headers=nginx("GET", "/search/?q=b", "192.0.2.3"))
    assert (first.status, second.status) == (204, 429)


async def test_traefik_forwarded_headers_rightmost_untrusted_hop(make_client: Any) -> None:
    """With X-Forwarded-*, the client is the rightmost X-Forwarded-For hop not a proxy of ours."""
    client = await make_client(CONFIG)

    def traefik(xff: str) -> dict[str, str]:
        return {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/search/?q=x",
                "X-Forwarded-For": xff, "X-Forwarded-Host": "pypi.example"}

    assert (await client.get("/v1/authz", headers=traefik("198.51.100.7"))).status == 204
    # a client-chosen left part and a trusted hop on the right change nothing
    for xff in ("1.2.3.4, 198.51.100.7", "9.9.9.9, 198.51.100.7, 127.0.0.1"):
        resp = await client.get("/v1/authz", headers=traefik(xff))
        assert resp.status == 429, xff
    assert (await client.get("/v1/authz", headers=traefik("198.51.100.8"))).status == 204


async def test_untrusted_peer_cannot_choose_its_bucket(make_client: Any,
                                                       settings: Settings) -> None:
    """From a peer outside RATEKEEPER_TRUSTED_PROXIES, X-Real-IP and X-Forwarded-For are ignored."""
    only_10 = Settings(redis_url=settings.redis_url, ip_salt=SALT,
                       key_prefix=settings.key_prefix,
                       trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    client = await make_client(CONFIG, app_settings=only_10)
    first = await client.get("/v1/authz", headers=nginx("GET", "/search/", "198.51.100.1"))
    second = await client.get("/v1/authz", headers=nginx(
        "GET", "/search/", "198.51.100.2", **{"X-Forwarded-For": "198.51.100.3"}))
    # both are the test client's own address, 127.0.0.1, which is not a trusted proxy here
    assert (first.status, second.status) == (204, 429)


async def test_kill_switch_and_ban_are_403_with_the_message(
        make_client: Any, redis: aioredis.Redis) -> None:
    """An enabled flag gives 403 with its message; a banned IP gives 403 and a Retry-After."""
    client = await make_client(CONFIG)
    runtime = client.app[RUNTIME]
    runtime.flags.replace([FlagState("no-uploads", enabled=True)])
    resp = await client.get("/v1/authz", headers=nginx("POST", "/legacy/", "192.0.2.9"))
    assert resp.status == 403
    body = await resp.json(content_type=None)
    message = 'Uploads are paused: "maintenance" until 10:00.'
    assert body == {"type": "about:blank", "title": "Forbidden", "status": 403,
                    "detail": message, "flag": "no-uploads"}
    assert "Retry-After" not in resp.headers
    assert json.loads(f'"{resp.headers["Ratekeeper-Detail"]}"') == message
    keyspace = runtime.checker.keyspace
    ban = keyspace.ban_key(keyspace.subject([("ip", keyspace.ip_value("192.0.2.66"))]))
    await redis.set(ban, b"1", px=120_000)
    resp = await client.get("/v1/authz", headers=nginx("GET", "/search/", "192.0.2.66"))
    assert resp.status == 403
    assert (await resp.json(content_type=None))["title"] == "Forbidden"
    assert 0 < int(resp.headers["Retry-After"]) <= 120


async def test_missing_forwarding_headers_are_400(make_client: Any) -> None:
    """Without the original method or path the proxy is misconfigured: a 400 that says so."""
    client = await make_client(CONFIG)
    for headers in ({}, {"X-Original-URI": "/legacy/"}, {"X-Forwarded-Method": "POST"}):
        resp = await client.get("/v1/authz", headers=headers)
        assert resp.status == 400
        assert "X-Original-URI" in (await resp.json())["error"]


async def test_envoy_endpoint_allows_with_200_and_reads_xff_only(make_client: Any) -> None:
    """Envoy: the path follows the prefix, the method is the request's; 200 allowed, 429 not."""
    client = await make_client(CONFIG)
    statuses = []
    for real_ip in ("10.1.1.1", "10.1.1.2", "10.1.1.3"):
        resp = await client.post("/v1/authz/envoy/legacy/?a=b", headers={
            "X-Forwarded-For": "203.0.113.50", "X-Real-IP": real_ip})
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    resp = await client.get("/v1/authz/envoy/legacy/", headers={"X-Forwarded-For": "203.0.113.50"})
    assert resp.status == 200 and "RateLimit" not in resp.headers
    resp = await client.get("/v1/authz/envoy", headers={"X-Forwarded-For": "203.0.113.50"})
    assert resp.status == 200


async def test_redis_down_fail_modes_and_never_5xx(make_client: Any, settings: Settings) -> None:
    """Redis unreachable: an open rule passes (204), a closed one is a 429; nothing is a 5xx."""
    dead = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", ip_salt=SALT,
                    key_prefix=settings.key_prefix, redis_timeout_ms=100)
    client = await make_client(CONFIG, app_settings=dead)
    resp = await client.get("/v1/authz", headers=nginx("GET", "/search/", "192.0.2.1"))
    assert resp.status == 204
    resp = await client.get("/v1/authz", headers=nginx("DELETE", "/strict", "192.0.2.1"))
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"


def test_routed_actions_may_only_key_on_ip() -> None:
    """A route to an action with a rule keyed on user is a config error naming the route."""
    text = CONFIG + """
[rules.upload-user]
limit = "5 per hour"
key = ["ip", "user"]
[actions.upload-full]
rules = ["upload-ip", "upload-user"]
[[routes]]
method = "POST"
path = "/upload/*"
action = "upload-full"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.toml")
    assert caught.value.errors == [
        't.toml: routes[3].action: "upload-full" has rule "upload-user" keyed on "user", '
        'which a proxy cannot send; a routed action may only use rules keyed on ["ip"] or []']


def test_route_table_first_match_wins_and_globs_cross_slashes() -> None:
    """Routes are tried in order; ``*`` spans slashes; query strings never matter."""
    table = RouteTable.from_config(parse_config(CONFIG))
    assert table.match("post", "/legacy/a/b/c?x") is not None
    match = table.match("GET", "/strict?x")
    assert match is not None and match.action == "strict"
    assert table.match("GET", "/strictly") is None
    assert len(table) == 3


UNREADABLE_URIS = ["http://[::1/legacy/x", "https://[zz]/search/x", "http://a]b/legacy",
                   "HTTP://[203.0.113.7/legacy/", "https://[::1/search/x]"]


@pytest.mark.parametrize("uri", UNREADABLE_URIS)
async def test_an_unreadable_original_uri_is_a_400_that_repeats_nothing(
        make_client: Any, redis: aioredis.Redis, key_prefix: str, uri: str) -> None:
    """An absolute URI whose authority cannot be read is refused with a JSON 400 (never a
    500, never let through as unrouted), from nginx's headers and Traefik's alike; nothing is
    counted."""
    client = await make_client(CONFIG)
    for headers in (nginx("POST", uri, "192.0.2.1"),
                    {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": uri,
                     "X-Forwarded-For": "192.0.2.1"}):
        resp = await client.get("/v1/authz", headers=headers)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert "not a valid request target" in error and uri not in error
    assert [k async for k in redis.scan_iter(match=f"{key_prefix}:*")] == []


async def test_absolute_uris_route_by_their_path_in_any_scheme_case(make_client: Any) -> None:
    """``HTTP://host/legacy/x`` and ``https://[::1]:8443/legacy/x`` are the /legacy/* route."""
    client = await make_client(CONFIG)
    statuses = []
    for uri in ("HTTP://pypi.example/legacy/a", "https://[::1]:8443/legacy/b?c",
                "Https://pypi.example//legacy/./c"):
        resp = await client.get("/v1/authz", headers=nginx("POST", uri, "192.0.2.77"))
        statuses.append(resp.status)
    assert statuses == [204, 204, 429]

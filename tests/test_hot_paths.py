"""The hot paths (hotpath.HotProtocol) and the coalescer's held connections
(pipeline.Coalescer), against real Redis.

``POST /v1/check``, ``/v1/check/batch`` and ``GET /v1/authz`` are answered inside the HTTP
protocol; the same path with a query string goes the routed way, so each answer is compared
with its routed twin. The app here is built with a recording middleware: a request it sees
went the routed way, one it does not see went the hot way.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratekeeper import hotpath
from ratekeeper.hotpath import serve_hot_paths
from ratekeeper.limiter import parse_outcome
from ratekeeper.pipeline import MAX_BATCH, Coalescer
from ratekeeper.scripts import Scripts, check_args
from ratekeeper.server import RUNTIME, STOPPING, Runtime, create_app
from ratekeeper.settings import Settings

from admin_support import CONFIG, admin_settings, call
from conftest import FakeClock, config_from, sample
from redis_servers import RedisServer

HOT = "/v1/check"
ROUTED = "/v1/check?x=1"  # the same route, the routed way (a query string is not hot)
BATCH_HOT = "/v1/check/batch"
BATCH_ROUTED = "/v1/check/batch?x=1"
IP_A = "203.0.113.7"
IP_B = "203.0.113.8"


# --------------------------------------------------------------------------- helpers


class Served:
    """A test client of the app with hot paths installed, and the raw paths the routed way
    (the middleware chain) saw."""

    def __init__(self, client: TestClient[Any, Any], routed: list[str]) -> None:
        self.client = client
        self.routed = routed

    @property
    def runtime(self) -> Runtime:
        return self.client.app[RUNTIME]  # type: ignore[index]

    @property
    def app(self) -> web.Application:
        app = self.client.app
        assert app is not None
        return app

    async def answer(self, method: str, path: str, **kwargs: Any
                     ) -> tuple[int, Any, dict[str, str]]:
        """Status, JSON body (None when empty) and headers but Date of one request; a
        refund token (it names the subject) is only said to be there."""
        resp = await self.client.request(method, path, **kwargs)
        raw = await resp.read()
        headers = {k: v for k, v in resp.headers.items() if k != "Date"}
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:  # not JSON: the tests' asserts see the text
                body = raw.decode(errors="replace")
        if isinstance(body, dict):
            for decision in [body, *body.get("results", ())]:
                if decision.get("refund"):
                    decision["refund"] = "<token>"
        return resp.status, body, headers


@pytest.fixture
def serve(aiohttp_client: Callable[..., Any], redis_server: RedisServer,
          key_prefix: str) -> Callable[..., Any]:
    """Start the app (admin tokens, the session's Redis unless told) as `ratekeeper serve`
    does: hot paths installed on the low-level server."""

    async def factory(config: str, *, clock: Callable[[], int] | None = None,
                      app_settings: Settings | None = None) -> Served:
        app = create_app(app_settings or admin_settings(redis_server.url, key_prefix),
                         config_from(config), clock=clock)
        routed: list[str] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            routed.append(request.raw_path)
            return await handler(request)

        app.middlewares.append(record)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        assert client.server.runner is not None and client.server.runner.server is not None
        serve_hot_paths(app, client.server.runner.server)
        return Served(client, routed)

    return factory



@pytest.fixture
def lone_settings(lone_redis: RedisServer, key_prefix: str) -> Settings:
    return admin_settings(lone_redis.url, key_prefix)


def kill_clients(server: RedisServer) -> None:
    """Close every normal client connection (as a Redis `timeout` or a proxy would)."""
    assert int(server.cli("CLIENT", "KILL", "TYPE", "normal")) >= 1



async def redis_check_count(served: Served) -> float:
    resp = await served.client.get("/metrics")
    assert resp.status == 200
    return sample(await resp.text(), "ratekeeper_redis_seconds_count", op="check")


def one_request(prefix: str, subject: str, *, cost: int = 1) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of a one-request check.lua call: one sliding counter, 100 a minute."""
    keys = [f"{prefix}:{{{subject}}}:r"]
    return keys, check_args(1_700_000_000_000, cost, len(keys), ["c", "0", 0, 1, 100, 60_000])


def remaining(raw: Any) -> int:
    return parse_outcome(raw).windows[0].remaining


async def raw_exchange(served: Served, head: bytes, body: bytes = b"", *,
                       expect_continue: bool = False) -> tuple[bytes, bytes, bool]:
    """Send one request on a fresh socket; the response head, its body, and whether the
    server closed the connection after it."""
    reader, writer = await asyncio.open_connection(served.client.host, served.client.port)
    try:
        async with asyncio.timeout(5):
            writer.write(head)
            await writer.drain()
            if expect_continue:
                interim = await reader.readuntil(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            writer.write(body)
            await writer.drain()
            response_head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", response_head)[1])  # type: ignore[index]
            response_body = await reader.readexactly(length)
            try:
                async with asyncio.timeout(0.2):
                    closed = await reader.read(1) == b""
            except TimeoutError:
                closed = False
        return response_head, response_body, closed
    finally:
        writer.close()


def post_head(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------- hot == routed


WALK = """
[rules.two]
limit = "2 per minute"
key = ["ip"]
[actions.login]
rules = ["two"]
"""


async def test_allowed_limited_and_cached_answers_are_the_same_both_ways(
        serve: Any, clock: FakeClock) -> None:
    """Two subjects walked in step, one hot and one routed: allowed, allowed, rate-limited
    (Redis), rate-limited (the local cache, answered at the end of the tick): the same
    status, body and headers at every step."""
    served = await serve(WALK, clock=clock)
    for step in range(4):
        hot = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
        routed = await served.answer("POST", ROUTED, json={"action": "login", "ip": IP_B})
        assert hot == routed, step
        assert hot[0] == 200
        assert hot[1]["allowed"] is (step < 2) and not hot[1]["degraded"]
        assert hot[2]["RateLimit"].startswith('"two";r=')
        if step >= 2:
            assert hot[1]["reason"] == "rate_limited" and hot[2]["Retry-After"] == "60"
        for value in (*hot[2].values(), json.dumps(hot[1])):
            assert IP_A not in value
    assert served.routed == [ROUTED] * 4  # the hot ones never reached a middleware
    cache = served.runtime.cache
    assert cache is not None and cache.hits == 2  # step 4 of each came from the cache


BAD_BODIES: dict[str, tuple[int, bytes]] = {
    "malformed JSON": (400, b'{"action": "login", "ip": '),
    "not an object": (400, b'["login"]'),
    "empty body": (400, b""),
    "unknown action": (400, b'{"action": "nope", "ip": "192.0.2.1"}'),
    "missing subject": (400, b'{"action": "login"}'),
    "bad IP": (400, b'{"action": "login", "ip": "192.0.2.999"}'),
    "ip and ip_hash": (400, b'{"action": "login", "ip": "192.0.2.1", "ip_hash": "ab"}'),
    "negative cost": (400, b'{"action": "login", "ip": "192.0.2.1", "cost": -1}'),
    "unknown field": (400, b'{"action": "login", "ip": "192.0.2.1", "colour": "red"}'),
    "over 64 KiB": (413, b'{"action": "login", "ip": "192.0.2.1", "pad": "'
                         + b"x" * (64 * 1024) + b'"}'),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_input_gets_the_same_json_error_both_ways(serve: Any, case: str) -> None:
    """Each bad body: the same 400 or 413 JSON error hot and routed, no raw IP in it."""
    status, body = BAD_BODIES[case]
    served = await serve(WALK)
    headers = {"Content-Type": "application/json"}
    hot = await served.answer("POST", HOT, data=body, headers=headers)
    routed = await served.answer("POST", ROUTED, data=body, headers=headers)
    assert hot == routed
    assert hot[0] == status
    assert set(hot[1]) == {"error"} and hot[1]["error"]
    assert hot[2]["Content-Type"].startswith("application/json")
    assert "192.0.2.999" not in json.dumps(hot[1])
    # a body over 64 KiB is aiohttp's to refuse (it is rarely all read in one go anyway)
    assert served.routed == ([HOT, ROUTED] if status == 413 else [ROUTED])


@pytest.mark.parametrize("path", [HOT, ROUTED])
async def test_an_undecodable_compressed_body_is_a_400(serve: Any, path: str) -> None:
    """Nothing a client sends may be a 5xx: a body that claims gzip and is not."""
    served = await serve(WALK)
    status, body, _ = await served.answer(
        "POST", path, data=b'{"action": "login", "ip": "192.0.2.1"}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 400, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}


async def test_chunked_bodies_are_read_alike_and_limited_to_64_kib(serve: Any) -> None:
    """A chunked body (no Content-Length) is decided the same both ways; one over 64 KiB
    is a 413 JSON error both ways."""
    served = await serve(WALK)

    def chunks(*parts: bytes) -> Callable[[], AsyncIterator[bytes]]:
        async def gen() -> AsyncIterator[bytes]:
            for part in parts:
                yield part
        return gen

    small = chunks(b'{"action": "login", ', b'"ip": "192.0.2.10"}')
    hot = await served.answer("POST", HOT, data=small(),
                              headers={"Content-Type": "application/json"})
    small_b = chunks(b'{"action": "login", ', b'"ip": "192.0.2.11"}')
    routed = await served.answer("POST", ROUTED, data=small_b(),
                                 headers={"Content-Type": "application/json"})
    assert hot == routed and hot[0] == 200 and hot[1]["allowed"]
    big = b'{"action": "login", "ip": "192.0.2.10", "pad": "' + b"x" * 70_000 + b'"}'
    answers = []
    for path in (HOT, ROUTED):
        parts = chunks(*(big[i:i + 8192] for i in range(0, len(big), 8192)))
        answers.append(await served.answer("POST", path, data=parts(),
                                           headers={"Content-Type": "application/json"}))
    assert answers[0] == answers[1] and answers[0][0] == 413
    # the small body goes the hot way when its chunks came in one read; the big one never
    assert served.routed[-2:] == [HOT, ROUTED] and ROUTED in served.routed[:-2]


async def test_kill_switch_answers_are_the_same_both_ways(serve: Any) -> None:
    """With a flag on, an action with rules and one without (no Redis call: the answer
    waits for the end of the tick) are disabled alike hot and routed."""
    served = await serve(CONFIG)
    await call(served.client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    for action in ("register", "signup-page"):
        hot = await served.answer("POST", HOT, json={"action": action, "ip": IP_A})
        routed = await served.answer("POST", ROUTED, json={"action": action, "ip": IP_B})
        assert hot == routed
        assert hot[0] == 200 and hot[1]["reason"] == "disabled" and not hot[1]["allowed"]
        assert hot[1]["message"] == "Read-only mode: writes are disabled."
    assert served.routed.count(ROUTED) == 2 and HOT not in served.routed


AUTHZ_CONFIG = """
[rules.upload-ip]
limit = "2 per minute"
key = ["ip"]
[actions.upload]
rules = ["upload-ip"]
flags = ["no-uploads"]
[flags.no-uploads]
description = "stop uploads"
message = "Uploads are paused."

[[routes]]
method = "POST"
path = "/legacy/*"
action = "upload"
"""
AUTHZ_HOT = "/v1/authz"
AUTHZ_ROUTED = "/v1/authz?x=1"  # the same route, the routed way


def nginx(method: str, uri: str, real_ip: str) -> dict[str, str]:
    """The headers nginx's auth_request snippet sends."""
    return {"X-Original-Method": method, "X-Original-URI": uri, "X-Real-IP": real_ip}


async def test_authz_answers_are_the_same_both_ways(serve: Any, clock: FakeClock) -> None:
    """nginx's GET /v1/authz, two clients walked in step, one hot and one routed: allowed
    with RateLimit headers, then 429 problem+json (Redis), then 429 again (the local cache,
    answered at the end of the tick); an unrouted request; a kill switch's 403; a request
    without the forwarding headers (400). The same status, body and headers every time."""
    served = await serve(AUTHZ_CONFIG, clock=clock)

    async def both(method: str, uri: str) -> tuple[int, Any, dict[str, str]]:
        hot = await served.answer("GET", AUTHZ_HOT, headers=nginx(method, uri, IP_A))
        routed = await served.answer("GET", AUTHZ_ROUTED, headers=nginx(method, uri, IP_B))
        assert hot == routed
        for value in (*hot[2].values(), json.dumps(hot[1])):
            assert IP_A not in value
        return hot

    for step in range(4):
        status, body, headers = await both("POST", "/legacy/")
        if step < 2:
            assert (status, body) == (204, None)
            assert headers["RateLimit"].startswith('"upload-ip";r=')
        else:
            assert status == 429 and headers["Retry-After"] == "60"
            assert body["status"] == 429 and headers["Ratekeeper-Detail"] == body["detail"]
    cache = served.runtime.cache
    assert cache is not None and cache.hits == 2  # step 4 of each came from the cache
    status, body, headers = await both("GET", "/simple/numpy/")  # no route: passes
    assert (status, body) == (204, None) and "RateLimit" not in headers
    await call(served.client, "PUT", "/v1/admin/flags/no-uploads", json={"enabled": True})
    status, body, _ = await both("POST", "/legacy/")
    assert status == 403 and body["flag"] == "no-uploads"
    hot = await served.answer("GET", AUTHZ_HOT)
    assert hot == await served.answer("GET", AUTHZ_ROUTED)
    assert hot[0] == 400 and set(hot[1]) == {"error"}
    # the hot ones never reached a middleware (the admin API's flag change did)
    assert [path for path in served.routed if path != "/v1/admin/flags/no-uploads"] == (
        [AUTHZ_ROUTED] * 7)


async def test_batch_answers_are_the_same_both_ways(serve: Any, clock: FakeClock) -> None:
    """/v1/check/batch: the same decisions hot and routed, and the same 400s."""
    served = await serve(WALK, clock=clock)
    for path, ip in ((BATCH_HOT, IP_A), (BATCH_ROUTED, IP_B)):
        checks = [{"action": "login", "ip": ip}] * 3 + [{"action": "login", "ip": ip, "cost": 0}]
        served_answer = await served.answer("POST", path, json={"checks": checks})
        assert served_answer[0] == 200
        assert [r["allowed"] for r in served_answer[1]["results"]] == [True, True, False, False]
        if path == BATCH_HOT:
            hot = served_answer
        else:
            assert served_answer == hot
    bad = {"checks": [{"action": "login", "ip": "192.0.2.1"}, {"action": "nope"}]}
    hot_bad = await served.answer("POST", BATCH_HOT, json=bad)
    assert hot_bad == await served.answer("POST", BATCH_ROUTED, json=bad)
    assert hot_bad[0] == 400 and set(hot_bad[1]) == {"error"}
    assert served.routed == [BATCH_ROUTED, BATCH_ROUTED]


async def test_a_batch_answers_what_its_checks_answer_one_by_one(serve: Any,
                                                                clock: FakeClock) -> None:
    """A batch's allowed results are made from their action's form (server.batch_answer),
    the rest from Decisions: in step with single checks of another subject answered the
    routed way (from Decisions only), each result is that check's answer."""
    served = await serve(WALK, clock=clock)
    checks = [{"action": "login", "ip": IP_A, "cost": cost} for cost in (1, 0, 1, 1)]
    status, body, _ = await served.answer("POST", BATCH_HOT, json={"checks": checks})
    assert status == 200
    singles = [(await served.answer("POST", ROUTED, json={**check, "ip": IP_B}))[1]
               for check in checks]
    assert body["results"] == singles
    assert [r["allowed"] for r in singles] == [True, True, True, False]
    assert [r.get("refund") for r in singles] == ["<token>", None, "<token>", None]


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_other_methods_on_the_check_paths_are_405_json(serve: Any, method: str) -> None:
    """Only POST is hot: other methods go the routed way and get a 405 (JSON unless HEAD)."""
    served = await serve(WALK)
    for path in (HOT, BATCH_HOT):
        status, body, headers = await served.answer(method, path)
        assert status == 405
        if method != "HEAD":
            assert set(body) == {"error"}
            assert headers["Content-Type"].startswith("application/json")
    assert served.routed == [HOT, BATCH_HOT]


async def test_paths_that_are_not_exactly_hot_go_the_routed_way(serve: Any) -> None:
    """A trailing slash is a 404; a percent-encoded path and an absolute-form target
    resolve to the same route and are decided the routed way (sent raw: aiohttp's client
    would normalise them)."""
    served = await serve(WALK)
    status, body, _ = await served.answer("POST", "/v1/check/", json={"action": "login"})
    assert status == 404 and set(body) == {"error"}
    good = json.dumps({"action": "login", "ip": IP_A}).encode()
    for target in ("/v1/%63heck", "http://localhost/v1/check"):
        head, answer, _ = await raw_exchange(served, post_head(target, good), good)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(answer)["allowed"], target
    assert served.routed == ["/v1/check/", "/v1/%63heck", "http://localhost/v1/check"]


# --------------------------------------------------------------------------- aiohttp's internals


def test_this_aiohttp_has_the_internals_the_hot_paths_use() -> None:
    """HotProtocol relies on aiohttp 3.14's connection handler beyond its public API; an
    aiohttp without those fails here (and the server falls back, below)."""
    assert hotpath.supported()


async def test_an_aiohttp_without_them_serves_everything_the_routed_way(
        serve: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When aiohttp's internals differ, serve_hot_paths changes nothing but a warning: every
    request is answered, the routed way."""
    monkeypatch.setattr(hotpath, "_INTERNALS", (*hotpath._INTERNALS, "_not_in_this_aiohttp"))
    served = await serve(WALK)
    hot = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
    assert hot[0] == 200 and hot[1]["allowed"]
    assert served.routed == [HOT]
    assert any("every request takes the routed way" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- Expect, draining


@pytest.mark.parametrize("path", [HOT, BATCH_HOT])
async def test_expect_100_continue_gets_its_interim_answer(serve: Any, path: str) -> None:
    """A client that waits for "100 Continue" before sending its body gets it (the routed
    way's expect handler) and then its decision."""
    served = await serve(WALK)
    body = json.dumps({"action": "login", "ip": IP_A}).encode()
    if path == BATCH_HOT:
        body = json.dumps({"checks": [{"action": "login", "ip": IP_A}]}).encode()
    head, answer, _ = await raw_exchange(
        served, post_head(path, body, "Expect: 100-continue"), body, expect_continue=True)
    assert head.startswith(b"HTTP/1.1 200 "), head
    decision = json.loads(answer)
    assert (decision["results"][0] if path == BATCH_HOT else decision)["allowed"] is True
    assert served.routed == [path]


async def test_expect_100_continue_with_the_aiohttp_client(serve: Any) -> None:
    """The same with aiohttp's own client (expect100=True), within a bound: a server that
    never sent "100 Continue" would leave both sides waiting."""
    served = await serve(WALK)
    async with asyncio.timeout(5):
        resp = await served.client.post(HOT, json={"action": "login", "ip": IP_A},
                                         expect100=True)
        assert resp.status == 200 and (await resp.json())["allowed"] is True


@pytest.mark.parametrize("path", [HOT, ROUTED, BATCH_HOT])
async def test_draining_answers_close_their_connection(serve: Any, path: str) -> None:
    """Before draining the connection is kept; once STOPPING is set, every answer (a
    decision or a 400) says Connection: close and the server closes the socket."""
    served = await serve(WALK)
    good = json.dumps({"action": "login", "ip": IP_A}).encode()
    if path == BATCH_HOT:
        good = json.dumps({"checks": [{"action": "login", "ip": IP_A}]}).encode()
    head, _, closed = await raw_exchange(served, post_head(path, good), good)
    assert head.startswith(b"HTTP/1.1 200 ") and not closed
    assert b"connection: close" not in head.lower()
    served.app[STOPPING].set()
    for body, status in ((good, b"200"), (b"{", b"400")):
        head, _, closed = await raw_exchange(served, post_head(path, body), body)
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert b"connection: close" in head.lower()
        assert closed


async def test_cache_denials_under_concurrency_are_all_answered(serve: Any,
                                                                clock: FakeClock) -> None:
    """Many concurrent cache denials (each waits for its tick) are all answered, alike."""
    served = await serve(WALK, clock=clock)
    for _ in range(3):
        await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
    answers = await asyncio.wait_for(asyncio.gather(*(
        served.answer("POST", HOT, json={"action": "login", "ip": IP_A}) for _ in range(40))), 10)
    assert all(a == answers[0] for a in answers)
    assert answers[0][0] == 200 and answers[0][1]["reason"] == "rate_limited"
    cache = served.runtime.cache
    assert cache is not None and cache.hits >= 40


# --------------------------------------------------------------------------- the coalescer


def app_coalescer(served: Served) -> Coalescer:
    check = served.runtime.limiter.scripts.check
    assert isinstance(check, Coalescer)
    return check


async def test_a_killed_held_connection_costs_no_degraded_answer(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """The coalescer keeps its connection between batches; when Redis closes it (a client
    kill, a Redis `timeout`), the next check is still a normal decision, counted once."""
    served = await serve(WALK.replace("2 per minute", "100 per minute"),
                         app_settings=lone_settings)
    for expected in (99, 98):
        _, body, _ = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
        assert not body["degraded"] and body["limits"][0]["remaining"] == expected
    kill_clients(lone_redis)
    await asyncio.sleep(0.05)  # the FIN reaches us
    for expected in (97, 96):
        _, body, _ = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
        assert not body["degraded"] and body["limits"][0]["remaining"] == expected


@pytest.mark.parametrize("how", ["client kill", "restart"])
async def test_two_dead_held_connections_cost_no_degraded_answer(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings, how: str) -> None:
    """Two batches out at once leave the coalescer holding two connections; after Redis
    closed both, the next check is still a normal decision."""
    served = await serve(WALK.replace("2 per minute", "100 per minute"),
                         app_settings=lone_settings)
    coalescer = app_coalescer(served)
    checker = served.runtime.checker
    coalescer.max_batch = 1  # two checks of one tick: two batches, two connections
    try:
        before = coalescer.batches
        decisions = await asyncio.gather(*(
            checker.check(checker.decode(json.dumps({"action": "login", "ip": ip}).encode()))
            for ip in (IP_A, IP_B)))
        if coalescer.batches - before != 2 or any(d.degraded for d in decisions):
            pytest.fail("precondition: two batches out at once, both answered by Redis")
    finally:
        coalescer.max_batch = MAX_BATCH
    if how == "restart":
        lone_redis.restart()
    else:
        kill_clients(lone_redis)
    await asyncio.sleep(0.05)
    _, body, _ = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
    assert body["degraded"] is False


async def test_a_timed_out_batch_leaves_no_reply_for_the_next(lone_redis: RedisServer,
                                                              key_prefix: str) -> None:
    """A batch whose deadline passed with its reply still due (Redis paused) gives up its
    connection: the next batch reads its own reply, not the late one."""
    client = aioredis.Redis(port=lone_redis.port, retry=Retry(NoBackoff(), 0))
    try:
        coalescer = Coalescer(client, Scripts.register(client).check, timeout=0.3)
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 99
        lone_redis.pause()
        try:
            with pytest.raises(TimeoutError):
                await coalescer.queue(*one_request(key_prefix, "a"))
        finally:
            lone_redis.resume()
        # a look (cost 0) at another subject: all 100 left, whatever became of the late hit
        assert remaining(await coalescer.queue(*one_request(key_prefix, "b", cost=0))) == 100
        late = remaining(await coalescer.queue(*one_request(key_prefix, "a", cost=0)))
        assert late in (98, 99)
    finally:
        await client.aclose()


async def test_failed_batches_give_their_connection_back_to_the_pool(
        lone_redis: RedisServer, key_prefix: str) -> None:
    """Each batch that meets a dead connection hands it back to the pool: a pool of two,
    after many such batches, still has a connection to give."""
    pool = BlockingConnectionPool.from_url(lone_redis.url, max_connections=2, timeout=0.5,
                                           retry=Retry(NoBackoff(), 0))
    client = aioredis.Redis.from_pool(pool)
    try:
        coalescer = Coalescer(client, Scripts.register(client).check)
        for i in range(6):
            assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 99 - i
            kill_clients(lone_redis)
            await asyncio.sleep(0.02)
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 93
        answers = await asyncio.gather(*(coalescer.queue(*one_request(key_prefix, f"s{i}"))
                                         for i in range(10)))
        assert [remaining(a) for a in answers] == [99] * 10
    finally:
        await client.aclose()


async def test_a_held_connection_goes_back_to_its_pool_usable(
        lone_redis: RedisServer, key_prefix: str) -> None:
    """The coalescer reads the connections it holds itself (``heldconn.py``); one it lets go
    goes back to its pool, whose next user gets it connected anew and speaking through
    redis-py (a pool of one connection: the same one each time)."""
    pool = BlockingConnectionPool.from_url(lone_redis.url, max_connections=1, timeout=0.5,
                                           retry=Retry(NoBackoff(), 0))
    client = aioredis.Redis.from_pool(pool)
    try:
        coalescer = Coalescer(client, Scripts.register(client).check, timeout=2.0)
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 99
        (held,) = coalescer._held
        assert held.transport.get_protocol() is held and not held.closed
        coalescer._drop_held()  # (what a batch that found its connection dead does)
        await asyncio.gather(*coalescer._tasks)
        assert held.closed and coalescer._held == []
        assert await client.ping()  # through redis-py, on the pool's one connection
        assert await client.get(f"{key_prefix}:none") is None
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 98
        (again,) = coalescer._held
        assert again is not held and again.connection is held.connection
    finally:
        await client.aclose()


async def test_a_caller_that_gives_up_while_its_batch_is_out_spoils_nothing(
        lone_redis: RedisServer, key_prefix: str) -> None:
    """A caller cancelled while its batch waits on Redis: the batch's reply is still read
    off the held connection, so the next caller gets its own answer (the hit sent was
    taken, once)."""
    client = aioredis.Redis(port=lone_redis.port, retry=Retry(NoBackoff(), 0))
    try:
        coalescer = Coalescer(client, Scripts.register(client).check, timeout=5)
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 99
        lone_redis.pause()
        try:
            gone = coalescer.queue(*one_request(key_prefix, "a"))
            await asyncio.sleep(0.1)  # its batch is written and waits for Redis
            assert coalescer.batches == 2
            gone.cancel()
        finally:
            lone_redis.resume()
        await asyncio.sleep(0.1)
        assert remaining(await coalescer.queue(*one_request(key_prefix, "a"))) == 97
        assert remaining(await coalescer.queue(*one_request(key_prefix, "b", cost=0))) == 100
    finally:
        await client.aclose()


async def test_a_client_that_disconnects_while_its_check_waits_breaks_nothing(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """An HTTP client that gives up while its check waits on Redis: no 5xx, and the next
    checks are normal decisions."""
    served = await serve(WALK.replace("2 per minute", "100 per minute"),
                         app_settings=lone_settings)
    _, body, _ = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
    assert body["limits"][0]["remaining"] == 99
    lone_redis.pause()
    try:
        with pytest.raises(TimeoutError):
            await served.client.post(HOT, json={"action": "login", "ip": IP_A},
                                     timeout=ClientTimeout(total=0.2))
    finally:
        lone_redis.resume()
    for _ in range(2):
        status, body, _ = await served.answer("POST", HOT, json={"action": "login", "ip": IP_A})
        assert status == 200 and not body["degraded"]
        assert body["limits"][0]["remaining"] in (97, 98, 96)


async def test_queue_refuses_what_is_not_one_request(redis: aioredis.Redis,
                                                     key_prefix: str) -> None:
    """ARGV not shaped as one request fails its own future with ValueError and is not
    sent; a good call of the same tick is answered."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    keys, args = one_request(key_prefix, "a")
    bad = [coalescer.queue(keys, args[:3]),
           coalescer.queue(keys, [*args[:-1], 2]),  # two rule sets
           coalescer.queue(keys, ["", 2, *args[2:]])]  # two requests
    good = coalescer.queue(keys, args)
    for future in bad:
        with pytest.raises(ValueError):
            await future
    assert remaining(await good) == 99
    assert coalescer.calls == 1


async def test_redis_time_is_observed_once_per_script_call(serve: Any) -> None:
    """ratekeeper_redis_seconds_count{op="check"}: one per sequential check, none for an
    answer given without Redis, one for a batch that went as one call."""
    served = await serve(CONFIG)
    start = await redis_check_count(served)
    for _ in range(3):
        status, _, _ = await served.answer("POST", HOT, json={"action": "login",
                                                              "ip": IP_A, "user": "u"})
        assert status == 200
    assert await redis_check_count(served) - start == 3
    status, body, _ = await served.answer("POST", HOT, json={"action": "signup-page"})
    assert status == 200 and body["allowed"]
    assert await redis_check_count(served) - start == 3
    checks = [{"action": "everything"} for _ in range(5)]
    status, body, _ = await served.answer("POST", BATCH_HOT, json={"checks": checks})
    assert status == 200 and len(body["results"]) == 5
    assert await redis_check_count(served) - start == 4


class _NoFlushLater:
    """An outbox's loop that never runs the flush the outbox schedules for itself."""

    def call_soon(self, callback: Any, *args: Any) -> None:
        pass


async def test_the_coalescer_flushes_the_outbox_the_hot_paths_answer_into(serve: Any) -> None:
    """The worker's one outbox is the served connections' and is flushed by the coalescer
    once a script call's checks are settled (the order is test_pipeline's): with the
    outbox's own end-of-tick flush taken away, answers that waited for Redis still leave."""
    served = await serve(CONFIG)
    server = served.client.server.runner.server
    outbox = served.app[hotpath.OUTBOX]
    check = served.runtime.limiter.scripts.check
    assert isinstance(check, Coalescer)
    assert server.outbox is outbox and check.after_settle == [outbox.flush]
    outbox._loop = _NoFlushLater()  # type: ignore[assignment]
    answers = await asyncio.wait_for(asyncio.gather(*(served.answer("POST", HOT, json={
        "action": "login", "ip": f"203.0.113.{i}", "user": "u"}) for i in range(6))), 5)
    assert [status for status, _, _ in answers] == [200] * 6
    assert not outbox._answers


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_coalescer_used_from_a_second_event_loop_answers_there(lone_redis: RedisServer,
                                                                 key_prefix: str) -> None:
    """A coalescer whose loop ended while it held a connection (tests: a loop each) does
    not use that connection from the next loop: the next loop's checks are answered."""

    def three_loops() -> list[int]:
        client = aioredis.Redis(port=lone_redis.port, retry=Retry(NoBackoff(), 0))
        coalescer = Coalescer(client, Scripts.register(client).check)

        async def ask() -> int:
            return remaining(await asyncio.wait_for(
                coalescer.queue(*one_request(key_prefix, "a")), 2))

        # each loop ends holding a connection
        return [asyncio.run(ask()) for _ in range(3)]

    try:
        assert three_loops() == [99, 98, 97]
    finally:
        kill_clients(lone_redis)  # what the ended loops left open
        gc.collect()  # their transports are reclaimed here, under this test's filters



async def test_breaker_gauge_says_closed_once_a_probe_closed_the_circuit(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """Redis down long enough to open the circuit, then back: once a check is a normal
    decision again, /metrics says the circuit is closed."""
    served = await serve(WALK.replace("2 per minute", "100 per minute"),
                         app_settings=lone_settings)
    ask = {"action": "login", "ip": IP_A}
    lone_redis.stop()
    for _ in range(8):
        _, body, _ = await served.answer("POST", HOT, json=ask)
        if not body["degraded"]:
            pytest.fail("precondition: Redis is down")
    text = await (await served.client.get("/metrics")).text()
    if sample(text, "ratekeeper_circuit_breaker_state") != 2:
        pytest.fail("precondition: the circuit is open")
    lone_redis.restart()
    await asyncio.sleep(0.6)  # past the breaker's cooldown: the next check is the probe
    for _ in range(20):
        _, body, _ = await served.answer("POST", HOT, json=ask)
        if not body["degraded"]:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("precondition: decisions are normal again")
    assert served.runtime.limiter.breaker.state == "closed"
    text = await (await served.client.get("/metrics")).text()
    assert "\nratekeeper_circuit_breaker_state " in text
    assert sample(text, "ratekeeper_circuit_breaker_state") == 0

"""``POST /v1/check``, ``POST /v1/check/batch`` and ``GET /v1/authz`` as a client sees them,
against real Redis: decisions and their headers, bad input, bodies (compressed, chunked, too
large, behind ``Expect: 100-continue``), draining, concurrency, clients that give up, and a
Redis that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratekeeper.app import create_app
from ratekeeper.errors import StoreUnavailable
from ratekeeper.server.state import RUNTIME, STOPPING, Runtime
from ratekeeper.settings import Settings
from ratekeeper.storage.breaker import Breaker
from ratekeeper.storage.limiter import CheckCall, Limiter, parse_outcome

from support.admin import CONFIG, admin_settings, call
from support.common import FakeClock, config_from, opened, sample
from support.redis_servers import RedisServer

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

CHECK = "/v1/check"
BATCH = "/v1/check/batch"
AUTHZ = "/v1/authz"
IP_A = "203.0.113.7"
IP_B = "203.0.113.8"


# --------------------------------------------------------------------------- helpers


class Served:
    """A test client of the app, with what the tests read off it."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    @property
    def app(self) -> web.Application:
        app: web.Application | None = self.client.app
        assert app is not None
        return app

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

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
                if isinstance(decision, dict) and decision.get("refund"):
                    decision["refund"] = "<token>"
        return resp.status, body, headers

    async def cache_on(self) -> None:
        """Wait until the local cache answers: once the change channel is first up (before,
        a change could be missed, so the process asks Redis every time)."""
        async with asyncio.timeout(5):
            while not self.runtime.cache.active:
                await asyncio.sleep(0.01)

    async def metrics(self) -> str:
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        return await resp.text()


@pytest.fixture
def serve(aiohttp_client: Callable[..., Any], redis_server: RedisServer,
          key_prefix: str) -> Callable[..., Any]:
    """Start the app (admin tokens, the session's Redis unless told) for a config."""

    async def factory(config: str, *, clock: Callable[[], int] | None = None,
                      app_settings: Settings | None = None) -> Served:
        app = create_app(app_settings or admin_settings(redis_server.url, key_prefix),
                         config_from(config), clock=clock)
        return Served(await aiohttp_client(app))

    return factory


@pytest.fixture
def lone_settings(lone_redis: RedisServer, key_prefix: str) -> Settings:
    return admin_settings(lone_redis.url, key_prefix)


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
            length = re.search(rb"(?i)content-length: *(\d+)", response_head)
            assert length is not None, response_head
            response_body = await reader.readexactly(int(length[1]))
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


def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body the client sends chunked (no Content-Length), one chunk per part."""

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return gen()


# --------------------------------------------------------------------------- decisions


WALK = """
[rules.two]
limit = "2 per minute"
key = ["ip"]
[actions.login]
rules = ["two"]
"""
HUNDRED = WALK.replace("2 per minute", "100 per minute")


async def test_allowed_then_limited_by_redis_then_by_the_local_cache(
        serve: Any, clock: FakeClock) -> None:
    """One subject walked four times at a limit of 2: allowed, allowed, rate-limited (Redis
    decided), rate-limited again (the local cache answered, counted in /metrics) with the
    same body and headers; RateLimit headers every time, Retry-After when denied, and the
    IP in no header or body."""
    served = await serve(WALK, clock=clock)
    await served.cache_on()
    answers = [await served.answer("POST", CHECK, json={"action": "login", "ip": IP_A})
               for _ in range(4)]
    for step, (status, body, headers) in enumerate(answers):
        assert status == 200
        assert body["allowed"] is (step < 2) and not body["degraded"]
        assert headers["RateLimit"].startswith('"two";r=')
        assert headers["Content-Type"].startswith("application/json")
        if step >= 2:
            assert body["reason"] == "rate_limited" and headers["Retry-After"] == "60"
        for value in (*headers.values(), json.dumps(body)):
            assert IP_A not in value
    assert [body["limits"][0]["remaining"] for _, body, _ in answers] == [1, 0, 0, 0]
    assert answers[3] == answers[2]  # the cache's denial is Redis's
    text = await served.metrics()
    assert sample(text, "ratekeeper_local_cache_hits_total", kind="rate_limited") == 1


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
async def test_bad_input_is_a_json_error_that_echoes_nothing(serve: Any, case: str) -> None:
    """Each bad body: a 400 (413 when too large) with a JSON ``{"error": ...}`` that repeats
    none of what the client chose (the bad IP, the unknown action or field)."""
    status, body = BAD_BODIES[case]
    served = await serve(WALK)
    answer = await served.answer("POST", CHECK, data=body,
                                 headers={"Content-Type": "application/json"})
    assert answer[0] == status
    assert set(answer[1]) == {"error"} and answer[1]["error"]
    assert answer[2]["Content-Type"].startswith("application/json")
    for chosen in ("192.0.2.999", "nope", "colour"):
        assert chosen not in answer[1]["error"]


async def test_an_undecodable_compressed_body_is_a_400(serve: Any) -> None:
    """Nothing a client sends may be a 5xx: a body that claims gzip and is not."""
    served = await serve(WALK)
    status, body, _ = await served.answer(
        "POST", CHECK, data=b'{"action": "login", "ip": "192.0.2.1"}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 400, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}


async def test_chunked_bodies_are_read_and_limited_to_64_kib(serve: Any) -> None:
    """A chunked body (no Content-Length) is read whole and decided; one over 64 KiB is a
    413 JSON error."""
    served = await serve(WALK)
    json_type = {"Content-Type": "application/json"}
    status, body, _ = await served.answer(
        "POST", CHECK, data=chunks(b'{"action": "login", ', b'"ip": "192.0.2.10"}'),
        headers=json_type)
    assert status == 200 and body["allowed"] and body["limits"][0]["remaining"] == 1
    big = b'{"action": "login", "ip": "192.0.2.10", "pad": "' + b"x" * 70_000 + b'"}'
    status, body, headers = await served.answer(
        "POST", CHECK, data=chunks(*(big[i:i + 8192] for i in range(0, len(big), 8192))),
        headers=json_type)
    assert status == 413 and set(body) == {"error"}
    assert headers["Content-Type"].startswith("application/json")


async def test_kill_switch_answers_disabled_with_its_message(serve: Any) -> None:
    """With a flag on, an action with rules and one without (no Redis call) are both
    answered disabled, naming the flag and its message."""
    served = await serve(CONFIG)
    await call(served.client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    for action in ("register", "signup-page"):
        status, body, _ = await served.answer("POST", CHECK, json={"action": action,
                                                                   "ip": IP_A})
        assert status == 200 and body["reason"] == "disabled" and not body["allowed"]
        assert body["flag"] == "read-only"
        assert body["message"] == "Read-only mode: writes are disabled."


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


def nginx(method: str, uri: str, real_ip: str) -> dict[str, str]:
    """The headers nginx's auth_request snippet sends."""
    return {"X-Original-Method": method, "X-Original-URI": uri, "X-Real-IP": real_ip}


async def test_authz_answers_204_429_403_and_400(serve: Any, clock: FakeClock) -> None:
    """nginx's GET /v1/authz for one client: allowed (204 with RateLimit headers) twice,
    then 429 problem+json from Redis and again from the local cache (the same answer); an
    unrouted request passes; a kill switch's 403; a request without the forwarding headers
    is a 400. The client's IP is in no header or body."""
    served = await serve(AUTHZ_CONFIG, clock=clock)
    await served.cache_on()

    async def ask(method: str, uri: str) -> tuple[int, Any, dict[str, str]]:
        answer: tuple[int, Any, dict[str, str]] = await served.answer(
            "GET", AUTHZ, headers=nginx(method, uri, IP_A))
        for value in (*answer[2].values(), json.dumps(answer[1])):
            assert IP_A not in value
        return answer

    walk = [await ask("POST", "/legacy/") for _ in range(4)]
    for status, body, headers in walk[:2]:
        assert (status, body) == (204, None)
        assert headers["RateLimit"].startswith('"upload-ip";r=')
    status, body, headers = walk[2]
    assert status == 429 and headers["Retry-After"] == "60"
    assert body["status"] == 429 and headers["Ratekeeper-Detail"] == body["detail"]
    assert walk[3] == walk[2]  # the cache's denial is Redis's
    text = await served.metrics()
    assert sample(text, "ratekeeper_local_cache_hits_total", kind="rate_limited") == 1
    status, body, headers = await ask("GET", "/simple/numpy/")  # no route: passes
    assert (status, body) == (204, None) and "RateLimit" not in headers
    await call(served.client, "PUT", "/v1/admin/flags/no-uploads", json={"enabled": True})
    status, body, _ = await ask("POST", "/legacy/")
    assert status == 403 and body["flag"] == "no-uploads"
    status, body, _ = await served.answer("GET", AUTHZ)
    assert status == 400 and set(body) == {"error"}


async def test_a_batch_is_decided_in_order_and_a_bad_one_consumes_nothing(
        serve: Any, clock: FakeClock) -> None:
    """/v1/check/batch answers each check in order, each after the ones before it; a batch
    with one bad check is a 400 naming its index, and its good checks took nothing."""
    served = await serve(WALK, clock=clock)
    checks = [{"action": "login", "ip": IP_A}] * 3 + [{"action": "login", "ip": IP_A,
                                                       "cost": 0}]
    status, body, headers = await served.answer("POST", BATCH, json={"checks": checks})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert [r["allowed"] for r in body["results"]] == [True, True, False, False]
    bad = {"checks": [{"action": "login", "ip": IP_B}, {"action": "nope"}]}
    status, body, _ = await served.answer("POST", BATCH, json=bad)
    assert status == 400 and set(body) == {"error"}
    assert "checks[1]" in body["error"] and "nope" not in body["error"]
    status, body, _ = await served.answer("POST", CHECK, json={"action": "login", "ip": IP_B})
    assert status == 200 and body["limits"][0]["remaining"] == 1


async def test_a_batch_answers_what_its_checks_answer_one_by_one(serve: Any,
                                                                clock: FakeClock) -> None:
    """A batch of costs 1, 0, 1, 1 for one subject, and the same checks sent one by one for
    another: each result is that check's single answer (refund tokens where hits were
    taken)."""
    served = await serve(WALK, clock=clock)
    checks = [{"action": "login", "ip": IP_A, "cost": cost} for cost in (1, 0, 1, 1)]
    status, body, _ = await served.answer("POST", BATCH, json={"checks": checks})
    assert status == 200
    singles = [(await served.answer("POST", CHECK, json={**check, "ip": IP_B}))[1]
               for check in checks]
    assert body["results"] == singles
    assert [r["allowed"] for r in singles] == [True, True, True, False]
    assert [r.get("refund") for r in singles] == ["<token>", None, "<token>", None]


OTHER_METHODS = ["GET", "HEAD", "PUT", "DELETE"]


@pytest.mark.parametrize("method", OTHER_METHODS)
async def test_other_methods_on_the_check_paths_are_405_json(serve: Any, method: str) -> None:
    """Only POST decides: other methods on /v1/check and /v1/check/batch are a 405 with a
    JSON error body (none for HEAD)."""
    served = await serve(WALK)
    for path in (CHECK, BATCH):
        status, body, headers = await served.answer(method, path)
        assert status == 405
        if method != "HEAD":
            assert set(body) == {"error"}
            assert headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("method", OTHER_METHODS)
async def test_a_405_on_the_check_paths_says_allow_post(serve: Any, method: str) -> None:
    """A 405 on /v1/check and /v1/check/batch names the method that is allowed."""
    served = await serve(WALK)
    for path in (CHECK, BATCH):
        status, _, headers = await served.answer(method, path)
        assert status == 405
        assert headers.get("Allow") == "POST"


async def test_a_trailing_slash_is_404_and_other_spellings_of_the_path_are_decided(
        serve: Any) -> None:
    """A trailing slash is a JSON 404; a percent-encoded path and an absolute-form target
    name the same route and are decided (sent raw: aiohttp's client would normalise them)."""
    served = await serve(WALK)
    status, body, _ = await served.answer("POST", "/v1/check/", json={"action": "login"})
    assert status == 404 and set(body) == {"error"}
    good = json.dumps({"action": "login", "ip": IP_A}).encode()
    for target in ("/v1/%63heck", "http://localhost/v1/check"):
        head, answer, _ = await raw_exchange(served, post_head(target, good), good)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(answer)["allowed"], target


# --------------------------------------------------------------------------- Expect, draining


@pytest.mark.parametrize("path", [CHECK, BATCH])
async def test_expect_100_continue_gets_its_interim_answer(serve: Any, path: str) -> None:
    """A client that waits for "100 Continue" before sending its body gets it, then its
    decision."""
    served = await serve(WALK)
    body = json.dumps({"action": "login", "ip": IP_A}).encode()
    if path == BATCH:
        body = json.dumps({"checks": [{"action": "login", "ip": IP_A}]}).encode()
    head, answer, _ = await raw_exchange(
        served, post_head(path, body, "Expect: 100-continue"), body, expect_continue=True)
    assert head.startswith(b"HTTP/1.1 200 "), head
    decision = json.loads(answer)
    assert (decision["results"][0] if path == BATCH else decision)["allowed"] is True


async def test_expect_100_continue_with_the_aiohttp_client(serve: Any) -> None:
    """The same with aiohttp's own client (expect100=True), within a bound: a server that
    never sent "100 Continue" would leave both sides waiting."""
    served = await serve(WALK)
    async with asyncio.timeout(5):
        resp = await served.client.post(CHECK, json={"action": "login", "ip": IP_A},
                                         expect100=True)
        assert resp.status == 200 and (await resp.json())["allowed"] is True


@pytest.mark.parametrize("path", [CHECK, BATCH])
async def test_draining_answers_close_their_connection(serve: Any, path: str) -> None:
    """Before draining the connection is kept; once the worker drains (STOPPING), every
    answer (a decision or a 400) says Connection: close and the server closes the socket."""
    served = await serve(WALK)
    good = json.dumps({"action": "login", "ip": IP_A}).encode()
    if path == BATCH:
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


# --------------------------------------------------------------------------- concurrency, Redis


async def test_cache_denials_under_concurrency_are_all_answered(serve: Any,
                                                                clock: FakeClock) -> None:
    """40 concurrent checks of a subject the local cache knows is over its limit are all
    answered, alike, from the cache."""
    served = await serve(WALK, clock=clock)
    await served.cache_on()
    for _ in range(3):
        await served.answer("POST", CHECK, json={"action": "login", "ip": IP_A})
    answers = await asyncio.wait_for(asyncio.gather(*(
        served.answer("POST", CHECK, json={"action": "login", "ip": IP_A})
        for _ in range(40))), 10)
    assert all(a == answers[0] for a in answers)
    assert answers[0][0] == 200 and answers[0][1]["reason"] == "rate_limited"
    text = await served.metrics()
    assert sample(text, "ratekeeper_local_cache_hits_total", kind="rate_limited") == 40


async def test_redis_time_is_observed_once_per_write(serve: Any) -> None:
    """ratekeeper_redis_seconds_count{op="check"}: one per sequential check, none for an
    answer given without Redis, one for a batch (its checks go in one write)."""
    served = await serve(CONFIG)

    async def observed() -> float:
        return sample(await served.metrics(), "ratekeeper_redis_seconds_count", op="check")

    start = await observed()
    for _ in range(3):
        status, _, _ = await served.answer("POST", CHECK, json={"action": "login",
                                                                "ip": IP_A, "user": "u"})
        assert status == 200
    assert await observed() - start == 3
    status, body, _ = await served.answer("POST", CHECK, json={"action": "signup-page"})
    assert status == 200 and body["allowed"]
    assert await observed() - start == 3
    checks = [{"action": "everything"} for _ in range(5)]
    status, body, _ = await served.answer("POST", BATCH, json={"checks": checks})
    assert status == 200 and len(body["results"]) == 5
    assert await observed() - start == 4


async def test_a_client_that_disconnects_while_its_check_waits_breaks_nothing(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """An HTTP client that gives up while its check waits on Redis (paused): once Redis
    runs again, the next checks are normal decisions (no 5xx, not degraded)."""
    served = await serve(HUNDRED, app_settings=lone_settings)
    _, body, _ = await served.answer("POST", CHECK, json={"action": "login", "ip": IP_A})
    assert body["limits"][0]["remaining"] == 99
    lone_redis.pause()
    try:
        with pytest.raises(TimeoutError):
            await served.client.post(CHECK, json={"action": "login", "ip": IP_A},
                                     timeout=ClientTimeout(total=0.2))
    finally:
        lone_redis.resume()
    for _ in range(2):
        status, body, _ = await served.answer("POST", CHECK, json={"action": "login",
                                                                   "ip": IP_A})
        assert status == 200 and not body["degraded"]
        assert body["limits"][0]["remaining"] in (96, 97, 98)


def login_call(prefix: str, subject: str, *, cost: int = 1) -> CheckCall:
    """A check of one sliding counter (100 a minute), no ban key, as the checker sends it."""
    return [f"{prefix}:{{{subject}}}:r"], cost, 0, 1, ("c", "0", 0, 1, 100, 60_000)


def remaining(reply: Any) -> int:
    assert not isinstance(reply, StoreUnavailable), reply
    return parse_outcome(reply).windows[0].remaining


async def test_a_caller_that_gives_up_while_its_batch_is_out_spoils_nothing(
        lone_redis: RedisServer, redis_client_of: Callable[[RedisServer], Any],
        key_prefix: str) -> None:
    """A caller cancelled while its write waits on Redis (paused): the write's reply is
    still read and its hit taken once, the breaker stays closed, and the next callers get
    their own answers."""
    client = redis_client_of(lone_redis)
    limiter = opened(Limiter(client, timeout=5.0))
    coalescer = limiter.coalescer
    assert coalescer is not None
    ended: list[BaseException | None] = []
    write_ended = asyncio.Event()

    def on_batch(seconds: float, error: BaseException | None) -> None:
        ended.append(error)
        write_ended.set()

    assert remaining((await limiter.decide([login_call(key_prefix, "a")]))[0]) == 99
    coalescer.on_batch = on_batch
    lone_redis.pause()
    try:
        gone = asyncio.ensure_future(limiter.decide([login_call(key_prefix, "a")]))
        for _ in range(3):  # the caller queues its check; the write leaves
            await asyncio.sleep(0)
        if coalescer.batches != 2:
            pytest.fail("precondition: the second write is out")
        gone.cancel()
    finally:
        lone_redis.resume()
    await asyncio.wait_for(write_ended.wait(), 5)
    assert ended == [None]  # Redis answered the write the caller left
    assert remaining((await limiter.decide([login_call(key_prefix, "a")]))[0]) == 97
    assert remaining((await limiter.decide([login_call(key_prefix, "b", cost=0)]))[0]) == 100
    assert limiter.breaker.state == "closed"
    assert gone.cancelled()


@pytest.fixture
async def redis_client_of() -> AsyncIterator[Callable[[RedisServer], Any]]:
    """Clients of given servers (no retries), closed after the test."""
    made: list[aioredis.Redis] = []

    def make(server: RedisServer) -> aioredis.Redis:
        client = aioredis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


class Monotonic:
    """Seconds that only move when a test moves them (the breaker's clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_gauge_says_closed_once_a_probe_closed_the_circuit(
        serve: Any, lone_redis: RedisServer, lone_settings: Settings) -> None:
    """Redis down long enough to open the circuit, then back: past the cooldown the next
    check is the probe, a normal decision, and /metrics says the circuit is closed."""
    served = await serve(HUNDRED, app_settings=lone_settings)
    clock = Monotonic()
    limiter = served.runtime.limiter
    limiter.breaker = Breaker(clock=clock)
    ask = {"action": "login", "ip": IP_A}
    lone_redis.stop()
    for _ in range(8):
        _, body, _ = await served.answer("POST", CHECK, json=ask)
        if not body["degraded"]:
            pytest.fail("precondition: Redis is down")
    if sample(await served.metrics(), "ratekeeper_circuit_breaker_state") != 2:
        pytest.fail("precondition: the circuit is open")
    lone_redis.restart()
    clock.now += limiter.breaker.cooldown  # the next check is the probe
    status, body, _ = await served.answer("POST", CHECK, json=ask)
    assert status == 200 and not body["degraded"]
    assert body["limits"][0]["remaining"] == 99
    text = await served.metrics()
    assert "\nratekeeper_circuit_breaker_state " in text
    assert sample(text, "ratekeeper_circuit_breaker_state") == 0

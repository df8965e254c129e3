"""WSGI and aiohttp middleware in front of real apps, asking a real sidecar."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import ipaddress
from collections.abc import AsyncIterator, Iterable
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from aiohttp import web

from ratekeeper.api.problem import QUOTA_EXCEEDED
from ratekeeper.client import AsyncClient, SyncClient
from ratekeeper.client.middleware import RatekeeperMiddleware, ratekeeper_middleware
from ratekeeper.config.routes import RouteTable
from ratekeeper.config.rules import parse_config
from ratekeeper.decision.flags import FlagState
from ratekeeper.server.state import RUNTIME

from support.common import EXAMPLE, FakeClock
from support.redis_servers import free_port

CONFIG = """
[rules.upload-ip]
limit = "2 per minute"
key = ["ip"]
fail = "closed"
[rules.search-ip]
limit = "1 per minute"
key = ["ip"]
[actions.upload]
rules = ["upload-ip"]
flags = ["no-uploads"]
[actions.search]
rules = ["search-ip"]
[flags.no-uploads]
description = "stop uploads"
message = "New uploads are temporarily disabled."

[[routes]]
method = "POST"
path = "/legacy/*"
action = "upload"
[[routes]]
method = "GET"
path = "/search/*"
action = "search"
"""
ROUTES = RouteTable.from_config(parse_config(CONFIG))


class Origin:
    """A WSGI app that says hello and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello from the origin"]


def call_wsgi(app: Any, method: str, path: str, remote: str = "127.0.0.1",
              **headers: str) -> tuple[str, dict[str, str], bytes]:
    """Run one request through a WSGI callable as a server would."""
    return call_wsgi_body(app, method, path, remote, b"", **headers)


def call_wsgi_body(app: Any, method: str, path: str, remote: str, body: bytes,
                   **headers: str) -> tuple[str, dict[str, str], bytes]:
    """The same with a request body."""
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path.split("?")[0],
                               "QUERY_STRING": path.partition("?")[2], "REMOTE_ADDR": remote,
                               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    for name, value in headers.items():
        key = name.upper()
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]],
                       exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, dict(response_headers)

    answer = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], answer


@pytest.fixture
async def sidecar(make_client: Any) -> Any:
    """The ratekeeper app on a free port (a TestClient: .make_url, .app)."""
    return await make_client(CONFIG)


def url_of(sidecar: Any) -> str:
    return str(sidecar.make_url("")).rstrip("/")


@pytest.fixture
def sync_client(sidecar: Any) -> Iterable[SyncClient]:
    client = SyncClient(url_of(sidecar), timeout=2.0)
    yield client
    client.close()


async def test_wsgi_limits_routed_requests_only(sync_client: SyncClient) -> None:
    """Two uploads reach the app with RateLimit headers; the third is a 429 it never sees."""
    origin = Origin()
    app = RatekeeperMiddleware(origin, sync_client, ROUTES)
    for left in (1, 0):
        status, headers, body = await asyncio.to_thread(
            call_wsgi, app, "POST", "/legacy/", "127.0.0.1", x_real_ip="203.0.113.7")
        assert (status, body) == ("200 OK", b"hello from the origin")
        assert headers["RateLimit"].startswith(f'"upload-ip";r={left};')
        assert headers["RateLimit-Policy"] == '"upload-ip";q=2;w=60'
    status, headers, body = await asyncio.to_thread(
        call_wsgi, app, "POST", "/legacy/", "127.0.0.1", x_real_ip="203.0.113.7")
    assert status == "429 Too Many Requests"
    assert headers["Content-Type"] == "application/problem+json"
    assert int(headers["Retry-After"]) > 0
    assert b'"type":"' + QUOTA_EXCEEDED.encode() in body
    assert origin.calls == 2
    for _ in range(3):  # unrouted: straight through, no headers, nothing counted
        status, headers, _ = await asyncio.to_thread(call_wsgi, app, "GET", "/simple/numpy/")
        assert status == "200 OK" and "RateLimit" not in headers
    assert origin.calls == 5


async def test_wsgi_believes_forwarding_headers_only_from_trusted_proxies(
        sync_client: SyncClient) -> None:
    """Behind a trusted proxy each X-Forwarded-For client has a bucket; from others: ignored."""
    app = RatekeeperMiddleware(Origin(), sync_client, ROUTES, trusted_proxies=["10.0.0.0/8"])

    def search(remote: str, xff: str) -> str:
        return call_wsgi(app, "GET", "/search/?q=x", remote, x_forwarded_for=xff)[0]

    assert await asyncio.to_thread(search, "10.0.0.5", "198.51.100.1") == "200 OK"
    assert await asyncio.to_thread(search, "10.0.0.6", "198.51.100.2") == "200 OK"
    assert (await asyncio.to_thread(search, "10.0.0.5", "198.51.100.1")).startswith("429")
    # a client talking to us directly cannot pick a fresh bucket with X-Forwarded-For
    assert await asyncio.to_thread(search, "192.0.2.50", "198.51.100.3") == "200 OK"
    assert (await asyncio.to_thread(search, "192.0.2.50", "198.51.100.4")).startswith("429")


async def test_wsgi_kill_switch_is_403_with_its_message(sidecar: Any,
                                                        sync_client: SyncClient) -> None:
    """With the flag on, an upload gets 403 problem+json carrying the switch's message."""
    sidecar.app[RUNTIME].flags.replace([FlagState("no-uploads", enabled=True)])
    origin = Origin()
    app = RatekeeperMiddleware(origin, sync_client, ROUTES)
    status, headers, body = await asyncio.to_thread(call_wsgi, app, "POST", "/legacy/")
    assert status == "403 Forbidden"
    assert headers["Content-Type"] == "application/problem+json"
    assert b"New uploads are temporarily disabled." in body and origin.calls == 0


async def test_wsgi_sidecar_down_follows_fail_modes() -> None:
    """Sidecar unreachable: a fail-open action passes, a fail-closed one is a 429."""
    client = SyncClient(f"http://127.0.0.1:{free_port()}", fail={"upload": "closed"})
    app = RatekeeperMiddleware(Origin(), client, ROUTES)
    assert (await asyncio.to_thread(call_wsgi, app, "GET", "/search/"))[0] == "200 OK"
    status, headers, _ = await asyncio.to_thread(call_wsgi, app, "POST", "/legacy/")
    assert status == "429 Too Many Requests" and headers["Retry-After"] == "1"
    client.close()


@pytest.fixture
async def aio_app(aiohttp_client: Any, sidecar: Any) -> AsyncIterator[Any]:
    """An aiohttp origin with the middleware, asking the sidecar."""
    client = AsyncClient(url_of(sidecar), timeout=2.0)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application(middlewares=[ratekeeper_middleware(client, ROUTES)])
    app.router.add_post("/legacy/", hello)
    app.router.add_get("/search/", missing)
    app.router.add_get("/", hello)
    yield await aiohttp_client(app)
    await client.close()


async def test_aiohttp_limits_and_headers(aio_app: Any) -> None:
    """Allowed responses (also raised HTTP errors) carry RateLimit; the limit gives a 429."""
    for left in (1, 0):
        resp = await aio_app.post("/legacy/", headers={"X-Real-IP": "203.0.113.9"})
        assert resp.status == 200 and await resp.text() == "hello"
        assert resp.headers["RateLimit"].startswith(f'"upload-ip";r={left};')
    resp = await aio_app.post("/legacy/", headers={"X-Real-IP": "203.0.113.9"})
    assert resp.status == 429
    assert resp.headers["Content-Type"] == "application/problem+json"
    problem = await resp.json(content_type="application/problem+json")
    assert problem["type"] == QUOTA_EXCEEDED and problem["violated-policies"] == ["upload-ip"]
    assert 0 < int(resp.headers["Retry-After"]) <= 60
    resp = await aio_app.get("/search/", headers={"X-Real-IP": "203.0.113.9"})
    assert resp.status == 404 and resp.headers["RateLimit"].startswith('"search-ip";r=0;')
    resp = await aio_app.get("/")
    assert resp.status == 200 and "RateLimit" not in resp.headers


async def test_aiohttp_kill_switch(aio_app: Any, sidecar: Any) -> None:
    """The kill switch answers 403 with its message before the handler runs."""
    sidecar.app[RUNTIME].flags.replace([FlagState("no-uploads", enabled=True,
                                                  message="Read-only for maintenance.")])
    resp = await aio_app.post("/legacy/")
    assert resp.status == 403
    problem = await resp.json(content_type="application/problem+json")
    assert problem == {"type": "about:blank", "title": "Forbidden", "status": 403,
                       "detail": "Read-only for maintenance.", "flag": "no-uploads"}


async def test_aiohttp_untrusted_peer_headers_ignored(aiohttp_client: Any, sidecar: Any) -> None:
    """With only 10.0.0.0/8 trusted, the test client (127.0.0.1) cannot pick its bucket."""
    client = AsyncClient(url_of(sidecar), timeout=2.0)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application(middlewares=[ratekeeper_middleware(
        client, ROUTES, trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")])])
    app.router.add_get("/search/", hello)
    origin = await aiohttp_client(app)
    first = await origin.get("/search/", headers={"X-Real-IP": "198.51.100.1"})
    second = await origin.get("/search/", headers={"X-Real-IP": "198.51.100.2",
                                                   "X-Forwarded-For": "198.51.100.3"})
    assert (first.status, second.status) == (200, 429)
    await client.close()


def load_example(name: str) -> Any:
    """Import one of examples/*.py (they are scripts, not a package)."""
    path = EXAMPLE.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_wsgi_example_warehouse_patterns(make_client: Any, clock: FakeClock) -> None:
    """examples/wsgi_app.py: failed logins only count, failed creations are refunded, the
    upload kill switch answers 403, and the middleware limits /search/ by route."""
    sidecar = await make_client(EXAMPLE.read_text(), clock=clock)
    example = load_example("wsgi_app")
    client = SyncClient(url_of(sidecar), timeout=2.0)
    app = example.make_app(client)

    def post(path: str, user: str, form: str, ip: str = "192.0.2.10") -> str:
        environ_headers = {"x_user": user, "content_type": "application/x-www-form-urlencoded"}
        status, _, _ = call_wsgi_body(app, "POST", path, ip, form.encode(), **environ_headers)
        return status

    # 12 good logins cost nothing; 10 bad ones lock alice out, even with the right password
    assert {await asyncio.to_thread(post, "/login", "bob", "password=secret")
            for _ in range(12)} == {"200 OK"}
    bad = [await asyncio.to_thread(post, "/login", "alice", "password=nope", "192.0.2.11")
           for _ in range(10)]
    assert set(bad) == {"401 Unauthorized"}
    assert (await asyncio.to_thread(post, "/login", "alice", "password=secret",
                                    "192.0.2.12")).startswith("429")
    # project-create is 4 per day: a failed creation is refunded, so 4 real ones still fit
    created = [await asyncio.to_thread(post, "/projects", "carol", f"name={name}", "192.0.2.13")
               for name in ("broken-a", "p1", "broken-b", "p2", "p3", "p4", "p5")]
    assert created == ["409 Conflict", "200 OK", "409 Conflict", "200 OK", "200 OK", "200 OK",
                       "429 Too Many Requests"]
    # the upload kill switch
    assert await asyncio.to_thread(post, "/upload", "dan", "project=numpy") == "200 OK"
    sidecar.app[RUNTIME].flags.replace([FlagState("disallow-new-upload", enabled=True)])
    status, _, body = await asyncio.to_thread(
        call_wsgi_body, app, "POST", "/upload", "192.0.2.14", b"project=numpy", x_user="dan")
    assert status == "403 Forbidden" and b"New uploads are temporarily disabled" in body
    # the [[routes]] of pypi.toml: GET /search/* is 5 per second per IP
    searches = [(await asyncio.to_thread(call_wsgi, app, "GET", "/search/?q=x", "192.0.2.15"))[0]
                for _ in range(6)]
    assert searches == ["200 OK"] * 5 + ["429 Too Many Requests"]
    client.close()


async def test_aiohttp_example_warehouse_patterns(make_client: Any, aiohttp_client: Any,
                                                  clock: FakeClock) -> None:
    """examples/aiohttp_app.py: the same patterns through AsyncClient."""
    sidecar = await make_client(EXAMPLE.read_text(), clock=clock)
    example = load_example("aiohttp_app")
    app = await aiohttp_client(example.make_app(url_of(sidecar), timeout=2.0))
    for _ in range(10):
        resp = await app.post("/login", data={"password": "x"}, headers={"X-User": "erin"})
        assert resp.status == 401
    resp = await app.post("/login", data={"password": "secret"}, headers={"X-User": "erin"})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    statuses = []
    for name in ("broken", "q1", "q2", "q3", "q4", "q5"):
        resp = await app.post("/projects", data={"name": name}, headers={"X-User": "frank"})
        statuses.append(resp.status)
    assert statuses == [409, 200, 200, 200, 200, 429]
    sidecar.app[RUNTIME].flags.replace([FlagState("read-only", enabled=True)])
    resp = await app.post("/upload/numpy", data=b"wheel", headers={"X-User": "frank"})
    assert resp.status == 403
    assert await resp.text() == "Read-only mode: PyPI is not accepting changes right now."

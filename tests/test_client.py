"""AsyncClient and SyncClient against a real sidecar: answers, errors, fail modes, pooling."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from ratekeeper.api.wire import Decision, RefundResult
from ratekeeper.client import (
    AsyncClient,
    Check,
    FallbackDecision,
    RequestRejected,
    SidecarUnavailable,
    SyncClient,
)

from support.redis_servers import free_port

CONFIG = """
[rules.login-ip]
limit = "3 per minute"
key = ["ip"]
[rules.create-user]
limit = "2 per day"
key = ["user"]
[actions.login]
rules = ["login-ip"]
[actions.project-create]
rules = ["create-user"]
"""


class Adapter:
    """Calls either client the same way from async test code (the sync one in a thread)."""

    def __init__(self, client: AsyncClient | SyncClient) -> None:
        self.client = client

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def check(self, *args: Any, **kwargs: Any) -> Decision:
        result: Decision = await self._call("check", *args, **kwargs)
        return result

    async def batch(self, checks: list[Check]) -> list[Decision]:
        result: list[Decision] = await self._call("batch", checks)
        return result

    async def refund(self, token: Any) -> RefundResult:
        result: RefundResult = await self._call("refund", token)
        return result


MakeAdapter = Callable[..., Adapter]


@pytest.fixture(params=["async", "sync"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeAdapter]:
    """Build clients of one kind (each test runs with both); all are closed after."""
    made: list[AsyncClient | SyncClient] = []

    def factory(url: str, **kwargs: Any) -> Adapter:
        kwargs.setdefault("timeout", 2.0)
        cls = AsyncClient if request.param == "async" else SyncClient
        made.append(cls(url, **kwargs))
        return Adapter(made[-1])

    yield factory
    for client in made:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()


@pytest.fixture
async def sidecar(make_client: Any) -> str:
    """The ratekeeper app on a free port; its base URL."""
    client = await make_client(CONFIG)
    return str(client.make_url("")).rstrip("/")


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (kernel backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


async def fake_sidecar(aiohttp_server: Callable[..., Awaitable[Any]],
                       handler: Callable[[web.Request], Awaitable[web.Response]]) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_check_walk_peek_and_denial(make: MakeAdapter, sidecar: str) -> None:
    """Three logins pass, a peek consumes nothing, the fourth is denied with retry_after."""
    client = make(sidecar)
    seen = [(await client.check("login", ip="192.0.2.1")).limits[0].remaining for _ in range(2)]
    peek = await client.check("login", ip="192.0.2.1", cost=0)
    assert peek.allowed and peek.limits[0].remaining == 1 and not peek.refund
    seen.append((await client.check("login", ip="192.0.2.1")).limits[0].remaining)
    denied = await client.check("login", ip="192.0.2.1")
    assert seen == [2, 1, 0]
    assert type(denied) is Decision
    assert (denied.allowed, denied.reason, denied.degraded) == (False, "rate_limited", False)
    assert 0 < denied.retry_after <= 60


async def test_batch_in_order_and_empty(make: MakeAdapter, sidecar: str) -> None:
    """A batch answers in order with each check's own decision; an empty batch asks nothing."""
    client = make(sidecar)
    results = await client.batch([Check("login", ip="192.0.2.2"),
                                  Check("project-create", user="alice", cost=2),
                                  Check("project-create", user="alice")])
    assert [r.action for r in results] == ["login", "project-create", "project-create"]
    assert [r.allowed for r in results] == [True, True, False]
    assert await client.batch([]) == []


async def test_refund_through_the_client(make: MakeAdapter, sidecar: str) -> None:
    """Hit, refund the Decision, refund again; a Decision that took nothing needs no call."""
    client = make(sidecar)
    first = await client.check("project-create", user="bob")
    second = await client.check("project-create", user="bob")
    assert second.limits[0].remaining == 0
    assert await client.refund(second) == RefundResult(refunded=True)
    assert await client.refund(second.refund) == RefundResult(refunded=False,
                                                              reason="already_refunded")
    assert (await client.check("project-create", user="bob", cost=0)).limits[0].remaining == 1
    denied = await client.check("project-create", user="bob", cost=5)
    assert await client.refund(denied) == RefundResult(refunded=False, reason="nothing_taken")
    assert first.refund


async def test_a_look_carries_no_refund(make: MakeAdapter, sidecar: str) -> None:
    """A look (cost 0) and a denial have no ``refund`` on the wire, every other field is
    there, and both clients read their ``refund`` as None; a hit's is its token."""
    look = {"action": "login", "ip": "192.0.2.4", "cost": 0}
    async with aiohttp.ClientSession() as session, session.post(f"{sidecar}/v1/check",
                                                                json=look) as resp:
        wire = await resp.json()
    assert set(wire) == {"allowed", "reason", "action", "retry_after", "retry_after_ms", "flag",
                         "message", "degraded", "shadow", "limits"}
    client = make(sidecar)
    look = await client.check("login", ip="192.0.2.4", cost=0)
    denied = await client.check("login", ip="192.0.2.4", cost=4)
    taken = await client.check("login", ip="192.0.2.4")
    assert look.refund is None and denied.refund is None and "UNSET" not in repr(look)
    assert isinstance(taken.refund, str) and taken.refund.startswith("r1.")


async def test_bad_requests_raise_request_rejected(make: MakeAdapter, sidecar: str) -> None:
    """Unknown action, missing subject, bad refund token: RequestRejected with the 400 sentence."""
    client = make(sidecar, default_fail="open")
    with pytest.raises(RequestRejected) as caught:
        await client.check("nope", ip="192.0.2.1")
    assert caught.value.status == 400 and "unknown action" in str(caught.value)
    with pytest.raises(RequestRejected, match="needs 'user'"):
        await client.check("project-create", ip="192.0.2.1")
    with pytest.raises(RequestRejected, match="not valid"):
        await client.refund("r1.forged.token")


@pytest.mark.parametrize("where", ["dead", "silent"])
async def test_unreachable_sidecar_uses_each_actions_fail_mode(
        make: MakeAdapter, dead_url: str, silent_url: str, where: str) -> None:
    """Refused or timed out: open allows, closed denies, raise raises; all marked degraded."""
    url = dead_url if where == "dead" else silent_url
    client = make(url, timeout=0.05, fail={"project-create": "closed", "login": "raise"},
                  default_fail="open")
    opened = await client.check("search", ip="192.0.2.1")
    assert isinstance(opened, FallbackDecision)
    assert (opened.allowed, opened.degraded, opened.reason) == (True, True, None)
    assert opened.error
    closed = await client.check("project-create", user="carol")
    assert isinstance(closed, FallbackDecision)
    assert (closed.allowed, closed.reason, closed.retry_after, closed.degraded) == (
        False, "rate_limited", 1, True)
    with pytest.raises(SidecarUnavailable):
        await client.check("login", ip="192.0.2.1")
    results = await client.batch([Check("search", ip="192.0.2.1"),
                                  Check("project-create", user="carol")])
    assert [(r.allowed, r.degraded) for r in results] == [(True, True), (False, True)]
    assert await client.refund("r1.a.b") == RefundResult(refunded=False, reason="unavailable",
                                                         degraded=True)


async def test_5xx_and_garbage_answers_fall_back(make: MakeAdapter,
                                                 aiohttp_server: Any) -> None:
    """A 503 or an unreadable 200 is the sidecar failing: the fail mode decides."""
    async def broken(request: web.Request) -> web.Response:
        if request.path == "/v1/check":
            return web.Response(status=503, text="upstream gone")
        return web.Response(status=200, body=b'{"allowed": "maybe"}')

    url = await fake_sidecar(aiohttp_server, broken)
    client = make(url, default_fail="closed")
    decision = await client.check("login", ip="192.0.2.1")
    assert isinstance(decision, FallbackDecision) and "503" in decision.error
    assert not decision.allowed
    [batched] = await client.batch([Check("login", ip="192.0.2.1")])
    assert isinstance(batched, FallbackDecision) and "unreadable" in batched.error


async def test_connections_are_kept_alive_and_reused(make: MakeAdapter,
                                                     aiohttp_server: Any) -> None:
    """Twenty sequential checks travel over one pooled keep-alive connection."""
    peers: set[Any] = set()
    answer = msgspec.json.encode(Decision(allowed=True, reason=None, action="login"))

    async def record(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(body=answer, content_type="application/json")

    client = make(await fake_sidecar(aiohttp_server, record))
    for _ in range(20):
        assert (await client.check("login", ip="192.0.2.1")).allowed
    assert len(peers) == 1


def test_bad_fail_modes_and_timeouts_are_refused() -> None:
    """A fail mode other than open/closed/raise, or a zero timeout, is a ValueError."""
    with pytest.raises(ValueError, match="login"):
        SyncClient(fail={"login": "sometimes"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="default"):
        AsyncClient(default_fail="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SyncClient(timeout=0)


async def test_base_url_path_prefix_is_kept(make: MakeAdapter, aiohttp_server: Any) -> None:
    """A base URL with a path (the sidecar behind a proxy prefix) keeps it on every call."""
    paths: list[str] = []
    answer = msgspec.json.encode(Decision(allowed=True, reason=None, action="login"))

    async def record(request: web.Request) -> web.Response:
        paths.append(request.path)
        return web.Response(body=answer, content_type="application/json")

    client = make(await fake_sidecar(aiohttp_server, record) + "/ratekeeper/")
    await client.check("login", ip="192.0.2.1")
    await client.batch([Check("login", ip="192.0.2.1")])
    assert paths == ["/ratekeeper/v1/check", "/ratekeeper/v1/check/batch"]

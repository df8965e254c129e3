"""ratekeeper.integrations.warehouse, exercised the way Warehouse's own rate-limiting tests
exercise its limiter, against a real sidecar and Redis: names as actions, opaque identifiers,
clears, resets to the millisecond, window stats, failing open, and the factory."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.client import SyncClient
from ratekeeper.config.rules import config_warnings, load_config
from ratekeeper.integrations.warehouse import (
    ERROR_METRIC,
    TAKES_NOTHING_WHEN_DENIED,
    RateLimit,
    RateLimiter,
    WindowStats,
    subject_of,
)
from ratekeeper.settings import Settings

from support.admin import dump
from support.common import ROOT, SALT, FakeClock, config_from
from support.redis_servers import free_port

TOKEN = "origin-token-for-warehouse-3d0a"
WAREHOUSE = ROOT / "examples" / "warehouse.toml"
# Warehouse's registered limiter names, each with its code's default limit string
LIMITERS = {
    "user.login": "10 per 5 minutes", "ip.login": "10 per 5 minutes",
    "global.login": "1000 per 5 minutes",
    "2fa.user": "5 per 5 minutes, 20 per hour, 50 per day",
    "2fa.ip": "10 per 5 minutes, 50 per hour", "email.add": "2 per day",
    "email.verify": "3 per 6 hours", "email.change": "5 per 5 minutes, 20 per hour",
    "accounts.search": "100 per hour", "password.reset": "5 per day",
    "user_oidc.publisher.register": "100 per day", "ip_oidc.publisher.register": "100 per day",
    "project.create.user": "20 per hour", "project.create.ip": "40 per hour",
    "search": "5 per second", "xmlrpc.client": "3600 per hour",
}
ADMIN_FLAGS = {
    "disable-pep740", "disallow-deletion", "disallow-new-project-registration",
    "disallow-new-upload", "disallow-new-user-registration", "disable-upload-scanning",
    "disallow-oidc", "disallow-github-oidc", "disallow-gitlab-oidc", "disallow-google-oidc",
    "disallow-activestate-oidc", "read-only",
}


def limiters_config(limits: dict[str, str], clearable: tuple[str, ...] = ()) -> str:
    """A config of one limiter per name, as examples/warehouse.toml writes them."""
    parts = []
    for name, limit in limits.items():
        parts.append(f'[rules."{name}"]\nlimit = "{limit}"\nkey = ["subject"]\n'
                     f'[actions."{name}"]\nrules = ["{name}"]\n'
                     f"clearable = {'true' if name in clearable else 'false'}\n")
    return "\n".join(parts)


class Recorder:
    """A metrics service that records what it is told (Warehouse's IMetricsService shape)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def increment(self, name: str, *, tags: Any = ()) -> None:
        self.calls.append((name, list(tags)))


class Limiters:
    """Builds RateLimiters over one SyncClient and calls them from a thread, as a WSGI worker
    would (the sidecar serves from this test's event loop)."""

    def __init__(self, url: str, **client: Any) -> None:
        self.client = SyncClient(url, timeout=2.0, origin_token=TOKEN, **client)
        self.metrics = Recorder()

    def __call__(self, *identifiers: object, limit: str = "") -> Threaded:
        return Threaded(RateLimiter(self.client, limit, identifiers=list(identifiers),
                                    metrics=self.metrics))


class Threaded:
    """A RateLimiter whose blocking calls run in a thread."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.limiter, name)

        async def call(*args: Any) -> Any:
            return await asyncio.to_thread(method, *args)

        return call


Factory = Callable[..., Any]


@pytest.fixture
async def warehouse(make_client: Factory, clock: FakeClock, settings: Settings
                    ) -> AsyncIterator[Callable[..., Any]]:
    """Serve a config (with the origin token set) and give a Limiters over it."""
    made: list[Limiters] = []

    async def start(config: str, app_settings: Settings = settings) -> Limiters:
        with_token = dataclasses.replace(app_settings, origin_tokens=(TOKEN.encode(),))
        sidecar = await make_client(config, clock=clock, app_settings=with_token)
        made.append(Limiters(str(sidecar.make_url("")).rstrip("/")))
        return made[-1]

    yield start
    for limiters in made:
        limiters.client.close()


def test_the_example_mirrors_every_limiter_and_flag() -> None:
    """examples/warehouse.toml: every limiter Warehouse registers, by its name, with its
    default limit, the exact log and fail open, keyed on the opaque subject; all 12 flags."""
    config = load_config(WAREHOUSE)
    assert set(config.actions) == set(LIMITERS)
    for name, limit in LIMITERS.items():
        expected = config_from(limiters_config({name: limit})).rules[name]
        (rule,) = config.actions[name].rules
        assert (rule.windows, rule.key) == (expected.windows, ("subject",))
        assert rule.algorithm == "sliding-log" and rule.fail == "open" and not rule.penalty
    assert set(config.flags) == ADMIN_FLAGS
    assert all(flag.origin for flag in config.flags.values())
    assert {n for n, a in config.actions.items() if a.clearable} == {
        "email.add", "email.verify", "password.reset", "user_oidc.publisher.register",
        "ip_oidc.publisher.register"}
    assert config_warnings(config) == []


def test_subjects_are_the_identifiers_as_warehouse_strs_them() -> None:
    """None is "None" (Warehouse str()s identifiers), the order and count matter, and no
    identifier can run into the next."""
    assert subject_of([]) == "[]"
    assert subject_of([None]) == subject_of(["None"]) == '["None"]'
    assert subject_of(["a,b"]) != subject_of(["a", "b"])
    assert subject_of([7, "x"]) == '["7","x"]'


async def test_basic(warehouse: Callable[..., Any]) -> None:
    """A limiter allows until its window is used up, per identifier."""
    limiters = await warehouse(limiters_config({"foo": "1 per minute"}))
    limiter = limiters("foo")
    assert await limiter.test("foo") and await limiter.test("bar")
    hits = 0
    while await limiter.hit("bar"):
        hits += 1
    assert hits == 1
    assert await limiter.test("foo")
    assert not await limiter.test("bar")
    assert limiters.metrics.calls == []


async def test_namespacing(warehouse: Callable[..., Any]) -> None:
    """Two limiters with one limit string and one identifier count apart: the name is the
    first identifier, and each name is its own action."""
    limiters = await warehouse(limiters_config({"user.login": "1 per minute",
                                                "ip.login": "1 per minute"}))
    user, ip = limiters("user.login"), limiters("ip.login")
    while await user.hit("bar"):
        pass
    assert not await user.test("bar")
    assert await ip.test("bar")


async def test_opaque_identifiers(warehouse: Callable[..., Any], redis: aioredis.Redis,
                                  key_prefix: str) -> None:
    """None, text that is no IP and several identifiers are accepted; None and "None" share
    a bucket as in Warehouse; two IPv6 addresses of one /64 do not (an IP is taken as written);
    nothing reaches Redis raw; no identifier at all is the global bucket."""
    limiters = await warehouse(limiters_config({"one": "1 per minute",
                                                "global.login": "2 per minute"}))
    one = limiters("one")
    assert await one.hit(None)
    assert not await one.hit("None")
    assert await one.hit("not an address")
    assert await one.hit("2001:db8::1") and await one.hit("2001:db8::2")
    assert await one.hit("user-1", "203.0.113.7")
    assert not await one.test("user-1", "203.0.113.7")
    glob = limiters("global.login")
    assert await glob.hit() and await glob.hit() and not await glob.test()
    stored = await dump(redis, key_prefix)
    for raw in (b"not an address", b"2001:db8::1", b"203.0.113.7", b"user-1"):
        assert raw not in stored


async def test_clear(warehouse: Callable[..., Any]) -> None:
    """clear() forgets the hits of a clearable limiter; a limiter the config does not let
    the origin clear keeps them, and the refusal is logged and counted, not raised."""
    limiters = await warehouse(limiters_config({"email.add": "1 per minute",
                                                "email.change": "1 per minute"},
                                               clearable=("email.add",)))
    add, change = limiters("email.add"), limiters("email.change")
    for limiter in (add, change):
        while await limiter.hit("foo"):
            pass
        assert not await limiter.test("foo")
    assert await add.clear("foo") is None
    assert await add.test("foo")
    assert await change.clear("foo") is None
    assert not await change.test("foo")
    assert limiters.metrics.calls == [(ERROR_METRIC, ["call:clear"])]


async def test_resets_in(warehouse: Callable[..., Any], clock: FakeClock) -> None:
    """None while a window has room; after it fills, the time until it has room again to the
    millisecond: less than the window half a second on, even once the denial is cached."""
    limiters = await warehouse(limiters_config({"foo": "1 per minute"}))
    limiter = limiters("foo")
    assert await limiter.resets_in("foo") is None
    while await limiter.hit("foo"):
        pass
    clock.advance(0.5)
    assert not await limiter.test("foo")  # answered by this process's cache
    resets = await limiter.resets_in("foo")
    assert timedelta(0) < resets < timedelta(seconds=60)
    assert resets == timedelta(seconds=59.5)


async def test_resets_in_is_the_soonest_exhausted_window(warehouse: Callable[..., Any],
                                                         clock: FakeClock) -> None:
    """With several windows exhausted, the one that frees up first; a window with room left
    does not count."""
    limiters = await warehouse(limiters_config({"foo": "1 per minute; 2 per hour; 5 per day"}))
    limiter = limiters("foo")
    assert await limiter.hit("x")
    clock.advance(120)
    assert await limiter.hit("x")
    clock.advance(1)
    assert await limiter.resets_in("x") == timedelta(seconds=59)  # minute: 60 - 1
    clock.advance(60)
    # minute window has room again; the hour's oldest hit leaves at 3600 - 181
    assert await limiter.resets_in("x") == timedelta(seconds=3600 - 181)


async def test_get_window_stats(warehouse: Callable[..., Any], clock: FakeClock) -> None:
    """One entry per window, shortest first: untouched, the full quota resetting in the whole
    window (as limits says); once the minute is used up, 0 left there and 8 in the hour."""
    limiters = await warehouse(limiters_config({"foo": "2 per minute; 10 per hour"}))
    limiter = limiters("foo")
    assert await limiter.get_window_stats("foo") == [
        WindowStats(2, 60, 2, 60, timedelta(seconds=60)),
        WindowStats(10, 3600, 10, 3600, timedelta(seconds=3600))]
    while await limiter.hit("foo"):
        pass
    clock.advance(0.75)
    minute, hour = await limiter.get_window_stats("foo")
    assert (minute.remaining, minute.resets_in_seconds) == (0, 59)
    assert minute.resets_in == timedelta(seconds=59.25)
    assert (hour.amount, hour.window_seconds, hour.remaining) == (10, 3600, 8)


async def test_a_refused_hit_takes_nothing(warehouse: Callable[..., Any]) -> None:
    """The one deliberate difference: Warehouse's hit keeps its hit in the windows before the
    refusing one (here the minute); ratekeeper takes nothing when any window refuses."""
    limiters = await warehouse(limiters_config({"foo": "5 per minute, 1 per 10 seconds"}))
    limiter = limiters("foo")
    assert TAKES_NOTHING_WHEN_DENIED and RateLimiter.TAKES_NOTHING_WHEN_DENIED
    assert await limiter.hit("x")
    assert not await limiter.hit("x")
    windows = {s.window_seconds: s.remaining for s in await limiter.get_window_stats("x")}
    assert windows == {10: 0, 60: 4}  # Warehouse's would say 3 left in the minute


async def test_error_fails_open(warehouse: Callable[..., Any]) -> None:
    """A sidecar that cannot be reached: test and hit allow, clear does nothing, resets_in is
    None, the stats empty, and each call is counted as Warehouse counts its errors."""
    limiters = Limiters(f"http://127.0.0.1:{free_port()}")
    try:
        limiter = limiters("foo")
        assert await limiter.test("foo")
        assert await limiter.hit("foo")
        assert await limiter.clear("foo") is None
        assert await limiter.resets_in("foo") is None
        assert await limiter.get_window_stats("foo") == []
        assert limiters.metrics.calls == [
            (ERROR_METRIC, [f"call:{name}"])
            for name in ("test", "hit", "clear", "resets_in", "get_window_stats")]
    finally:
        limiters.client.close()


async def test_redis_down_fails_open(warehouse: Callable[..., Any]) -> None:
    """A sidecar whose Redis is down answers degraded: the limiter allows and counts errors."""
    dead = Settings(redis_url=f"redis://127.0.0.1:{free_port()}", ip_salt=SALT,
                    redis_timeout_ms=200)
    limiters = await warehouse(limiters_config({"foo": "1 per minute"}), app_settings=dead)
    limiter = limiters("foo")
    assert await limiter.hit("foo") and await limiter.hit("foo")
    assert await limiter.resets_in("foo") is None
    assert await limiter.get_window_stats("foo") == []
    assert [tags for _, tags in limiters.metrics.calls] == [
        ["call:hit"], ["call:hit"], ["call:resets_in"], ["call:get_window_stats"]]


async def test_an_unknown_name_fails_open(warehouse: Callable[..., Any]) -> None:
    """A limiter whose name the sidecar's config lacks allows, and says why in the metrics."""
    limiters = await warehouse(limiters_config({"foo": "1 per minute"}))
    assert await limiters("bar").hit("x")
    assert await limiters().hit()  # no identifier names an action
    assert limiters.metrics.calls == [(ERROR_METRIC, ["call:hit"])] * 2


class Registry(dict[str, Any]):
    """Pyramid's registry, as far as the factory reads it."""


class Request:
    """Pyramid's request, as far as the factory reads it."""

    def __init__(self, client: SyncClient, metrics: Recorder) -> None:
        self.registry = Registry({"ratelimiter.storage": client})
        self.metrics = metrics
        self.found: list[tuple[object, object]] = []

    def find_service(self, iface: object, context: object = "unset") -> Recorder:
        self.found.append((iface, context))
        return self.metrics


def test_the_factory_stands_where_warehouses_does() -> None:
    """RateLimit(limit, identifiers=[name]) called with (context, request) makes a limiter
    over the registry's client with the metrics service; it compares and shows as
    Warehouse's does; and RateLimiter is built as Warehouse's factory builds its
    limiter_class."""
    client = SyncClient(f"http://127.0.0.1:{free_port()}")
    metrics = Recorder()
    request = Request(client, metrics)
    iface = object()
    factory = RateLimit("10 per 5 minutes", identifiers=["user.login"], metrics_service=iface)
    limiter = factory(object(), request)
    assert isinstance(limiter, RateLimiter)
    assert limiter.client is client and limiter.metrics is metrics
    assert (limiter.limit, limiter.identifiers) == ("10 per 5 minutes", ["user.login"])
    assert request.found == [(iface, None)]
    # Warehouse's own RateLimit builds its limiter_class with these keywords
    built = RateLimiter(client, limit="5 per day", identifiers=["password.reset"],
                        metrics=metrics)
    assert (built.client, built.limit, built.identifiers, built.metrics) == (
        client, "5 per day", ["password.reset"], metrics)
    assert factory == RateLimit("10 per 5 minutes", identifiers=["user.login"])
    assert factory != RateLimit("10 per 5 minutes", identifiers=["ip.login"])
    assert factory != object()
    assert repr(RateLimit("one per hour")) == (
        'RateLimit("one per hour", identifiers=None, '
        "limiter_class=<class 'ratekeeper.integrations.warehouse.RateLimiter'>)")
    client.close()

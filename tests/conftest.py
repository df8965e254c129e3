"""Shared fixtures: a real redis-server per session, a unique key prefix per test."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster

from ratekeeper.app import create_app
from ratekeeper.config.rules import Config
from ratekeeper.settings import Settings
from ratekeeper.storage.store import CLUSTER_MAX_CONNECTIONS, open_store

sys.path.insert(0, str(Path(__file__).parent))

from support.common import SALT, TEST_DEADLINE_MS, FakeClock, close_opened, config_from
from support.processes import ServerProcess
from support.redis_servers import (
    ClusterServers,
    RedisServer,
    start_cluster,
    start_redis,
)

# the browser tests' Chromium fixtures (playwright, browser, context)
pytest_plugins = ["support.browser"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session, on a free loopback port."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def lone_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it may be paused, stopped, restarted or have its
    clients killed (debug commands allowed, for DEBUG SLEEP)."""
    server = start_redis(extra=("--enable-debug-command", "local"))
    yield server
    if server.process.poll() is None:
        server.resume()
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServers]:
    """A real 3-master Redis Cluster for the whole session, started when a test first needs it."""
    cluster = start_cluster(3)
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_client(redis_cluster: ClusterServers) -> AsyncIterator[RedisCluster]:
    """A cluster client of the session's cluster."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port,
                          max_connections=CLUSTER_MAX_CONNECTIONS)
    await client.initialize()
    yield client
    await client.aclose()


# One row per Redis topology the Redis-backed tests run against, as the limits library's tests
# do it: the id, and the fixture that gives a client of it.
STORES = {"redis": "redis", "cluster": "cluster_client"}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> Any:
    """A client of each topology in turn: the session's redis-server, then the cluster."""
    return request.getfixturevalue(STORES[request.param])


@pytest.fixture
async def closes_opened() -> AsyncIterator[None]:
    """Closes what the test ``opened`` (``support.common``) when it ends."""
    yield
    await close_opened()


@pytest.fixture
def key_prefix() -> str:
    """A prefix no other test uses, so tests never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's redis-server, built the way the service builds its own."""
    store = open_store(Settings(redis_url=redis_server.url, ip_salt=SALT))
    yield store.redis
    await store.close()


@pytest.fixture
def clock() -> FakeClock:
    """An injected clock for the Lua scripts (ARGV now_ms) instead of Redis TIME."""
    return FakeClock()


@pytest.fixture
def settings(redis_server: RedisServer, key_prefix: str) -> Settings:
    """Settings pointing at the session's Redis with this test's prefix.

    The deadline is generous: on a loaded 2-core CI box the 50 ms default can pass from CPU lag
    alone and turn a check into a fail-mode answer; tests about deadlines set their own.
    """
    return Settings(redis_url=redis_server.url, ip_salt=SALT, key_prefix=key_prefix,
                    redis_timeout_ms=TEST_DEADLINE_MS)


@pytest.fixture
def make_client(aiohttp_client: Callable[..., Any], settings: Settings
                ) -> Callable[..., Any]:
    """Start the app for a config (TOML text or Config) and return a test client."""

    async def factory(config: str | Config, *, clock: Callable[[], int] | None = None,
                      app_settings: Settings | None = None) -> TestClient[Any, Any]:
        cfg = config_from(config) if isinstance(config, str) else config
        app: web.Application = create_app(app_settings or settings, cfg, clock=clock)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `ratekeeper serve` subprocesses; all are stopped after the test."""
    started: list[ServerProcess] = []

    def factory(config_text: str, env: dict[str, str], workers: int = 1) -> ServerProcess:
        path = tmp_path / f"config-{len(started)}.toml"
        path.write_text(config_text)
        server = ServerProcess(path, env, workers)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()

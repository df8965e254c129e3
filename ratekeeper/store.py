"""Where counts live: a Redis client built from RATEKEEPER_REDIS_URL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import SettingsError
from .settings import Settings

__all__ = ["Store", "open_store"]

log = logging.getLogger("ratekeeper.store")

MAX_CONNECTIONS = 64  # per process


@dataclass(slots=True)
class Store:
    """A connected Redis (or the embedded fakeredis) and what kind it is."""

    redis: Any
    kind: str  # "memory", "redis", "cluster" or "sentinel"

    async def close(self) -> None:
        """Close every connection."""
        await self.redis.aclose()

    async def ping(self) -> bool:
        """True when the store answers."""
        return bool(await self.redis.ping())


def open_store(settings: Settings) -> Store:
    """Build the client for ``settings.redis_url``; connecting happens on first use."""
    url = settings.redis_url
    timeout = settings.redis_timeout_ms / 1000
    if url.startswith("memory://"):
        import fakeredis

        return Store(redis=fakeredis.FakeAsyncRedis(), kind="memory")
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        parts = urlsplit(url)
        nodes = [_host_port(item, 6379) for item in parts.netloc.rpartition("@")[2].split(",")]
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            password=parts.password,
            username=parts.username or None,
            socket_timeout=max(timeout, 0.5),
            socket_connect_timeout=max(timeout, 0.5),
        )
        return Store(redis=client, kind="cluster")
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(url)
        service = parts.path.strip("/")
        if not service:
            raise SettingsError("RATEKEEPER_REDIS_URL: redis+sentinel:// needs /service_name")
        hosts = [_host_port(item, 26379) for item in parts.netloc.rpartition("@")[2].split(",")]
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            socket_timeout=max(timeout, 0.5),
            sentinel_kwargs={"socket_timeout": max(timeout, 0.5)},
            password=parts.password,
        )
        return Store(redis=sentinel.master_for(service), kind="sentinel")
    from redis.asyncio import BlockingConnectionPool, Redis

    # A bounded pool that queues: a burst waits for a connection (within the call's
    # deadline) instead of failing with MaxConnectionsError or opening hundreds of sockets.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=max(timeout, 0.5),
        socket_timeout=max(timeout, 0.5), socket_connect_timeout=max(timeout, 0.5))
    return Store(redis=Redis.from_pool(pool), kind="redis")  # the client owns and closes the pool


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep:
        return item.strip(), default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise SettingsError(f"RATEKEEPER_REDIS_URL: bad port in '{item}'") from None

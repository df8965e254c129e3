"""Where counts live: a Redis client built from RATEKEEPER_REDIS_URL.

The deadline of a call is the limiter's (``coalescer.within``, covering connect and call); the
socket timeouts here are only a backstop, set later than the deadline so that a client-level
retry (redis-py retries timeouts) can never replay a script we have stopped waiting for.
The coalesced checks have a client of their own without one (``Store.checks``): their
deadline is the coalescer's (``coalescer.within``, which has a backstop of its own), and
under a socket timeout redis-py gives every write a task and every read a timeout scope.
It is passed explicitly (``socket_timeout=None``): redis-py 8 gives a client made without
one five seconds.
A broken connection is retried once, at once: after a Redis restart every pooled connection
is dead, and the first call on each would otherwise fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ratekeeper.errors import SettingsError
from ratekeeper.settings import Settings

__all__ = ["Store", "open_store"]

log = logging.getLogger("ratekeeper.storage.store")

MAX_CONNECTIONS = 64  # per process, to one Redis (a blocking pool: more calls queue)
NODE_MAX_CONNECTIONS = 8  # per process, to one Cluster node, for its coalesced checks
CHECK_CONNECTIONS = 8  # per process, for the coalesced checks (it keeps MAX_INFLIGHT)


@dataclass(slots=True)
class Store:
    """A connected Redis (or the embedded fakeredis) and what kind it is."""

    redis: Any
    kind: str  # "memory", "redis", "cluster" or "sentinel"
    # clients opened besides ``redis``: a Sentinel's, which it asks for the master
    others: tuple[Any, ...] = ()
    # on a Cluster: a plain client of one node (host, port), with the cluster's credentials,
    # without a socket timeout, for the checks the limiter coalesces per node
    node_client: Callable[[str, int], Any] | None = None
    # the same Redis, without a socket timeout, for the coalesced checks (None: ``redis``)
    checks: Any = None

    async def close(self) -> None:
        """Close every connection."""
        await self.redis.aclose()
        if self.checks is not None:
            await self.checks.aclose()
        for client in self.others:
            await client.aclose()

    async def ping(self) -> bool:
        """True when the store answers."""
        return bool(await self.redis.ping())


BACKSTOP_SLACK = 1.0  # seconds the socket timeouts add to the deadline
# The cluster's and Sentinel's pools cannot queue: redis-py fails a call at once
# (MaxConnectionsError) past 100 connections (per node on a cluster), and the cluster client
# then even resets the node's connections under the calls still using them. The limiter never
# has more than limiter.MAX_IN_FLIGHT calls out, so pools this large are never exhausted.
POOL_SIZE = 4096
CLUSTER_MAX_CONNECTIONS = POOL_SIZE


def _retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def open_store(settings: Settings) -> Store:
    """Build the client for ``settings.redis_url``; connecting happens on first use."""
    url = settings.redis_url
    backstop = settings.redis_timeout_ms / 1000 + BACKSTOP_SLACK
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
            socket_timeout=backstop,
            socket_connect_timeout=backstop,
            retry=_cluster_retry(),
            max_connections=CLUSTER_MAX_CONNECTIONS,
        )
        def node_client(host: str, port: int) -> Any:
            from redis.asyncio import BlockingConnectionPool, Redis

            pool = BlockingConnectionPool(
                host=host, port=port, password=parts.password,
                username=parts.username or None, max_connections=NODE_MAX_CONNECTIONS,
                timeout=backstop, socket_timeout=None, socket_connect_timeout=backstop,
                retry=_retry())
            return Redis.from_pool(pool)

        return Store(redis=client, kind="cluster", node_client=node_client)
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(url)
        service = parts.path.strip("/")
        if not service:
            raise SettingsError("RATEKEEPER_REDIS_URL: redis+sentinel:// needs /service_name")
        hosts = [_host_port(item, 26379) for item in parts.netloc.rpartition("@")[2].split(",")]
        sentinel = Sentinel(
            hosts,
            socket_timeout=backstop,
            socket_connect_timeout=backstop,
            sentinel_kwargs={"socket_timeout": backstop, "socket_connect_timeout": backstop},
            password=parts.password,
        )
        master = sentinel.master_for(service, retry=_retry(), max_connections=POOL_SIZE)
        checks = sentinel.master_for(service, retry=_retry(), max_connections=CHECK_CONNECTIONS,
                                     socket_timeout=None)
        return Store(redis=master, kind="sentinel", others=tuple(sentinel.sentinels),
                     checks=checks)
    from redis.asyncio import BlockingConnectionPool, Redis

    # A bounded pool that queues: a burst waits for a connection (within the call's
    # deadline) instead of failing with MaxConnectionsError or opening hundreds of sockets.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=backstop, socket_timeout=backstop,
        socket_connect_timeout=backstop, retry=_retry())
    checks = BlockingConnectionPool.from_url(
        url, max_connections=CHECK_CONNECTIONS, timeout=backstop, socket_timeout=None,
        socket_connect_timeout=backstop, retry=_retry())
    # (each client owns and closes its pool)
    return Store(redis=Redis.from_pool(pool), kind="redis", checks=Redis.from_pool(checks))


def _cluster_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # the cluster client retries to follow a changed topology (MOVED, a failed node); no
    # backoff, the deadline bounds it anyway
    return Retry(NoBackoff(), 2)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep:
        return item.strip(), default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise SettingsError(f"RATEKEEPER_REDIS_URL: bad port in '{item}'") from None

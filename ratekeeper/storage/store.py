"""Where counts live: a Redis client built from RATEKEEPER_REDIS_URL.

The deadline of a call is the limiter's (``coalescer.within``, covering connect and call); the
socket timeouts here are only a backstop, set later than the deadline so that a client-level
retry (redis-py retries timeouts) can never replay a script we have stopped waiting for.
A broken connection is retried once, at once: after a Redis restart every pooled connection
is dead, and the first call on each would otherwise fail.

The coalesced checks do not go through this client: they have a connection of their own
(``pipe.Pipe``) to where it connects (``pipe.locate_for``; a Cluster node's, ``node_locate``).
The embedded store (``memory://``) is fakeredis in this process, and fakeredis's own server
serves it on a Unix socket for those checks, so that they speak to it as to a Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ratekeeper.errors import SettingsError
from ratekeeper.settings import Settings
from ratekeeper.storage.pipe import Endpoint, Locate, fixed

__all__ = ["Store", "open_store"]

log = logging.getLogger("ratekeeper.storage.store")

MAX_CONNECTIONS = 64  # per process, to one Redis (a blocking pool: more calls queue)


@dataclass(slots=True)
class Store:
    """A connected Redis (or the embedded fakeredis) and what kind it is."""

    redis: Any
    kind: str  # "memory", "redis", "cluster" or "sentinel"
    # clients opened besides ``redis``: a Sentinel's, which it asks for the master
    others: tuple[Any, ...] = ()
    # where the coalesced checks connect (None: where ``redis`` does, ``pipe.locate_for``)
    checks: Locate | None = None
    # called once all is closed (the embedded store's server stops: it blocks a moment)
    stop: Callable[[], None] | None = None

    async def close(self) -> None:
        """Close every connection."""
        await self.redis.aclose()
        for client in self.others:
            await client.aclose()
        if self.stop is not None:
            await asyncio.to_thread(self.stop)

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
        return _embedded()
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
        return Store(redis=client, kind="cluster")
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
        return Store(redis=master, kind="sentinel", others=tuple(sentinel.sentinels))
    from redis.asyncio import BlockingConnectionPool, Redis

    # A bounded pool that queues: a burst waits for a connection (within the call's
    # deadline) instead of failing with MaxConnectionsError or opening hundreds of sockets.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=backstop, socket_timeout=backstop,
        socket_connect_timeout=backstop, retry=_retry())
    # (the client owns and closes its pool)
    return Store(redis=Redis.from_pool(pool), kind="redis")


def _embedded() -> Store:
    """fakeredis in this process, also served to the coalesced checks on a Unix socket in a
    directory only this user may enter (the store holds admin sessions; fakeredis checks no
    password)."""
    import fakeredis

    class Server(fakeredis.TcpFakeServer):
        address_family = socket.AF_UNIX
        peers = itertools.count(1)

        def get_request(self) -> Any:
            connection, _ = super().get_request()
            # a Unix socket's peers have no address: each gets a name of its own
            return connection, ("memory", next(self.peers))

    directory = tempfile.mkdtemp(prefix="ratekeeper-memory-")  # (mode 0700)
    path = os.path.join(directory, "store.sock")
    try:
        server = Server(path)  # type: ignore[arg-type]  # (typed for TCP: an address is a pair)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    server.daemon_threads = True  # (a connection left open never holds up the exit)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     name="ratekeeper-memory-store", daemon=True).start()
    def stop() -> None:
        server.shutdown()
        server.server_close()
        shutil.rmtree(directory, ignore_errors=True)

    return Store(redis=fakeredis.FakeAsyncRedis(server=server.fake_server), kind="memory",
                 checks=fixed(Endpoint(path=path)), stop=stop)


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

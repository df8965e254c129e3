"""Load slows answers and never admits: a burst of new connections against a freshly started
2-worker server, and large batches beside a paced abuser, are decided by Redis (exactly the
limit admitted, nothing degraded), on one Redis and on a 3-master Cluster.

The test process raises its open-file limit (to 4,000 where the hard limit allows; the
server processes inherit it): a burst holds 1,000 sockets on each side at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.overload import (
    BATCH_LIMIT,
    BATCH_SIZE,
    BATCHES,
    BURST,
    BURST_LIMIT,
    OVERLOAD_RULES,
    PACED_LIMIT,
    ReadyServer,
    Tally,
    batches_beside_abuser,
    burst,
    overload_env,
    raise_fd_limit,
)
from support.redis_servers import ClusterServers, RedisServer

pytestmark = pytest.mark.slow

RUNS = 5


@pytest.fixture(autouse=True)
def fd_limit() -> None:
    """Room for a burst's sockets, in this process and the servers it starts."""
    raise_fd_limit()


@pytest.fixture(params=["redis", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The session's single redis-server, then its 3-master Cluster."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    cluster: ClusterServers = request.getfixturevalue("redis_cluster")
    return cluster.url


@pytest.fixture
def fresh_server(tmp_path: Path, redis_url: str, key_prefix: str
                 ) -> Iterator[Callable[[], ReadyServer]]:
    """Start a 2-worker `ratekeeper serve` on ``redis_url``, returned once /readyz says 200."""
    started: list[ReadyServer] = []

    def start() -> ReadyServer:
        config = tmp_path / "overload.toml"
        config.write_text(OVERLOAD_RULES)
        server = ReadyServer(config, overload_env(redis_url, key_prefix), workers=2)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def test_bursts_of_new_connections_admit_exactly_the_limit(
        fresh_server: Callable[[], ReadyServer]) -> None:
    """Five bursts of 1,000 concurrent new connections, one check each for one IP under 50
    per minute, the first the moment a fresh server is ready: each admits exactly 50 and no
    answer is degraded or missing."""
    server = fresh_server()
    tallies = [await burst(server.url, f"203.0.113.{run + 1}") for run in range(RUNS)]
    assert tallies == [Tally(allowed=BURST_LIMIT, denied=BURST - BURST_LIMIT)] * RUNS


async def test_large_batches_beside_an_abuser_admit_exactly_the_limits(
        fresh_server: Callable[[], ReadyServer]) -> None:
    """Eight concurrent batches of 1,000 checks, each for one fresh ip+user under 3 per
    minute, sent the moment a fresh server is ready: each admits exactly 3; an abuser
    checking every 10 ms beside them under 5 per minute gets exactly 5; nothing degraded."""
    server = fresh_server()
    tallies, abuser = await batches_beside_abuser(server.url, run=1)
    assert tallies == [Tally(allowed=BATCH_LIMIT, denied=BATCH_SIZE - BATCH_LIMIT)] * BATCHES
    assert (abuser.allowed, abuser.degraded, abuser.errors) == (PACED_LIMIT, 0, 0), abuser

"""The places loadtest/chaos.py makes faults happen, and the faults.

A stage is a topology (one Redis with AOF on; a Sentinel-managed master and replica; a Cluster
of three masters with a replica each) and a 2-worker `ratekeeper serve` on it. A fault is a
coroutine that does something to the stage and returns when it ended (``time.monotonic()``)
and a line saying what it did; meanwhile the load keeps running on the event loop, so anything
that blocks runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.overload import ReadyServer  # noqa: E402
from support.redis_servers import (  # noqa: E402
    ClusterServers,
    RedisServer,
    SentinelServers,
    free_ports,
    start_redis,
    start_sentinel,
)

__all__ = ["ORDER", "STAGES", "Fault", "Stage"]

PAUSE = 2.0  # redis-pause: seconds stopped
DOWN = 1.0  # redis-restart: seconds dead
STEADY = 5.0  # steady: seconds of load standing in for a fault
SLOT_GROUP, SLOT_HOLD = 128, 0.15  # cluster-reshard: slots migrating at once, and for how long


@dataclass
class Stage:
    """A topology and the server on it."""

    server: ReadyServer
    redis: RedisServer | None = None
    sentinel: SentinelServers | None = None
    cluster: ClusterServers | None = None
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    # the slots a fault took away with a dead node (cluster-failover), for the table's split
    lost_slots: frozenset[int] = frozenset()
    salt: bytes = b""  # the server's RATEKEEPER_IP_SALT, to tell a subject's slot

    def log_lines(self, pattern: str) -> list[str]:
        """What ``pattern`` (a regex, its first group if it has one) matches in the log."""
        return re.findall(pattern, self.server.log.read_text())


def start_server(url: str, rules: str, env: dict[str, str]) -> ReadyServer:
    """A 2-worker `ratekeeper serve` of ``rules`` on ``url``, once both workers serve."""
    config = Path(tempfile.mkdtemp(prefix="rk-chaos-")) / "chaos.toml"
    config.write_text(rules)
    server = ReadyServer(config, {**env, "RATEKEEPER_REDIS_URL": url}, workers=2)
    wait_until(lambda: "2 workers serving" in server.log.read_text(), 30, "both workers")
    return server


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def node(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)


def command(client: redis.Redis, *args: Any) -> Any:
    """One command by name (CLUSTER SETSLOT, MIGRATE, ... have no typed method)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def start_replicated_cluster(masters: int = 3) -> ClusterServers:
    """``masters`` masters with a replica each, cluster-enabled servers we started."""
    ports = free_ports(4 * masters)
    nodes: list[RedisServer] = []
    try:
        for port, bus in zip(ports[:2 * masters], ports[2 * masters:], strict=True):
            nodes.append(start_redis(port=port, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", "2000",
                # the masters that are up go on serving their slots while a failed
                # master's replica takes over (docs/operations.md, Redis Cluster)
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0")))
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       capture_output=True, text=True, timeout=30, check=True)
        wait_until(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes)
                   and all("master_link_status:up" in n.cli("INFO", "replication")
                           for n in nodes if n.cli("ROLE").startswith("slave")),
                   30, "cluster with replicas")
    except BaseException:
        for server in nodes:
            server.stop()
        raise
    return ClusterServers(nodes)


def masters_of(cluster: ClusterServers) -> list[RedisServer]:
    """The cluster's live masters that serve slots, by port."""
    live = [n for n in cluster.nodes if n.process.poll() is None]
    return [n for n in live if n.cli("ROLE").startswith("master") and slots_of(n)]


def slots_of(server: RedisServer) -> list[int]:
    """The slots ``server`` serves, as it says itself."""
    client = node(server)
    me = command(client, "CLUSTER", "MYID")
    owned: list[int] = []
    for entry in command(client, "CLUSTER", "SLOTS"):
        low, high, master = entry[0], entry[1], entry[2]
        if master[2] == me:
            owned += range(low, high + 1)
    return owned


def move_slots(cluster: ClusterServers, source: RedisServer, target: RedisServer,
               slots: list[int]) -> int:
    """Reshard ``slots`` from ``source`` to ``target`` as redis-cli does, keys and all; how
    many keys moved. SLOT_GROUP slots at a time stay migrating for SLOT_HOLD s once their
    keys have moved, as slots holding many keys would: meanwhile a key already moved is an
    ASK, a script whose keys are split a TRYAGAIN, and after it a stale slot map a MOVED."""
    src, dst = node(source), node(target)
    src_id = command(src, "CLUSTER", "MYID")
    dst_id = command(dst, "CLUSTER", "MYID")
    others = [node(n) for n in masters_of(cluster) if n not in (source, target)]
    moved = 0
    for start in range(0, len(slots), SLOT_GROUP):
        group = slots[start:start + SLOT_GROUP]
        for slot in group:
            command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        for slot in group:
            while keys := command(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
                command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
        time.sleep(SLOT_HOLD)
        for slot in group:
            # keys written on the source while it was held (to a key it still had) go too
            while keys := command(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
                command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for client in (dst, src, *others):
                command(client, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return moved


def redirections(cluster: ClusterServers) -> Counter[str]:
    """MOVED, ASK and TRYAGAIN replies the live nodes have sent so far (INFO errorstats)."""
    counts: Counter[str] = Counter()
    for server in cluster.nodes:
        if server.process.poll() is None:
            for name, stats in node(server).info("errorstats").items():
                kind = name.removeprefix("errorstat_")
                if kind in ("MOVED", "ASK", "TRYAGAIN"):
                    counts[kind] += int(stats["count"])
    return counts


# -- the faults ----------------------------------------------------------------------------

Fault = Callable[[Stage], Awaitable[tuple[float, str]]]


async def steady(stage: Stage) -> tuple[float, str]:
    await asyncio.sleep(STEADY)
    return time.monotonic(), f"{STEADY:g} s of load alone"


async def redis_pause(stage: Stage) -> tuple[float, str]:
    assert stage.redis is not None
    stage.redis.pause()
    try:
        await asyncio.sleep(PAUSE)
    finally:
        stage.redis.resume()
    return time.monotonic(), f"SIGSTOP, {PAUSE:g} s, SIGCONT"


async def redis_restart(stage: Stage) -> tuple[float, str]:
    assert stage.redis is not None
    keys = stage.redis.cli("DBSIZE")
    stage.redis.kill()
    await asyncio.sleep(DOWN)
    await asyncio.to_thread(stage.redis.restart)  # on the same port, from its AOF file
    return time.monotonic(), (f"SIGKILL, {DOWN:g} s down; keys before {keys}, "
                              f"right after the restart {stage.redis.cli('DBSIZE')}")


def serving_workers(stage: Stage) -> list[int]:
    gone = {int(p) for p in stage.log_lines(r"worker pid (\d+) (?:stopped|exited)")}
    return [int(p) for p in stage.log_lines(r"worker pid (\d+) serving") if int(p) not in gone]


async def worker_kill(stage: Stage) -> tuple[float, str]:
    before = serving_workers(stage)
    os.kill(before[0], signal.SIGKILL)
    await asyncio.to_thread(wait_until, lambda: any(
        p not in before for p in serving_workers(stage)), 30, "a worker in place of the killed")
    return time.monotonic(), f"SIGKILL to 1 of {len(before)} workers, until another serves"


async def rolling_restart(stage: Stage) -> tuple[float, str]:
    done = len(stage.log_lines("rolling restart done"))
    stage.server.process.send_signal(signal.SIGUSR2)
    await asyncio.to_thread(wait_until, lambda: len(stage.log_lines("rolling restart done"))
                            > done, 60, "the rolling restart")
    replaced = len(stage.log_lines(r"rolling restart: worker pid \d+ replaces"))
    return time.monotonic(), f"SIGUSR2 until 'rolling restart done' ({replaced} replaced)"


async def sentinel_failover(stage: Stage) -> tuple[float, str]:
    sentinel = stage.sentinel
    assert sentinel is not None
    await asyncio.to_thread(sentinel.wait_replicated)
    old = sentinel.master_port()
    reply = await asyncio.to_thread(sentinel.cli, "failover")
    if reply != "OK":
        raise RuntimeError(f"SENTINEL FAILOVER: {reply}")
    new = next(s for s in (sentinel.master, sentinel.replica) if s.port != old)
    await asyncio.to_thread(wait_until, lambda: sentinel.master_port() == new.port
                            and new.cli("ROLE").startswith("master"), 30, "the failover")
    return time.monotonic(), "until the sentinel names the replica and it is master"


async def cluster_reshard(stage: Stage) -> tuple[float, str]:
    cluster = stage.cluster
    assert cluster is not None
    source, target = masters_of(cluster)[:2]
    owned = slots_of(source)
    before = redirections(cluster)
    moved = await asyncio.to_thread(move_slots, cluster, source, target,
                                    owned[:len(owned) // 2])
    seen = redirections(cluster) - before
    return time.monotonic(), (f"{len(owned) // 2} slots, {moved} keys moved; replies "
                              + ", ".join(f"{k} {seen[k]}" for k in ("MOVED", "ASK", "TRYAGAIN")))


async def cluster_failover(stage: Stage) -> tuple[float, str]:
    cluster = stage.cluster
    assert cluster is not None
    victim = max(masters_of(cluster), key=lambda n: len(slots_of(n)))
    slots = slots_of(victim)
    stage.lost_slots = frozenset(slots)
    replica = next(n for n in cluster.nodes if n is not victim and n.process.poll() is None
                   and n.cli("ROLE").split()[1:3] == ["127.0.0.1", str(victim.port)])
    victim.kill()
    live = [n for n in cluster.nodes if n.process.poll() is None]
    await asyncio.to_thread(wait_until, lambda: replica.cli("ROLE").startswith("master")
                            and all("cluster_state:ok" in n.cli("CLUSTER", "INFO")
                                    for n in live), 60, "the replica's promotion")
    return time.monotonic(), (f"SIGKILL to the master of {len(slots)} slots, until its "
                              "replica is promoted and every node says cluster_state:ok")


# -- the run -------------------------------------------------------------------------------

SINGLE: dict[str, Fault] = {
    "steady": steady, "redis-pause": redis_pause, "redis-restart": redis_restart,
    "worker-kill": worker_kill, "rolling-restart": rolling_restart}
SENTINEL: dict[str, Fault] = {"sentinel-failover": sentinel_failover}
CLUSTER: dict[str, Fault] = {"cluster-reshard": cluster_reshard,
                             "cluster-failover": cluster_failover}
ORDER = [*SINGLE, *SENTINEL, *CLUSTER]


def on(redis_url: str, stop: Callable[[], None], rules: str, env: dict[str, str]
       ) -> ReadyServer:
    """The server on a topology just started; the topology stopped if the server fails."""
    try:
        return start_server(redis_url, rules, env)
    except BaseException:
        stop()
        raise


def single_stage(rules: str, env: dict[str, str]) -> Stage:
    """One redis-server with AOF on (fsync every second, Redis's default)."""
    server = start_redis(extra=("--appendonly", "yes", "--appendfsync", "everysec"))
    return Stage(on(server.url, server.stop, rules, env), redis=server, stoppers=[server.stop])


def sentinel_stage(rules: str, env: dict[str, str]) -> Stage:
    """A master, its replica and a sentinel."""
    servers = start_sentinel()
    return Stage(on(servers.url, servers.stop, rules, env), sentinel=servers,
                 stoppers=[servers.stop])


def cluster_stage(rules: str, env: dict[str, str]) -> Stage:
    """Three masters with a replica each."""
    cluster = start_replicated_cluster()
    return Stage(on(cluster.url, cluster.stop, rules, env), cluster=cluster,
                 stoppers=[cluster.stop])


# each stage builder, and the faults run on it in this order
STAGES: list[tuple[Callable[[str, dict[str, str]], Stage], dict[str, Fault]]] = [
    (single_stage, SINGLE), (sentinel_stage, SENTINEL), (cluster_stage, CLUSTER)]

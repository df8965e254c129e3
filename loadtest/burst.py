"""Load against a fresh server, run by run: what tests/test_overload.py asserts, as counts.

For single Redis and a 3-master Cluster in turn: a fresh 2-worker `ratekeeper serve`, taken as
started the moment /readyz first says 200, then

- burst: 1,000 checks for one IP under 50 per minute, each on a new connection, all at once
  (the first run on the fresh server, every run a fresh IP);
- batches: eight concurrent /v1/check/batch calls of 1,000 checks, each for one fresh ip+user
  under 3 per minute, beside an abuser checking every 10 ms under 5 per minute.

Prints allowed, degraded, denied and errors per run; what should be seen is exactly the limit
allowed, nothing degraded, no errors. Figures, never a pass/fail.

    .venv/bin/python loadtest/burst.py [--runs 5] [--only redis|cluster]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.overload import (  # noqa: E402
    BATCH_LIMIT,
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
from support.redis_servers import start_cluster, start_redis  # noqa: E402


def fresh_server(redis_url: str) -> ReadyServer:
    """A 2-worker server on ``redis_url`` with a key prefix of its own."""
    config = Path(tempfile.mkdtemp(prefix="rk-burst-")) / "overload.toml"
    config.write_text(OVERLOAD_RULES)
    return ReadyServer(config, overload_env(redis_url, "b" + uuid.uuid4().hex[:10]), workers=2)


async def bursts(redis_url: str, runs: int) -> None:
    server = fresh_server(redis_url)
    try:
        for run in range(runs):
            tally = await burst(server.url, f"203.0.113.{run + 1}")
            print(f"  burst {run + 1}    {tally}", flush=True)
    finally:
        server.stop()


async def batches(redis_url: str, runs: int) -> None:
    server = fresh_server(redis_url)
    try:
        for run in range(runs):
            tallies, abuser = await batches_beside_abuser(server.url, run=run + 1)
            print(f"  batches {run + 1}  {sum(tallies, Tally())}  (each: "
                  + " ".join(str(t.allowed) for t in tallies) + " allowed)", flush=True)
            print(f"  abuser {run + 1}   {abuser}", flush=True)
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("redis", "cluster"))
    args = parser.parse_args()
    raise_fd_limit()
    print(f"burst: {BURST} new connections, one IP, limit {BURST_LIMIT}; batches: {BATCHES} x "
          f"1000 checks, limit {BATCH_LIMIT} each (should total {BATCHES * BATCH_LIMIT}); "
          f"abuser: a check every 10 ms, limit {PACED_LIMIT}")
    if args.only in (None, "redis"):
        redis = start_redis()
        try:
            print("single Redis", flush=True)
            await bursts(redis.url, args.runs)
            await batches(redis.url, args.runs)
        finally:
            redis.stop()
    if args.only in (None, "cluster"):
        cluster = start_cluster(3)
        try:
            print("3-master Cluster", flush=True)
            await bursts(cluster.url, args.runs)
            await batches(cluster.url, args.runs)
        finally:
            cluster.stop()


if __name__ == "__main__":
    uvloop.run(main())

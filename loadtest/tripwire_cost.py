"""What five armed tripwires cost /v1/check: the same config with and without them, A/B.

Starts one redis-server and two `ratekeeper serve` (the bench's config, loadtest/bench.toml,
with one flag added; one of them also with five tripwires on the action wrk checks, whose
thresholds are never reached, so every check is decided as usual), then drives each with wrk
in alternating rounds (a drift in the machine's speed then weighs on both alike) and prints
their decisions per second and the ratio. Figures, never a pass/fail; the target is a ratio
of at least 0.95. `make bench` runs it too (``measure``), in fewer rounds.

    .venv/bin/python loadtest/tripwire_cost.py [--workers 1] [--rounds 6] [--seconds 4]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import HERE, Server, run_wrk, start_ratekeeper, start_redis

POOL = 100_000  # client addresses wrk draws from (as the bench's)
FLAG = """
[flags.bench-off]
description = "What the bench's tripwires would turn on (they never reach their threshold)"
"""
WIRE = """
[tripwires.bench-{n}]
action = "check"
count = "{count}"
threshold = "1000000000 per {window}"
flag = "bench-off"
duration = "1 hour"
"""
WIRES = [("allowed", "10 minutes"), ("denied", "minute"), ("all", "hour"),
         ("allowed", "minute"), ("all", "10 minutes")]


def configs(directory: Path) -> tuple[Path, Path]:
    """The bench's config with the flag, and the same with five tripwires."""
    base = (HERE / "bench.toml").read_text() + FLAG
    plain, wired = directory / "plain.toml", directory / "wired.toml"
    plain.write_text(base)
    wired.write_text(base + "".join(WIRE.format(n=n, count=count, window=window)
                                    for n, (count, window) in enumerate(WIRES, 1)))
    return plain, wired


def rate(server: Server, seconds: float, connections: int, threads: int) -> dict[str, Any]:
    """One wrk run of single checks."""
    return run_wrk(server.url + "/v1/check", seconds=seconds, connections=connections,
                   threads=threads, script_args=["single", str(POOL)])


def measure(*, workers: int, rounds: int, seconds: float, connections: int, threads: int,
            report: Callable[[str], None] = print) -> dict[str, Any]:
    """Both servers, in alternating rounds: decisions per second without and with the five
    tripwires, their ratio, and each round's ratio."""
    salt = secrets.token_urlsafe(32)
    stops = []
    try:
        redis_server = start_redis()
        stops.append(redis_server.stop)
        plain_path, wired_path = configs(Path(tempfile.mkdtemp(prefix="rk-tripwires-")))
        plain = start_ratekeeper(plain_path, redis_server.url, workers, salt=salt,
                                 prefix="plain")
        stops.append(plain.stop)
        wired = start_ratekeeper(wired_path, redis_server.url, workers, salt=salt,
                                 prefix="wired")
        stops.append(wired.stop)
        rate(plain, 2, connections, threads)  # warm both up
        rate(wired, 2, connections, threads)
        totals = {"without": [0.0, 0.0], "with 5": [0.0, 0.0]}
        ratios = []
        for number in range(1, rounds + 1):
            runs = {}
            # each round starts with the other one, so neither always runs second
            order = [("without", plain), ("with 5", wired)]
            for label, server in order if number % 2 else reversed(order):
                result = rate(server, seconds, connections, threads)
                totals[label][0] += result["decisions"] - result["degraded"]
                totals[label][1] += result["duration_us"] / 1e6
                runs[label] = result["decided_per_s"]
                if result["errors"] or result["degraded"]:
                    report(f"  ({label}: {result['errors']} errors, {result['degraded']} "
                           "degraded answers)")
            ratios.append(runs["with 5"] / runs["without"])
            report(f"round {number}: without {runs['without']:,.0f}/s, with 5 tripwires "
                   f"{runs['with 5']:,.0f}/s, ratio {ratios[-1]:.3f}")
    finally:
        for stop in reversed(stops):
            stop()
    without = totals["without"][0] / totals["without"][1]
    with_wires = totals["with 5"][0] / totals["with 5"][1]
    return {"without": without, "with": with_wires, "ratio": with_wires / without,
            "rounds": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="workers of each server")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=4, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args(argv)
    figures = measure(workers=args.workers, rounds=args.rounds, seconds=args.seconds,
                      connections=args.connections, threads=args.threads)
    ratios = sorted(figures["rounds"])
    print(f"\n/v1/check decisions per second, {args.workers} worker(s), "
          f"{args.rounds} alternating rounds of {args.seconds:g} s:")
    print(f"  without tripwires     {figures['without']:12,.0f}")
    print(f"  with 5 tripwires      {figures['with']:12,.0f}")
    print(f"  ratio (target >= 0.95) {figures['ratio']:11.3f}   "
          f"(rounds: median {ratios[len(ratios) // 2]:.3f}, "
          f"range {ratios[0]:.3f} to {ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

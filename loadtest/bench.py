"""`make bench`: every benchmark figure in one run, as one table and as JSON.

Starts its own redis-server (free loopback port, no persistence), `ratekeeper serve` with N
workers, the bare aiohttp ceiling with N workers, wrk, the paced open-loop client and the
`limits` baseline; measures; stops everything. Figures, never assertions: a missed target
is reported, not failed on. Everything runs on this machine's loopback, so the ratios (not
the absolute rates) are what carry over to other machines. The ceiling, /v1/check and the
`limits` baseline (on a redis-server of its own) run in alternating rounds, so that a drift
in the machine's speed weighs on all of them alike, and `limits` counts as the median of its
rounds; an info row repeats the ceiling's comparison with one worker each. What each figure
means: loadtest/README.md.

    .venv/bin/python loadtest/bench.py [--workers 2] [--seconds 8] [--subjects 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
import uvloop

from ratekeeper.config.rules import Config, load_config
from ratekeeper.identity.keys import Keyspace

import paced
import redis_cost
import tripwire_cost
from baseline import run_limits
from procs import HERE, Server, http_json, run_wrk, start_ceiling, start_ratekeeper, start_redis

CONFIG = HERE / "bench.toml"
RESULTS = HERE / "results" / "bench.json"
POOL = 100_000  # random client IPs of the main scenarios
FLOOD_SUBJECTS = 300  # IPs sending 95% of the flood: half banned, half over their limit
FLOOD_PCT = 95
BATCH = 100  # checks per /v1/check/batch request
ROUNDS = 4  # the ceiling, /v1/check and limits alternate, each round --seconds / 2 long
ONE_WORKER_ROUNDS = 2  # the same with one worker each (an info row)
MAX_PER_CALL = 64  # decisions per check.lua call in the Redis CPU figure, at most
HOUR_LIMIT = 1000  # bench-ip's hour window; one request with this cost fills it


@dataclass
class Row:
    """One line of the table."""

    figure: str
    value: float | None
    unit: str
    ratio: float | None = None
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        value = "n/a" if self.value is None else _fmt(self.value) + (
            f" {self.unit}" if self.unit else "")
        ratio = "" if self.ratio is None else (
            f"{self.ratio:.3f}x" if self.ratio < 1 else f"{self.ratio:.2f}x")
        met = "" if self.met is None else ("yes" if self.met else "NO")
        return [self.figure, value, ratio, self.target, met]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = ["figure", "measured", "ratio", "target", "met"]
    cells = [header] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log(message: str) -> None:
    """Progress on stderr, so stdout is the table alone."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def merged_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """wrk's summaries of several runs of one scenario as one: counts and time add up, a
    latency figure is the worst run's."""
    merged = dict(runs[0])
    for run in runs[1:]:
        for field in ("requests", "duration_us", "bytes", "connect", "read", "write", "status",
                      "timeout", "decisions", "degraded", "allowed", "errors"):
            merged[field] += run[field]
        for field in ("p50_us", "p99_us", "mean_us", "max_us"):
            merged[field] = max(merged[field], run[field])
    seconds_run = merged["duration_us"] / 1e6
    merged["rps"] = merged["requests"] / seconds_run
    merged["decided_per_s"] = (merged["decisions"] - merged["degraded"]) / seconds_run
    merged["runs"] = len(runs)
    return merged


def flood_ip(j: int) -> str:
    """Flood subject j: pool IP POOL + j (the same numbering as wrk/check.lua)."""
    i = POOL + j
    return f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"


def prepare_flood(rk: Server, client: redis.Redis, config: Config, salt: bytes,
                  admin_token: str) -> dict[str, Any]:
    """Ban the first half of the flood subjects and push the second half over their limit."""
    keyspace = Keyspace(salt, prefix="rk", grouping=config.ip)
    banned_via = "admin API"
    half = FLOOD_SUBJECTS // 2
    for j in range(half):
        ip = flood_ip(j)
        status, _, _ = http_json(f"{rk.url}/v1/admin/bans",
                                 {"ip": ip, "duration": 3600, "reason": "bench flood"},
                                 headers={"Authorization": f"Bearer {admin_token}"})
        if status >= 300:
            # the admin API is not there yet: write the ban key the check script reads
            banned_via = "ban key (no admin API)"
            subject = keyspace.subject((("ip", keyspace.ip_value(ip)),))
            client.set(keyspace.ban_key(subject), b"bench", px=3_600_000)
    over = 0
    for j in range(half, FLOOD_SUBJECTS):
        ip = flood_ip(j)
        _, filled, _ = http_json(f"{rk.url}/v1/check",
                                 {"action": "check", "ip": ip, "cost": HOUR_LIMIT})
        _, probe, _ = http_json(f"{rk.url}/v1/check", {"action": "check", "ip": ip})
        over += bool(filled["allowed"]) and not probe["allowed"]
    return {"banned_via": banned_via, "banned": half, "over_limit": over,
            "hour_bucket": _hour_bucket(client)}


def _hour_bucket(client: redis.Redis) -> int:
    seconds, _ = client.time()
    return int(seconds) // 3600


async def _flood_verify(url: str, rounds: int) -> tuple[int, int, int]:
    """Every flood subject asks ``rounds`` times: answers allowed by a decision, answers
    allowed by a fail-open (degraded), answers."""
    allowed = failed_open = total = 0
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def ask(ip: str) -> None:
            nonlocal allowed, failed_open, total
            async with session.post(f"{url}/v1/check",
                                    json={"action": "check", "ip": ip}) as resp:
                body = await resp.json()
                total += 1
                if body.get("allowed"):
                    if body.get("degraded"):
                        failed_open += 1
                    else:
                        allowed += 1

        await asyncio.gather(*(ask(flood_ip(j)) for j in range(FLOOD_SUBJECTS)
                               for _ in range(rounds)))
    return allowed, failed_open, total


def measure(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    """Run every scenario; the table rows and the raw figures."""
    config = load_config(str(CONFIG))
    salt_text = secrets.token_urlsafe(32)
    admin_token = secrets.token_urlsafe(24)
    os.environ["RATEKEEPER_ADMIN_TOKENS"] = f"bench:{admin_token}"
    raw: dict[str, Any] = {}
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"load average {load_before:.2f} before starting: other processes share these "
            "cores, and the figures will show it")
    workers, seconds, conns = args.workers, args.seconds, args.connections
    stops: list[Callable[[], None]] = []
    inner = redis_cost.script_commands()
    try:
        main_redis = start_redis()
        stops.append(main_redis.stop)
        client = redis.Redis(port=main_redis.port)
        log(f"redis-server on port {main_redis.port}; starting ratekeeper ({workers} workers)")
        rk = start_ratekeeper(CONFIG, main_redis.url, workers, salt=salt_text)
        stops.append(rk.stop)
        status, sample, headers = http_json(f"{rk.url}/v1/check",
                                            {"action": "check", "ip": "198.19.255.1"})
        body_size = len(json.dumps(sample, separators=(",", ":")))
        raw["response"] = {"status": status, "body_bytes": body_size,
                           "headers": sorted(headers)}
        ceiling = start_ceiling(workers, body_size)
        stops.append(ceiling.stop)

        def wrk(server: Server, path: str, script: list[str], secs: float,
                connections: int = conns) -> dict[str, Any]:
            return run_wrk(server.url + path, seconds=secs, connections=connections,
                           threads=args.threads, script_args=script)

        def alternate(bare: Server, ours: Server, rounds: int, warm_up: float, label: str,
                      baseline: Callable[[], dict[str, Any]] | None = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                 redis_cost.CommandStats, list[dict[str, Any]]]:
            """After ``warm_up`` seconds of each, wrk's runs of the ceiling (``bare``) and of
            /v1/check (``ours``), and the ``baseline``'s when given, ``rounds`` of --seconds
            / 2 each, in turn; and what Redis did meanwhile (the ceiling sends it nothing,
            the baseline has a Redis of its own: it is /v1/check's). On a shared machine (a
            VM, its neighbours) the cores' speed drifts over seconds, and back-to-back runs
            of one then the other put that drift into their ratio; alternating spreads it
            over all of them."""
            single = ["single", str(POOL)]
            wrk(bare, "/v1/check", single, warm_up)
            wrk(ours, "/v1/check", single, warm_up)
            before = redis_cost.snapshot(client)
            runs_bare: list[dict[str, Any]] = []
            runs_ours: list[dict[str, Any]] = []
            runs_baseline: list[dict[str, Any]] = []
            for number in range(1, rounds + 1):
                log(f"{label}: the ceiling, then /v1/check"
                    + (", then limits" if baseline else "") + f", round {number} of {rounds}")
                runs_bare.append(wrk(bare, "/v1/check", single, seconds / 2))
                runs_ours.append(wrk(ours, "/v1/check", single, seconds / 2))
                if baseline is not None:
                    runs_baseline.append(baseline())
            return (runs_bare, runs_ours, redis_cost.snapshot(client).minus(before),
                    runs_baseline)

        limits_redis = start_redis()
        stops.append(limits_redis.stop)
        limit_text = "; ".join(f"{w.limit} per {w.seconds} seconds"
                               for w in config.rules["bench-ip"].windows)

        def limits_round() -> dict[str, Any]:
            return run_limits(limits_redis.port, limit=limit_text, processes=workers,
                              concurrency=conns, seconds=seconds / 2, pool=POOL)

        rounds_ceiling, rounds_check, spent, rounds_limits = alternate(
            ceiling, rk, ROUNDS, 2, f"{workers} workers", limits_round)
        raw["ceiling"] = merged_runs(rounds_ceiling)
        raw["check"] = merged_runs(rounds_check)
        raw["limits"] = {"decisions_per_s": statistics.median(
            r["decisions_per_s"] for r in rounds_limits), "rounds": rounds_limits}
        raw["check_rounds"] = [round(c["decided_per_s"] / e["rps"], 4)
                               for c, e in zip(rounds_check, rounds_ceiling, strict=True)]
        evalsha_calls = spent.calls.get("evalsha", 0)
        decided = raw["check"]["decisions"] - raw["check"]["degraded"]
        raw["check_redis"] = {
            "evalsha_calls": evalsha_calls,
            "evalsha_usec": spent.usec.get("evalsha", 0),
            "commands_sent": spent.sent(inner),
            "commands_total": spent.total(),
            # the coalescer's batch: decisions per check.lua call, at saturation
            "decisions_per_call": decided / max(evalsha_calls, 1),
        }
        per_call = max(1, min(MAX_PER_CALL, round(raw["check_redis"]["decisions_per_call"])))

        log("ratekeeper /v1/check/batch")
        raw["batch"] = wrk(rk, "/v1/check/batch", ["batch", str(POOL), str(BATCH)], seconds,
                           connections=args.batch_connections)
        raw["batch"]["decisions_per_s"] = raw["batch"]["rps"] * BATCH

        log(f"paced {args.rate:g} requests/s (ratekeeper, then the ceiling for the floor)")
        raw["paced"] = uvloop.run(paced.run(rk.url, rate=args.rate, seconds=args.paced_seconds,
                                            pool=POOL))
        raw["paced_ceiling"] = uvloop.run(paced.run(ceiling.url, rate=args.rate,
                                                    seconds=args.paced_seconds / 2, pool=POOL))

        log(f"limits MovingWindowRateLimiter, one window ({workers} processes)")
        raw["limits_one_window"] = run_limits(
            limits_redis.port, limit=limit_text.split(";")[0], processes=workers,
            concurrency=conns, seconds=seconds / 2, pool=POOL)

        log("flood")
        raw["flood_setup"] = prepare_flood(rk, client, config, salt_text.encode(), admin_token)
        before = redis_cost.snapshot(client)
        raw["flood"] = wrk(rk, "/v1/check",
                           ["flood", str(POOL), str(FLOOD_SUBJECTS), str(FLOOD_PCT)], seconds)
        spent = redis_cost.snapshot(client).minus(before)
        raw["flood_redis"] = {"commands_sent": spent.sent(inner),
                              "commands_total": spent.total(),
                              "evalsha_calls": spent.calls.get("evalsha", 0)}
        admitted, failed_open, asked = asyncio.run(_flood_verify(rk.url, rounds=3))
        raw["flood_verify"] = {"asked": asked, "allowed": admitted, "failed_open": failed_open,
                               "hour_bucket_rolled": _hour_bucket(client)
                               != raw["flood_setup"]["hour_bucket"]}
        for stop in reversed(stops[1:]):
            stop()
        del stops[1:]

        # The same comparison with one worker each (context for the N-worker figure): one
        # ratekeeper worker leaves the other core to Redis and wrk, where N workers share
        # both cores with them
        rk_one = start_ratekeeper(CONFIG, main_redis.url, 1, salt=salt_text, prefix="rk1")
        stops.append(rk_one.stop)
        ceiling_one = start_ceiling(1, body_size)
        stops.append(ceiling_one.stop)
        one_ceiling, one_check, _, _ = alternate(ceiling_one, rk_one, ONE_WORKER_ROUNDS, 1,
                                                 "one worker each")
        raw["one_worker"] = {"ceiling": merged_runs(one_ceiling),
                             "check": merged_runs(one_check)}
        client.close()
        for stop in reversed(stops[1:]):
            stop()
        del stops[1:]

        log(f"memory: {args.subjects:,} subjects on a fresh redis-server; Redis CPU per "
            f"decision at {per_call} decisions per check.lua call (and at 1)")
        memory_redis = start_redis(extra=redis_cost.DEBUG_ARGS)
        stops.append(memory_redis.stop)
        mem_client = redis.Redis(port=memory_redis.port)
        keyspace = Keyspace(salt_text.encode(), prefix="rk", grouping=config.ip)
        used_before = int(mem_client.info("memory")["used_memory"])
        fill_start = time.monotonic()
        small = min(args.subjects, 100_000)
        probe = small // 4
        fresh = iter(range(2_000_000, 100_000_000, 1_000_000))  # subjects never decided

        def cpu_probe(returning: range, *calls: int) -> dict[str, Any]:
            # the client idle while Redis works; returning subjects take the read, parse and
            # rewrite path, new ones the create path
            figures: dict[str, Any] = {"keys": mem_client.dbsize(),
                                       "rehashing": redis_cost.rehashing(mem_client)}
            for k in calls:
                new_from = next(fresh)
                figures[str(k)] = {
                    "returning": redis_cost.cpu_per_decision(
                        mem_client, memory_redis.port, config, keyspace, "check", returning,
                        per_call=k),
                    "new": redis_cost.cpu_per_decision(
                        mem_client, memory_redis.port, config, keyspace, "check",
                        range(new_from, new_from + len(returning)), per_call=k),
                }
            return figures

        keys = redis_cost.fill_counter_subjects(memory_redis.port, config, keyspace, "check",
                                                range(small))
        raw["redis_cpu_small"] = cpu_probe(range(probe), per_call, 1)
        keys += redis_cost.fill_counter_subjects(memory_redis.port, config, keyspace, "check",
                                                 range(small, args.subjects))
        fill_seconds = time.monotonic() - fill_start
        # Past 2**20 keys the key table is moved to a new one twice its size, which takes a
        # while: measured as it happens, then once it is over (the steady figure).
        raw["redis_cpu_rehash"] = cpu_probe(range(probe, 2 * probe), per_call)
        raw["rehash_wait_seconds"] = redis_cost.wait_for_rehash(mem_client)
        raw["redis_cpu"] = cpu_probe(range(2 * probe, 3 * probe), per_call, 1)
        raw["redis_cpu_per_call"] = per_call
        raw["memory"] = {
            "subjects": args.subjects,
            "keys": mem_client.dbsize(),
            "fill_seconds": fill_seconds,
            "memory_usage_mean": redis_cost.memory_usage(mem_client, keys, 5000),
            "used_memory_per_key": (int(mem_client.info("memory")["used_memory"])
                                    - used_before) / mem_client.dbsize(),
        }
        raw["log"] = {
            str(n): redis_cost.log_bytes_per_entry(mem_client, memory_redis.port, config,
                                                   keyspace, "bench-log", n)
            for n in (100, 1000)
        }
        mem_client.close()
    finally:
        for stop in reversed(stops):
            stop()
    log("/v1/check with five tripwires armed against the same config without them")
    raw["tripwires"] = tripwire_cost.measure(
        workers=workers, rounds=args.tripwire_rounds, seconds=seconds / 2, connections=conns,
        threads=args.threads, report=log)
    raw["elapsed_seconds"] = time.monotonic() - started
    raw["loadavg"] = (load_before, os.getloadavg()[0])
    raw["environment_batch_connections"] = args.batch_connections
    return rows_of(raw), raw


def rows_of(raw: dict[str, Any]) -> list[Row]:
    """The table: every figure, its ratio and its target."""
    ceiling = raw["ceiling"]["rps"]
    # only answers Redis decided count: a degraded (fail-open/closed) answer is not a decision
    check = raw["check"]["decided_per_s"]
    limits = raw["limits"]["decisions_per_s"]
    batch = raw["batch"]["decided_per_s"]
    flood = raw["flood"]["decided_per_s"]
    p = raw["paced"]
    one = raw["one_worker"]
    flood_requests = raw["flood"]["requests"]
    flood_cmds = raw["flood_redis"]["commands_sent"] / max(flood_requests, 1)
    check_redis = raw["check_redis"]
    decided = raw["check"]["decisions"] - raw["check"]["degraded"]
    usec_load = check_redis["evalsha_usec"] / max(decided, 1)
    k = raw["redis_cpu_per_call"]
    cpu, small, rehash = raw["redis_cpu"], raw["redis_cpu_small"], raw["redis_cpu_rehash"]

    def pair(figures: dict[str, Any], calls: int, field: str = "commandstats_usec"
             ) -> tuple[float, float]:
        """(new, returning) subject figure at ``calls`` decisions per check.lua call."""
        return figures[str(calls)]["new"][field], figures[str(calls)]["returning"][field]

    new_usec, back_usec = pair(cpu, k)
    usec = max(new_usec, back_usec)
    wait = raw["rehash_wait_seconds"]
    steady = "" if wait is not None else ", rehash not known"
    mem = raw["memory"]["memory_usage_mean"]
    log_entry = raw["log"]["100"]
    verify = raw["flood_verify"]
    return [
        Row("ceiling: bare aiohttp, same JSON, same-sized body", ceiling, "req/s"),
        Row("ratekeeper POST /v1/check (decided answers)", check, "req/s", check / ceiling),
        Row("limits MovingWindowRateLimiter, async redis-py, same 2-window rule (median of "
            f"{len(raw['limits']['rounds'])} rounds)", limits, "decisions/s"),
        Row("ratekeeper /v1/check vs limits", check, "decisions/s", check / limits),
        Row(f"ratekeeper /v1/check/batch ({BATCH} per request)", batch, "decisions/s",
            batch / limits),
        Row(f"p99 latency at a paced {p['rate']:g} req/s (from scheduled time)", p["p99_ms"],
            "ms", None, "<= 2 ms", p["p99_ms"] <= 2.0),
        Row("/v1/check with 5 tripwires armed vs the same config without (alternating)",
            raw["tripwires"]["with"], "decisions/s", raw["tripwires"]["ratio"], ">= 0.95x",
            raw["tripwires"]["ratio"] >= 0.95),
        Row(f"flood ({FLOOD_PCT}% from {FLOOD_SUBJECTS} banned/over-limit IPs; decided)", flood,
            "req/s", flood / ceiling),
        Row("flood: Redis commands sent per request", flood_cmds, ""),
        Row("flood: flood-subject checks allowed afterwards (by a decision)", verify["allowed"],
            f"of {verify['asked']} ({verify['failed_open']} degraded fail-opens)", None, "0",
            verify["allowed"] == 0 if not verify["hour_bucket_rolled"] else None),
        Row(f"Redis CPU per decision, two-window rule, {cpu['keys']:,} keys, {k} per call"
            f" (evalsha usec; new / returning, the larger{steady})", usec,
            f"us ({new_usec:.1f} / {back_usec:.1f})"),
        Row(f"Redis memory per subject per counter rule ({raw['memory']['subjects']:,} "
            "subjects, MEMORY USAGE)", mem, "B"),
        Row("sliding log bytes per entry (100-entry log)", log_entry, "B"),
        Row("answers that were degraded (Redis not asked in time): /v1/check", raw["check"][
            "degraded"], f"of {raw['check']['decisions']:,}", None, "0",
            raw["check"]["degraded"] == 0),
        Row("  ... batch", raw["batch"]["degraded"], f"of {raw['batch']['decisions']:,}", None,
            "0", raw["batch"]["degraded"] == 0),
        Row("  ... flood", raw["flood"]["degraded"], f"of {raw['flood']['decisions']:,}", None,
            "0", raw["flood"]["degraded"] == 0),
        # context for the figures above
        Row("  info: /v1/check, every answer (degraded included)", raw["check"]["rps"], "req/s"),
        Row(f"  info: /v1/check vs ceiling in each of the {len(raw['check_rounds'])} alternating"
            " rounds (the lowest; all of them)", min(raw["check_rounds"]),
            "(" + " ".join(f"{r:.3f}" for r in raw["check_rounds"]) + ")"),
        Row("  info: with 1 worker each (alternating): /v1/check vs ceiling",
            one["check"]["decided_per_s"] / one["ceiling"]["rps"],
            f"({one['check']['decided_per_s']:,.0f} / {one['ceiling']['rps']:,.0f} req/s)"),
        Row("  info: wrk p99 latency at saturation, /v1/check", raw["check"]["p99_us"] / 1000,
            "ms"),
        Row("  info: p50 / p99.9 at the paced rate", p["p50_ms"], f"/ {p['p999_ms']:.2f} ms"),
        Row("  info: paced client's own send lag p99", p["send_lag_p99_ms"], "ms"),
        Row("  info: ceiling p99 at the same pace (the client+machine floor)",
            raw["paced_ceiling"]["p99_ms"], "ms"),
        Row("  info: limits, one window (a single hit per decision)",
            raw["limits_one_window"]["decisions_per_s"], "decisions/s"),
        Row("  info: the same at 1 decision per call: evalsha usec new / returning",
            pair(cpu, 1)[0], f"/ {pair(cpu, 1)[1]:.1f} us"),
        Row(f"  info: Redis main-thread CPU time per decision at {k} per call (new / returning;"
            " I/O included)", pair(cpu, k, "cpu_usec")[0],
            f"/ {pair(cpu, k, 'cpu_usec')[1]:.1f} us"),
        Row(f"  info: the same at {k} per call while the key table doubles ({rehash['keys']:,}"
            f" keys, right after the fill; it took {wait or 0:.0f} s more): new / returning",
            pair(rehash, k)[0], f"/ {pair(rehash, k)[1]:.1f} us"),
        Row(f"  info: at {small['keys']:,} keys, {k} per call: evalsha usec new / returning",
            pair(small, k)[0], f"/ {pair(small, k)[1]:.1f} us"),
        Row(f"  info: at {small['keys']:,} keys, 1 per call: evalsha usec new / returning",
            pair(small, 1)[0], f"/ {pair(small, 1)[1]:.1f} us"),
        Row("  info: decisions per check.lua call during the /v1/check run (the coalescer's"
            " batch)", check_redis["decisions_per_call"], ""),
        Row("  info: Redis CPU per decision during the /v1/check run (evalsha usec / decided;"
            " shared cores)", usec_load, "us"),
        Row(f"  info: batch connections (x {BATCH} checks in flight each)",
            raw["environment_batch_connections"], ""),
        Row("  info: load average before / after the run", raw["loadavg"][0],
            f"/ {raw['loadavg'][1]:.2f} (2 = both cores busy)"),
        Row("  info: Redis commands per /v1/check, scripts' inner calls included",
            check_redis["commands_total"] / max(raw["check"]["requests"], 1), ""),
        Row("  info: flood, Redis commands per request incl. scripts' inner calls",
            raw["flood_redis"]["commands_total"] / max(flood_requests, 1), ""),
        Row("  info: used_memory growth per counter key", raw["memory"]["used_memory_per_key"],
            "B"),
        Row("  info: sliding log bytes per entry (1,000-entry log)", raw["log"]["1000"], "B"),
        Row("  info: whole bench run", raw["elapsed_seconds"], "s"),
    ]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on."""
    import aiohttp as aiohttp_module
    import limits as limits_module

    redis_version = os.popen("redis-server --version").read().strip()
    wrk_version = os.popen("wrk --version 2>&1").read().splitlines()[0:1]
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "redis_server": redis_version,
        "wrk": wrk_version[0] if wrk_version else "",
        "aiohttp": aiohttp_module.__version__,
        "redis_py": redis.__version__,
        "limits": limits_module.__version__,
        "workers": args.workers,
        "connections": args.connections,
        "wrk_threads": args.threads,
        "seconds_per_scenario": args.seconds,
        "config": str(CONFIG.relative_to(HERE.parent)),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="ratekeeper and ceiling workers")
    parser.add_argument("--seconds", type=float, default=8, help="length of each wrk scenario")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--batch-connections", type=int, default=8,
                        help="connections for the batch scenario (each carries 100 checks)")
    parser.add_argument("--rate", type=float, default=1000, help="paced requests per second")
    parser.add_argument("--tripwire-rounds", type=int, default=4,
                        help="alternating rounds of the tripwires' cost")
    parser.add_argument("--paced-seconds", type=float, default=10,
                        help="length of the paced latency run")
    parser.add_argument("--subjects", type=int, default=1_000_000,
                        help="subjects for the memory figure")
    parser.add_argument("--json", type=Path, default=RESULTS,
                        help="where the results go (default: loadtest/results/bench.json)")
    args = parser.parse_args(argv)
    rows, raw = measure(args)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": environment(args),
        "table": [{"figure": r.figure.strip(), "value": r.value, "unit": r.unit,
                   "ratio": r.ratio, "target": r.target, "met": r.met} for r in rows],
        "raw": raw,
    }
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

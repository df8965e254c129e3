"""`make bench-ab AGAINST=<commit>`: this checkout ("after") against another commit ("before").

The other commit is checked out in a temporary git worktree and served from there: the same
virtualenv, ``python -m ratekeeper serve`` run with that tree as its working directory and
first on PYTHONPATH, so its own package (and whatever Lua files it reads, wherever that
tree keeps them) is what runs; which package each side imported is checked before anything
is measured. Both sides get the same config (bench.toml), salt and workers, and a
redis-server each (no persistence). Then, in alternating rounds, and the side that goes
first alternating too (so that a drift in the machine's speed weighs on both alike):
/v1/check, /v1/check/batch and the flood (wrk, as bench.py runs them) and p99 at a paced
rate (paced.py); and the `limits` baseline, on a redis-server of its own, for "after vs
limits" (the median of its rounds: on a shared machine one run of it moves by a quarter).

One table (metric, before, after, after/before, floor, met?) and loadtest/results/ab.json.
Figures, never assertions: a floor not met is printed, and the run still exits 0.

    .venv/bin/python loadtest/ab.py [--against d6abc48] [--seconds 4] [--rounds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import uvloop

from ratekeeper.config.rules import load_config

import paced
from baseline import run_limits
from bench import BATCH, CONFIG, FLOOD_PCT, FLOOD_SUBJECTS, POOL, merged_runs, prepare_flood
from procs import HERE, ROOT, RedisServer, Server, free_port, run_wrk, start_redis

RESULTS = HERE / "results" / "ab.json"
AGAINST = "d6abc48"  # the code before the rework of the check path
BATCH_CONNECTIONS = 8  # as bench.py: each connection carries BATCH checks
FLOOR = 0.70  # throughput floors: after >= FLOOR x before
LIMITS_FLOOR = 2.0  # after's /v1/check >= LIMITS_FLOOR x limits
# name: (path, check.lua's mode and arguments, connections; None = --connections)
SCENARIOS: dict[str, tuple[str, list[str], int | None]] = {
    "check": ("/v1/check", ["single", str(POOL)], None),
    "batch": ("/v1/check/batch", ["batch", str(POOL), str(BATCH)], BATCH_CONNECTIONS),
    "flood": ("/v1/check", ["flood", str(POOL), str(FLOOD_SUBJECTS), str(FLOOD_PCT)], None),
}


@dataclass
class Side:
    """One of the two codes under test, its Redis and its server."""

    name: str
    tree: Path
    commit: dict[str, Any]
    redis: RedisServer
    server: Server
    package: str  # where ``import ratekeeper`` resolved in the server's environment
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    paced: list[dict[str, float]] = field(default_factory=list)


def log(message: str) -> None:
    """Progress on stderr, so stdout is the table alone."""
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def git(*args: str) -> str:
    """A git command in this checkout; its output."""
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def describe(rev: str) -> dict[str, Any]:
    """A commit's hash and subject."""
    sha = git("rev-parse", f"{rev}^{{commit}}")
    return {"rev": rev, "commit": sha, "short": sha[:7],
            "subject": git("log", "-1", "--format=%s", sha)}


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """``commit`` checked out in a temporary worktree, removed afterwards."""
    tree = Path(tempfile.mkdtemp(prefix="rk-ab-")) / "tree"
    git("worktree", "add", "--detach", str(tree), commit)
    try:
        yield tree
    finally:
        git("worktree", "remove", "--force", str(tree))
        tree.parent.rmdir()


def serve(tree: Path, redis_url: str, workers: int, salt: str) -> tuple[Server, str]:
    """``ratekeeper serve`` from ``tree``, ready when /readyz is; and its package's path.

    With ``-m`` Python puts the working directory first on sys.path, then PYTHONPATH, and
    the virtualenv's editable install of this checkout comes after both: running in ``tree``
    with ``tree`` on PYTHONPATH imports that tree's package. Spawned workers inherit both.
    """
    env = {**os.environ, "PYTHONPATH": str(tree), "RATEKEEPER_REDIS_URL": redis_url,
           "RATEKEEPER_IP_SALT": salt, "RATEKEEPER_KEY_PREFIX": "rk"}
    where = "import ratekeeper; print(ratekeeper.__file__)"
    package = subprocess.run([sys.executable, "-c", where], env=env, cwd=tree,
                             capture_output=True, text=True, check=True).stdout.strip()
    if not Path(package).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree}: `import ratekeeper` found {package}, not this tree's")
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="rk-ab-serve-")) / "out.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "ratekeeper", "serve", "--config", str(CONFIG), "--host",
         "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=tree, stdout=out.open("wb"), stderr=subprocess.STDOUT)
    server = Server(name="ratekeeper", port=port, process=process, log=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ratekeeper from {tree} exited: {out.read_text()}")
        try:
            with urllib.request.urlopen(server.url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    time.sleep(0.3 * workers)  # the other workers bind their sockets too
                    return server, package
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"ratekeeper from {tree} did not become ready: {out.read_text()}")


def check_script(side: Side) -> dict[str, Any]:
    """Where the side's tree keeps check.lua, and whether its Redis holds the very script
    that tree sends (its SHA1) once the side has answered checks: the server ran its own
    tree's Lua. A tree whose package has ``read_script`` sends what it returns (check.lua
    after the sources it shares); an older one, the file as it is."""
    for where in (side.tree / "ratekeeper" / "lua" / "check.lua", side.tree / "lua" / "check.lua"):
        if where.exists():
            source = where.read_bytes()
            sent = subprocess.run(
                [sys.executable, "-c", "import sys; from ratekeeper.storage.scripts import "
                 "read_script; sys.stdout.write(read_script('check'))"],
                env={**os.environ, "PYTHONPATH": str(side.tree)}, cwd=side.tree,
                capture_output=True)
            if sent.returncode == 0:
                source = sent.stdout
            sha = hashlib.sha1(source).hexdigest()
            with redis.Redis(port=side.redis.port) as client:
                loaded = bool(client.script_exists(sha)[0])
            return {"path": str(where.relative_to(side.tree)), "loaded": loaded}
    return {"path": None, "loaded": False}


def wrk(side: Side, scenario: str, seconds: float, connections: int) -> dict[str, Any]:
    """One wrk run of ``scenario`` against ``side``."""
    path, script, conns = SCENARIOS[scenario]
    return run_wrk(side.server.url + path, seconds=seconds, connections=conns or connections,
                   threads=2, script_args=script)


def measure(sides: list[Side], args: argparse.Namespace, baseline: Callable[[], dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Every scenario on both sides, round after round (the runs land on the sides), and the
    baseline once per round; its runs."""
    runs = []
    for number in range(args.rounds):
        order = sides if number % 2 == 0 else sides[::-1]
        log(f"round {number + 1} of {args.rounds}: {' then '.join(s.name for s in order)}")
        for scenario in SCENARIOS:
            for side in order:
                side.runs.setdefault(scenario, []).append(
                    wrk(side, scenario, args.seconds, args.connections))
        for side in order:
            side.paced.append(uvloop.run(paced.run(side.server.url, rate=args.rate,
                                                   seconds=args.seconds, pool=POOL)))
        runs.append(baseline())
    return runs


def figures(side: Side) -> dict[str, Any]:
    """A side's figures: wrk's rounds merged, p99 as the median of the rounds' p99."""
    merged = {name: merged_runs(runs) for name, runs in side.runs.items()}
    p99s = [run["p99_ms"] for run in side.paced]
    return {
        "tree": str(side.tree), "commit": side.commit, "package": side.package,
        "check_script": check_script(side),
        **{f"{name}_per_s": run["decided_per_s"] for name, run in merged.items()},
        "p99_ms": statistics.median(p99s),
        "p99_ms_rounds": p99s,
        "p50_ms": statistics.median(run["p50_ms"] for run in side.paced),
        **{f"{name}_degraded": run["degraded"] for name, run in merged.items()},
        "wrk_errors": sum(run["errors"] for run in merged.values()),
        "paced_failed": sum(run["non_200"] + run["errors"] for run in side.paced),
        "wrk": merged, "wrk_rounds": side.runs, "paced": side.paced,
    }


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def rows_of(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: each metric on both sides, their ratio, its floor."""
    b, a, limits = raw["before"], raw["after"], raw["limits"]["decisions_per_s"]
    rounds = len(raw["limits"]["rounds"])
    rows = []
    for name, metric, unit in (("check", "/v1/check (decided answers)", "req/s"),
                               ("batch", f"/v1/check/batch ({BATCH} per request)", "decisions/s"),
                               ("flood", f"flood ({FLOOD_PCT}% from {FLOOD_SUBJECTS} "
                                         "banned/over-limit IPs; decided)", "req/s")):
        before, after = b[f"{name}_per_s"], a[f"{name}_per_s"]
        ratio = after / before if before else None
        rows.append({"metric": metric, "unit": unit, "before": before, "after": after,
                     "ratio": ratio, "floor": f">= {FLOOR:.2f}x before",
                     "met": ratio is not None and ratio >= FLOOR})
    vs_before, vs_after = b["check_per_s"] / limits, a["check_per_s"] / limits
    rows.append({"metric": f"/v1/check vs limits ({limits:,.0f} decisions/s, median of "
                           f"{rounds})", "unit": "x",
                 "before": vs_before, "after": vs_after, "ratio": vs_after / vs_before,
                 "floor": f"after >= {LIMITS_FLOOR:g}x limits",
                 "met": vs_after >= LIMITS_FLOOR})
    rows.append({"metric": f"p99 at a paced {raw['rate']:,.0f} req/s (median of rounds)",
                 "unit": "ms", "before": b["p99_ms"], "after": a["p99_ms"],
                 "ratio": a["p99_ms"] / b["p99_ms"], "floor": "after <= before",
                 "met": a["p99_ms"] <= b["p99_ms"]})
    rows.append({"metric": "  info: p50 at the paced rate (median of rounds)", "unit": "ms",
                 "before": b["p50_ms"], "after": a["p50_ms"],
                 "ratio": a["p50_ms"] / b["p50_ms"], "floor": "", "met": None})
    for metric, figure in (("degraded answers: check / batch / flood",
                            "{check_degraded} / {batch_degraded} / {flood_degraded}"),
                           ("errors: wrk / paced", "{wrk_errors} / {paced_failed}")):
        rows.append({"metric": f"  info: {metric}", "unit": "", "before": figure.format(**b),
                     "after": figure.format(**a), "ratio": None, "floor": "", "met": None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    def cell(row: dict[str, Any], side: str) -> str:
        value = row[side]
        if isinstance(value, str):
            return value
        return f"{value:.2f}x" if row["unit"] == "x" else f"{_fmt(value)} {row['unit']}"

    lines = [["metric", "before", "after", "after/before", "floor", "met?"]]
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}x"
        lines.append([row["metric"], cell(row, "before"), cell(row, "after"), ratio,
                      row["floor"], met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and when."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True,
                                           text=True).stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def main(argv: list[str] | None = None) -> int:
    """Measure both sides, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default=AGAINST, help="the 'before' commit")
    parser.add_argument("--workers", type=int, default=2, help="ratekeeper workers, each side")
    parser.add_argument("--seconds", type=float, default=4, help="each run, each round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--rate", type=float, default=1000, help="paced requests per second")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    env = machine()
    before_commit = describe(args.against)
    after_commit = {**describe("HEAD"), "local_changes": bool(git("status", "--porcelain"))}
    salt = secrets.token_urlsafe(32)
    admin_token = secrets.token_urlsafe(24)
    os.environ["RATEKEEPER_ADMIN_TOKENS"] = f"bench:{admin_token}"
    config = load_config(str(CONFIG))
    load = [os.getloadavg()[0]]
    raw: dict[str, Any] = {"rate": args.rate}
    with contextlib.ExitStack() as stack:
        old_tree = stack.enter_context(worktree(before_commit["commit"]))
        sides = []
        for name, tree, commit in (("before", old_tree, before_commit),
                                   ("after", ROOT, after_commit)):
            store = start_redis()
            stack.callback(store.stop)
            server, package = serve(tree, store.url, args.workers, salt)
            stack.callback(server.stop)
            log(f"{name}: {commit['short']} served from {package}")
            side = Side(name, tree, commit, store, server, package)
            with redis.Redis(port=store.port) as client:
                raw[f"flood_setup_{name}"] = prepare_flood(server, client, config,
                                                           salt.encode(), admin_token)
            for scenario in ("check", "flood"):  # warm-up, not counted
                wrk(side, scenario, 1, args.connections)
            sides.append(side)
        limits_store = start_redis()
        stack.callback(limits_store.stop)
        limit = "; ".join(f"{w.limit} per {w.seconds} seconds"
                          for w in config.rules["bench-ip"].windows)

        def baseline() -> dict[str, Any]:
            log(f"limits MovingWindowRateLimiter ({args.workers} processes)")
            return run_limits(limits_store.port, limit=limit, processes=args.workers,
                              concurrency=args.connections, seconds=args.seconds, pool=POOL)

        runs = measure(sides, args, baseline)
        for side in sides:
            raw[side.name] = figures(side)
            if not raw[side.name]["check_script"]["loaded"]:
                log(f"{side.name}: its tree's check.lua is not what its Redis holds")
            side.server.stop()
        raw["limits"] = {"decisions_per_s": statistics.median(r["decisions_per_s"] for r in runs),
                         "rounds": runs}
    load.append(os.getloadavg()[0])

    rows = rows_of(raw)
    print(table(rows))
    check_rounds = [a["decided_per_s"] / b["decided_per_s"] for b, a in
                    zip(raw["before"]["wrk_rounds"]["check"], raw["after"]["wrk_rounds"]["check"],
                        strict=True)]
    print(f"\n/v1/check after/before, round by round: "
          f"{' '.join(f'{r:.3f}' for r in check_rounds)}")
    print("p99 at the paced rate, round by round (ms): " + "; ".join(
        f"{name} {' '.join(f'{p:.2f}' for p in raw[name]['p99_ms_rounds'])}"
        for name in ("before", "after")))
    print(f"machine: {env['cpu']}, {env['cores']} cores; {env['date']}; load average "
          f"{load[0]:.2f} before, {load[1]:.2f} after (other work on these cores moves "
          "every figure)")
    print(f"before: {before_commit['short']} {before_commit['subject']}")
    print(f"after:  {after_commit['short']} {after_commit['subject']}"
          + (" + local changes" if after_commit["local_changes"] else ""))
    print(f"{args.workers} workers each, {args.rounds} rounds of {args.seconds:g} s per run")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"environment": {**env, "workers": args.workers, "rounds": args.rounds,
                                "seconds": args.seconds, "connections": args.connections,
                                "loadavg": load, "config": str(CONFIG.relative_to(ROOT))},
                "table": rows,
                "check_rounds": check_rounds, "raw": raw}
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paced latency with Redis far away: how many writes the coalescer lets out at once.

On the bench's machine Redis answers in tens of microseconds; in production it is across a
network. This puts a proxy that delays each direction by ``--delay-us`` between one
ratekeeper worker and its Redis, and runs the paced client (``paced.py``) at ``--rate``
against two ways of letting writes out (``coalescer.Coalescer``'s ``max_inflight``): one at
most, and two (the default: while one is out, the next is on its way, pipelined on the same
connection). The proxy's threads add their own delay: compare the rows, not the absolute
figures.

    .venv/bin/python loadtest/far_redis.py [--delay-us 250] [--rate 1000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time

import uvloop

from procs import HERE, free_port, start_redis

# each way's max_inflight; None: the coalescer's default
WAYS: dict[str, int | None] = {
    "one write out at most": 1,
    "two (the default)": None,
}


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src to dst, each piece ``delay`` seconds after it came (order kept)."""
    pieces: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

    def write() -> None:
        while (piece := pieces.get()) is not None:
            wait = piece[0] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(piece[1])
            except OSError:
                return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    threading.Thread(target=write, daemon=True).start()
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if not data:
            pieces.put(None)
            return
        pieces.put((time.perf_counter() + delay, data))


def proxy(listen: int, target: int, delay_us: float) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, delaying both directions."""
    server = socket.create_server(("127.0.0.1", listen))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for pair in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(*pair, delay_us / 1e6), daemon=True).start()


async def serve(port: int, redis_url: str, inflight: int | None) -> None:
    """One ratekeeper worker whose coalescer lets writes out this way."""
    from aiohttp import web

    from ratekeeper.app import create_app
    from ratekeeper.config.rules import load_config
    from ratekeeper.server.state import RUNTIME
    from ratekeeper.settings import Settings

    settings = Settings.from_env({"RATEKEEPER_REDIS_URL": redis_url,
                                  "RATEKEEPER_IP_SALT": "far-redis-" + "x" * 32,
                                  "RATEKEEPER_KEY_PREFIX": f"far{port}"})
    app = create_app(settings, load_config(str(HERE / "bench.toml")))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # (the runtime, and its limiter, exist from here on)
    coalescer = app[RUNTIME].limiter.coalescer
    assert coalescer is not None, "one Redis: the checks are coalesced"
    if inflight is not None:
        coalescer.max_inflight = inflight
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def measure(args: argparse.Namespace) -> None:
    import paced

    redis = start_redis()
    near = free_port()
    relay = subprocess.Popen([sys.executable, __file__, "--proxy", str(near), str(redis.port),
                              str(args.delay_us)], stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        print(f"Redis behind a proxy delaying each direction by {args.delay_us:g} us; "
              f"{args.rate:g} checks/s for {args.seconds:g} s per row, {args.rounds} rounds")
        for round_ in range(args.rounds):
            for name, inflight in WAYS.items():
                port = free_port()
                server = subprocess.Popen(
                    [sys.executable, __file__, "--serve", str(port),
                     f"redis://127.0.0.1:{near}",
                     "" if inflight is None else str(inflight)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                try:
                    assert server.stdout is not None
                    assert server.stdout.readline().strip() == "ready"
                    figures = uvloop.run(paced.run(f"http://127.0.0.1:{port}/v1/check",
                                                   rate=args.rate, seconds=args.seconds))
                finally:
                    server.terminate()
                    server.wait(10)
                print(f"round {round_ + 1}, {name:21s} p50 {figures['p50_ms']:.2f}  p90 "
                      f"{figures['p90_ms']:.2f}  p99 {figures['p99_ms']:.2f}  p99.9 "
                      f"{figures['p999_ms']:.2f} ms  (non-200: {figures['non_200']:g})",
                      flush=True)
    finally:
        relay.terminate()
        redis.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-us", type=float, default=250)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        proxy(int(args.proxy[0]), int(args.proxy[1]), float(args.proxy[2]))
    elif args.serve:
        port, url, inflight = args.serve
        uvloop.run(serve(int(port), url, int(inflight) if inflight else None))
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

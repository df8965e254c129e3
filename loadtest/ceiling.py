"""The ceiling: a bare aiohttp server that parses the same JSON and answers a same-sized body.

It runs the way ``ratekeeper serve`` does (N forked workers on one SO_REUSEPORT port, uvloop,
no access log), so the ratio of the two is the cost of ratekeeper's own work.

    python loadtest/ceiling.py --port 8090 --workers 2 --body-size 260
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import sys
import time
from types import FrameType

import msgspec
import uvloop
from aiohttp import web


def make_app(body_size: int) -> web.Application:
    """POST /v1/check: decode the JSON, answer ``body_size`` bytes of JSON."""
    pad = max(0, body_size - len(b'{"allowed":true,"pad":""}'))
    body = b'{"allowed":true,"pad":"' + b"x" * pad + b'"}'
    decode = msgspec.json.decode

    async def check(request: web.Request) -> web.Response:
        decode(await request.read())
        return web.Response(body=body, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/check", check)
    app.router.add_get("/healthz", healthz)
    return app


def run_worker(port: int, body_size: int) -> None:
    """One worker, serving until SIGTERM."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(body_size), host="127.0.0.1", port=port, reuse_port=True,
                access_log=None, print=None, shutdown_timeout=1)


def main(argv: list[str] | None = None) -> int:
    """Start the workers; stop them all on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--body-size", type=int, default=260)
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=run_worker, args=(args.port, args.body_size))
                for _ in range(args.workers)]
    for child in children:
        child.start()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(child.is_alive() for child in children):
        time.sleep(0.2)
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

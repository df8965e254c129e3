"""The process model: one worker in-process, or N forked workers sharing the port."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from types import FrameType

from aiohttp import web

from .config import Config
from .server import create_app
from .settings import Settings

__all__ = ["serve"]

log = logging.getLogger("ratekeeper.runner")

SHUTDOWN_TIMEOUT = 10.0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(settings: Settings, config: Config, host: str, port: int, *,
               reuse_port: bool) -> None:
    """Serve in this process until SIGTERM or SIGINT, then drain in-flight requests."""
    _use_uvloop()
    app = create_app(settings, config)
    web.run_app(app, host=host, port=port, reuse_port=reuse_port, access_log=None,
                print=None, shutdown_timeout=SHUTDOWN_TIMEOUT, handle_signals=True)


def serve(settings: Settings, config: Config, host: str, port: int, workers: int) -> int:
    """Run ``workers`` processes on ``host:port``; returns the exit code."""
    log.info("serving %s on %s:%d with %d worker(s), store %s", config.source, host, port,
             workers, settings.redis_url.split("://")[0])
    if workers == 1:
        run_worker(settings, config, host, port, reuse_port=False)
        return 0
    return _supervise(settings, config, host, port, workers)


def _supervise(settings: Settings, config: Config, host: str, port: int, workers: int) -> int:
    context = multiprocessing.get_context("fork")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=run_worker, args=(settings, config, host, port),
                                  kwargs={"reuse_port": True}, daemon=False)
        process.start()
        return process

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    children = [start() for _ in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        time.sleep(0.2)
        for index, child in enumerate(children):
            if not child.is_alive() and not stopping:
                log.warning("worker pid %s exited with %s; starting another", child.pid,
                            child.exitcode)
                children[index] = start()
    for child in children:
        if child.pid is not None and child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT + 2
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
    return 0

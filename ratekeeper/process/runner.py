"""The process model: one worker in-process, or a supervisor and N workers sharing one socket.

Signals (to the single worker, or to the supervisor, which passes them on):

    SIGTERM, SIGINT  drain, then exit: close the listening socket at once (in every process;
                     what waits in its queue is taken first, see ``accept``), so new
                     connections are refused; let in-flight requests finish, answer each
                     open connection's next request with ``Connection: close``
    SIGHUP           reload the config file, swapping the whole rule set at once; a bad file
                     is logged and the last good rules stay (a supervisor checks the file
                     first, then forwards SIGHUP to every worker, each of which reloads)
    SIGUSR2          supervisor only: rolling restart, one worker at a time: start a fresh
                     worker, wait until it serves, then drain and stop an old one

Workers share one listening socket the supervisor made (bound with SO_REUSEPORT, so another
instance may share the port), rather than each binding its own: with one SO_REUSEPORT socket
per worker each has its own accept queue, and connections waiting in the queue of a worker
that stops are reset; with one shared queue a draining worker just stops taking from it and
the others take what waits there, so a rolling restart under load fails no request. Each
worker takes its share of the queue's connections (``accept``), as the kernel's hash would
have spread them. Workers are spawned, not forked, so a rolling restart also picks up an
upgraded package. One worker alone serves the same way, from a socket it makes itself.

A worker takes connections only once it is warm (``warmup``): its Redis connections open,
its scripts loaded, or the warm-up limit passed. Every connection is guarded (``guard``):
requests must arrive in time and well formed, and a worker holds at most its cap of them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType

from aiohttp import web

from ratekeeper.app import create_app
from ratekeeper.config.rules import Config, load_config
from ratekeeper.errors import ConfigError
from ratekeeper.logs import configure_logging
from ratekeeper.metrics import mark_worker_dead
from ratekeeper.process.accept import AcceptShare, AcceptSlots, BalancedSite
from ratekeeper.server.guard import ANSWERS_LOG, Answered, Gate, connection_cap, hush_client_gone
from ratekeeper.server.hot import HotLane
from ratekeeper.server.state import RUNTIME, STOPPING, reload_config
from ratekeeper.server.warmup import WORKERS, keep_warming, warm_up
from ratekeeper.settings import Settings

__all__ = ["run_worker", "serve"]

log = logging.getLogger("ratekeeper.process.runner")

DRAIN_SECONDS = 3.0  # longest wait for open connections to take their "Connection: close"
SHUTDOWN_TIMEOUT = 10.0  # then the longest wait for requests still in flight
READY_TIMEOUT = 30.0  # a new worker must serve within this, after its warm-up limit
BACKLOG = 1024
GC_YOUNG = 10_000


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(settings: Settings, config: Config, host: str, port: int, *,
               sock: socket.socket | None = None, ready: Event | None = None,
               slots: AcceptSlots | None = None, slot: int = 0) -> None:
    """Serve until SIGTERM or SIGINT, then drain: one of a supervisor's workers when given
    its accept ``slots``, taking this worker's share (``slots[slot]``, see ``accept``) of
    the connections of the supervisor's ``sock``; else the whole server, on ``sock`` or a
    socket of its own on ``host:port``."""
    spawned = slots is not None
    if spawned:  # nothing of the parent's logging set-up survives a spawn
        configure_logging(settings.log_format, settings.log_level)
        assert sock is not None, "a supervisor's accept slots come with its socket"
    else:
        slots = AcceptSlots(1, multiprocessing.get_context("spawn"))
    hush_client_gone()
    if sock is None:
        sock = _listen(host, port)
    assert slots is not None
    _use_uvloop()
    try:
        asyncio.run(_serve(settings, config, AcceptShare(slots, slot), sock, spawned, ready))
    finally:
        sock.close()


async def _serve(settings: Settings, config: Config, share: AcceptShare, sock: socket.socket,
                 spawned: bool, ready: Event | None) -> None:
    app = create_app(settings, config)
    app[WORKERS] = share.slots  # what /readyz asks
    stopping = app[STOPPING]  # once set, every answer says "Connection: close"
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT,
                           access_log_class=Answered, access_log=ANSWERS_LOG)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not spawned:  # this worker is the whole server
            share.slots.stop_all()
        stopping.set()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload_config, app, config.source)
    watchdog: asyncio.Future[None] | None = None
    if spawned:
        watchdog = asyncio.ensure_future(_orphan_watch(stopping, share.slots))
    else:
        loop.add_signal_handler(signal.SIGUSR2, log.warning,
                                "a rolling restart needs --workers 2 or more; ignored")
    warming = await _warm(app, settings, stopping, share)
    gate = Gate(runner.server, request_timeout=settings.request_timeout_ms / 1000,
                limit=connection_cap(settings.max_connections), lane=HotLane(app))
    if not stopping.is_set():  # (a stop asked during the warm-up: nothing was served)
        site = BalancedSite(runner, sock, share, gate)
        await site.start()
        _tune_gc()
        if ready is not None:
            ready.set()
        log.info("worker pid %d serving (at most %d connections)", os.getpid(), gate.limit)
        await stopping.wait()
        log.info("worker pid %d draining", os.getpid())
        await site.stop()  # no new connections here; its socket is closed in this process
        deadline = loop.time() + DRAIN_SECONDS
        while len(gate) and loop.time() < deadline:
            await asyncio.sleep(0.02)
    if warming is not None:
        warming.cancel()
    await gate.close_lane(SHUTDOWN_TIMEOUT)
    await runner.cleanup()  # closes what is still idle, waits for what is in flight
    gate.stop()
    if watchdog is not None:
        watchdog.cancel()
    log.info("worker pid %d stopped", os.getpid())


async def _warm(app: web.Application, settings: Settings, stopping: asyncio.Event,
                share: AcceptShare) -> asyncio.Task[None] | None:
    """Wait until this worker is warm, or its warm-up limit has passed; then the task that
    goes on warming it, if any."""
    limiter = app[RUNTIME].limiter
    limit = settings.warmup_ms / 1000
    if await warm_up(limiter.ready, limit, stopping):
        share.warmed()
        return None
    if stopping.is_set():
        return None
    log.warning("worker pid %d: Redis is not ready after the %.1f s warm-up; serving anyway "
                "(the fail modes decide until it is)", os.getpid(), limit)
    return asyncio.create_task(keep_warming(limiter.ready, share.warmed))


def _tune_gc() -> None:
    """Fewer garbage collections on the request path (make bench: about 8% more checks/s).

    What start-up made lives as long as the process: frozen, no collection walks it again.
    A check allocates a few dozen short-lived objects that reference counting frees; the
    young generation is collected every GC_YOUNG allocations instead of every 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 20)


async def _orphan_watch(stopping: asyncio.Event, slots: AcceptSlots) -> None:
    """Drain when the supervisor is gone (killed), rather than serve on unsupervised."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the supervisor is gone; draining")
    slots.stop_all()
    stopping.set()


def serve(settings: Settings, config: Config, host: str, port: int, workers: int) -> int:
    """Run ``workers`` processes on ``host:port``; returns the exit code."""
    log.info("serving %s on %s:%d with %d worker(s), store %s", config.source, host, port,
             workers, settings.redis_url.split("://")[0])
    if settings.ip_salt_previous:
        longest = max((w.seconds for r in config.rules.values() for w in r.windows), default=0)
        log.info("honouring RATEKEEPER_IP_SALT_PREVIOUS; unset it once %d s (the longest "
                 "window) and the longest running ban have passed since the rotation", longest)
    try:
        sock = _listen(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror)
        return 1
    if workers == 1:
        run_worker(settings, config, host, port, sock=sock)
        return 0
    try:
        return Supervisor(settings, config, sock, workers).run()
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts from."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The workers share this one socket (one accept queue); SO_REUSEPORT on it still lets a
    # second instance bind the same port, e.g. a new release started beside the old one.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(BACKLOG)
    return sock


@dataclass
class _Worker:
    process: BaseProcess
    ready: Event
    started: float
    slot: int  # its place in the supervisor's accept slots

    @property
    def pid(self) -> int:
        return self.process.pid or 0


class Supervisor:
    """Keeps N workers serving one socket; reloads, rolling restarts and drains on signals."""

    def __init__(self, settings: Settings, config: Config, sock: socket.socket,
                 workers: int) -> None:
        self.settings = settings
        self.config = config
        self.sock = sock
        self.size = workers
        self.context = multiprocessing.get_context("spawn")
        self.signals: deque[int] = deque()
        self.workers: list[_Worker] = []
        # a slot per worker, and one for the worker started while the one it replaces (a
        # rolling restart's, a dead one's) still holds its slot
        self.slots = AcceptSlots(workers + 1, self.context, workers=workers)

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(signum, self._on_signal)
        for _ in range(self.size):
            self.workers.append(self._start())
        if not all(self._await_ready(worker) for worker in self.workers):
            log.error("a worker did not start; stopping")
            self._stop_all()
            return 1
        log.info("supervisor pid %d: %d workers serving", os.getpid(), self.size)
        while not self._handle_signals():
            self._replace_dead()
            time.sleep(0.05)
        self._stop_all()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _stop_asked(self) -> bool:
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals

    def _handle_signals(self) -> bool:
        """Act on the signals received; True when it is time to stop."""
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                return True
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR2:
                self._rolling_restart()
        return False

    def _start(self) -> _Worker:
        ready = self.context.Event()
        taken = {worker.slot for worker in self.workers}
        slot = next(i for i in range(len(self.slots)) if i not in taken)  # (released)
        process = self.context.Process(
            target=run_worker, name="ratekeeper-worker",
            args=(self.settings, self.config, "", 0),
            kwargs={"sock": self.sock, "ready": ready, "slots": self.slots, "slot": slot},
            daemon=False)
        process.start()
        return _Worker(process, ready, time.monotonic(), slot)

    def _await_ready(self, worker: _Worker) -> bool:
        deadline = time.monotonic() + self.settings.warmup_ms / 1000 + READY_TIMEOUT
        while not worker.ready.wait(0.05):
            if not worker.process.is_alive() or time.monotonic() > deadline:
                return False
        return True

    def _stop(self, worker: _Worker) -> None:
        """SIGTERM a worker and wait while it drains."""
        if worker.process.is_alive():
            os.kill(worker.pid, signal.SIGTERM)
        worker.process.join(DRAIN_SECONDS + SHUTDOWN_TIMEOUT + 2)
        if worker.process.is_alive():
            log.warning("worker pid %d did not drain in time; killing it", worker.pid)
            worker.process.kill()
            worker.process.join(5)
        self.slots.release(worker.slot)
        mark_worker_dead(worker.pid)

    def _stop_all(self) -> None:
        # each worker takes what waits in the queue and closes its copy of the socket: with
        # this one closed first, the last copy closes with nothing waiting
        self.slots.stop_all()
        self.sock.close()
        for worker in self.workers:
            if worker.process.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            self._stop(worker)

    def _replace_dead(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            log.warning("worker pid %d exited with %s; starting another", worker.pid,
                        worker.process.exitcode)
            self.slots.release(worker.slot)
            mark_worker_dead(worker.pid)
            if time.monotonic() - worker.started < 1.0:
                time.sleep(1.0)  # a worker that dies at once would otherwise spin
            self.workers[index] = self._start()

    def _reload(self) -> None:
        try:
            config = load_config(self.config.source)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload: %s", line)
            log.error("reload: %s is invalid; the workers keep the rules loaded before",
                      self.config.source)
            return
        self.config = config  # what workers started from now on get
        for worker in self.workers:
            if worker.process.is_alive():
                os.kill(worker.pid, signal.SIGHUP)
        log.info("reload: %s passed on to %d workers", self.config.source, len(self.workers))

    def _rolling_restart(self) -> None:
        log.info("rolling restart of %d workers", len(self.workers))
        for index, old in enumerate(list(self.workers)):
            if self._stop_asked():
                return
            fresh = self._start()
            if not self._await_ready(fresh):
                log.error("rolling restart: a new worker did not start; keeping the others")
                self._stop(fresh)
                return
            self.workers[index] = fresh
            log.info("rolling restart: worker pid %d replaces pid %d", fresh.pid, old.pid)
            self._stop(old)
        log.info("rolling restart done")

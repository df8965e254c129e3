"""An open-loop load generator: requests leave on a fixed schedule, whatever the server does.

wrk is closed-loop (a connection sends its next request only after the last answer), so a
slow answer delays the requests behind it and they are never measured: coordinated omission.
Here a pacer thread releases request i at ``start + i / rate``; the event loop sends it on an
idle keep-alive connection (opening another, up to ``--connections``, when none is idle,
else queueing it), and its latency runs from the *scheduled* time to the last byte of the
answer. Time the client itself loses (timer wake-up, a busy loop) therefore counts against
the server; ``send_lag`` reports how much of it there was, so a reader can tell.

    python loadtest/paced.py --url http://127.0.0.1:8080 --rate 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import threading
import time
from typing import cast
from urllib.parse import urlsplit

import uvloop

__all__ = ["percentile", "run"]

CLOCK = time.perf_counter


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def check_request(host: str, port: int, pool: int, rng: random.Random) -> bytes:
    """A keep-alive POST /v1/check for a random IP of the bench pool (198.18.0.0/15)."""
    i = rng.randrange(pool)
    body = (b'{"action":"check","ip":"198.%d.%d.%d"}'
            % (18 + i // 65536, i // 256 % 256, i % 256))
    return (b"POST /v1/check HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.current: tuple[float, float] | None = None  # (scheduled, sent)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def send(self, scheduled: float, request: bytes) -> None:
        assert self.transport is not None
        self.current = (scheduled, CLOCK())
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[:end + 4 + length]
        assert self.current is not None
        scheduled, sent = self.current
        self.current = None
        self.client.done(self, scheduled, sent, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class Client:
    """The connection pool and the bookkeeping of one paced run."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.idle: list[Connection] = []
        self.opening = 0
        self.open = 0
        self.waiting: collections.deque[tuple[float, bytes]] = collections.deque()
        self.latencies: list[float] = []  # from the scheduled time, seconds
        self.service: list[float] = []  # from the moment it was written, seconds
        self.lags: list[float] = []  # scheduled -> handed to the loop
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors = 0
        self.outstanding = 0
        self.record_after = 0.0
        self.finished = asyncio.Event()
        self.all_released = False
        self.connecting: set[asyncio.Task[None]] = set()

    def release(self, scheduled: float, request: bytes) -> None:
        """Called on the loop when the pacer releases a request."""
        if scheduled >= self.record_after:
            self.lags.append(CLOCK() - scheduled)
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(scheduled, request)
            return
        self.waiting.append((scheduled, request))
        if self.open + self.opening < self.max_connections:
            self.opening += 1
            task = asyncio.ensure_future(self._connect())
            self.connecting.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.connecting.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(lambda: Connection(self), self.host,
                                                       self.port)
        except OSError:
            self.opening -= 1
            self.errors += 1
            return
        self.opening -= 1
        self.open += 1
        self._next(protocol)

    def _next(self, connection: Connection) -> None:
        if self.waiting:
            scheduled, request = self.waiting.popleft()
            connection.send(scheduled, request)
        else:
            self.idle.append(connection)

    def done(self, connection: Connection, scheduled: float, sent: float, status: int) -> None:
        now = CLOCK()
        if scheduled >= self.record_after:
            self.latencies.append(now - scheduled)
            self.service.append(now - sent)
            self.statuses[status] += 1
        self.outstanding -= 1
        self._next(connection)
        if self.all_released and self.outstanding == 0:
            self.finished.set()

    def lost(self, connection: Connection) -> None:
        self.open -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.current is not None:
            self.errors += 1
            self.outstanding -= 1
            if self.all_released and self.outstanding == 0:
                self.finished.set()


async def run(url: str, *, rate: float, seconds: float, warmup: float = 1.0,
              connections: int = 64, pool: int = 100_000, seed: int = 1) -> dict[str, float]:
    """Send ``rate`` requests/s for ``warmup + seconds``; figures of the last ``seconds``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    client = Client(host, port, connections)
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    total = round(rate * (warmup + seconds))
    requests = [check_request(host, port, pool, rng) for _ in range(total)]
    start = CLOCK() + 0.2
    client.record_after = start + warmup

    def pace() -> None:
        for i, request in enumerate(requests):
            scheduled = start + i / rate
            delay = scheduled - CLOCK()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(client.release, scheduled, request)

        def last() -> None:
            client.all_released = True
            if client.outstanding == 0:
                client.finished.set()

        loop.call_soon_threadsafe(last)

    # a short switch interval lets the pacer thread take the GIL back promptly
    sys.setswitchinterval(0.0002)
    pacer = threading.Thread(target=pace, daemon=True)
    pacer.start()
    await asyncio.wait_for(client.finished.wait(), warmup + seconds + 30)
    pacer.join()
    ms = 1000.0
    return {
        "rate": rate,
        "seconds": seconds,
        "measured": len(client.latencies),
        "achieved_rps": len(client.latencies) / seconds,
        "ok": client.statuses.get(200, 0),
        "non_200": sum(v for k, v in client.statuses.items() if k != 200),
        "errors": client.errors,
        "connections": client.open,
        "p50_ms": percentile(client.latencies, 50) * ms,
        "p90_ms": percentile(client.latencies, 90) * ms,
        "p99_ms": percentile(client.latencies, 99) * ms,
        "p999_ms": percentile(client.latencies, 99.9) * ms,
        "max_ms": max(client.latencies, default=0.0) * ms,
        "service_p99_ms": percentile(client.service, 99) * ms,
        "send_lag_p99_ms": percentile(client.lags, 99) * ms,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the figures of one paced run as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--pool", type=int, default=100_000)
    args = parser.parse_args(argv)
    figures = uvloop.run(run(args.url, rate=args.rate, seconds=args.seconds,
                              warmup=args.warmup, connections=args.connections,
                              pool=args.pool))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Alerts: every event worth a person's attention, POSTed to the config's webhooks.

An event (a flag an admin changed, a tripwire's trip or shadow trip, a ban added or lifted,
Redis's circuit opening or closing) becomes one JSON body: ``text``, a line a person reads (a
Slack-compatible incoming webhook shows it as is), ``kind``, ``at`` (Unix seconds) and the
event's own fields. Bodies are signed with HMAC-SHA256 under ``RATEKEEPER_WEBHOOK_SECRET``:
``Ratekeeper-Signature: sha256=<hex>`` over the exact bytes sent, so a receiver can tell ours
from forgeries. An alert never carries an IP or a subject hash: a ban names its field, never
whom; free text (reasons) was refused on the way in if it held an IP.

Delivery never holds up a check or an admin change: ``send`` only puts the body on a bounded
queue per webhook (full: the alert is dropped and counted). One task per webhook posts them
in order, each attempt under a timeout, retrying a failure (no answer, a 5xx, a 429) with
backoff; one that fails every attempt is dropped and counted
(``ratekeeper_alerts_dropped{reason}``). A slow or dead receiver delays only its own queue.
Each process sends what it saw: a trip (decided once in Redis) or an admin change is one
alert, the circuit breaker's state is each process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import msgspec

from ratekeeper.control.sync import stop_tasks
from ratekeeper.metrics import Metrics

__all__ = ["SIGNATURE_HEADER", "Alerts", "BreakerWatch", "sign"]

log = logging.getLogger("ratekeeper.control.alerts")

SIGNATURE_HEADER = "Ratekeeper-Signature"
QUEUE_SIZE = 256  # alerts waiting per webhook; past that, new ones are dropped
TIMEOUT = 5.0  # seconds one attempt may take
ATTEMPTS = 4
BACKOFF = 0.5  # seconds before the second attempt; doubled each time after
STOP_GRACE = 2.0  # seconds a stopping process gives its queues to empty

_encode = msgspec.json.Encoder().encode


def sign(secret: bytes, body: bytes) -> str:
    """The ``Ratekeeper-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Alerts:
    """Queues events and posts them to every webhook; one per process."""

    def __init__(self, webhooks: Sequence[str], secret: bytes, metrics: Metrics | None, *,
                 wall: Callable[[], float] = time.time, timeout: float = TIMEOUT,
                 attempts: int = ATTEMPTS, backoff: float = BACKOFF,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.webhooks = tuple(webhooks)
        self.secret = secret
        self.metrics = metrics
        self.wall = wall
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.sent = 0  # alerts a webhook accepted (per webhook, summed)
        self.dropped = 0  # alerts given up
        self._queues: list[asyncio.Queue[bytes]] = [asyncio.Queue(queue_size)
                                                    for _ in self.webhooks]
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start one sender per webhook (none when there are no webhooks)."""
        if not self.webhooks:
            return
        if not self.secret:
            log.warning("RATEKEEPER_WEBHOOK_SECRET is not set: alerts are sent unsigned")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._tasks = [asyncio.create_task(self._deliver(url, queue))
                       for url, queue in zip(self.webhooks, self._queues, strict=True)]

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Give the queues ``grace`` seconds to empty, then stop the senders."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(queue.join() for queue in self._queues))
            await stop_tasks(self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send(self, kind: str, text: str, **fields: Any) -> None:
        """Queue one alert for every webhook; never waits."""
        if not self.webhooks:
            return
        body = _encode({"text": text, "kind": kind, "at": round(self.wall(), 3), **fields})
        for queue in self._queues:
            try:
                queue.put_nowait(body)
            except asyncio.QueueFull:
                self._drop("queue_full")

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.alert_dropped(reason)

    async def _deliver(self, url: str, queue: asyncio.Queue[bytes]) -> None:
        while True:
            body = await queue.get()
            try:
                if await self._post(url, body):
                    self.sent += 1
                    if self.metrics is not None:
                        self.metrics.alert_sent()
                else:
                    self._drop("undelivered")
            finally:
                queue.task_done()

    async def _post(self, url: str, body: bytes) -> bool:
        """Post ``body`` until a receiver takes it or the attempts run out."""
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        assert self._session is not None
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
                continue
            if status < 300:
                return True
            why = f"HTTP {status}"
            if status < 500 and status != 429:  # the receiver refuses it: asking again won't help
                break
        # the URL itself is not logged: a webhook URL often carries its own secret
        log.warning("an alert could not be delivered to webhook %d (%s); dropped",
                    self.webhooks.index(url) + 1, why)
        return False


class BreakerWatch:
    """Turns the circuit breaker's state, looked at now and then, into alerts on a change."""

    def __init__(self, alerts: Alerts) -> None:
        self.alerts = alerts
        self.open = False

    def look(self, state: str) -> None:
        """Alert when the circuit has opened (open or probing) or closed since the last look."""
        now_open = state != "closed"
        if now_open == self.open:
            return
        self.open = now_open
        if now_open:
            self.alerts.send("breaker", "Redis is failing: a ratekeeper process opened its "
                                        "circuit, and its checks are decided by the rules' "
                                        "fail modes", state="open")
        else:
            self.alerts.send("breaker", "Redis answers again: a ratekeeper process closed its "
                                        "circuit, and its checks are decided by Redis",
                             state="closed")

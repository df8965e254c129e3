"""Load that must never open the gate, shared by tests/test_overload.py and loadtest/burst.py:
a `ratekeeper serve` taken as started the moment /readyz first says 200, a burst of new
connections for one IP, concurrent large batches beside a paced abuser, and a tally of the
answers."""

from __future__ import annotations

import asyncio
import resource
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from support.common import SALT
from support.processes import ServerProcess

__all__ = [
    "BATCHES",
    "BATCH_LIMIT",
    "BATCH_SIZE",
    "BURST",
    "BURST_LIMIT",
    "OVERLOAD_RULES",
    "PACED_LIMIT",
    "ReadyServer",
    "Tally",
    "batches_beside_abuser",
    "burst",
    "overload_env",
    "raise_fd_limit",
]

BURST, BURST_LIMIT = 1000, 50
BATCHES, BATCH_SIZE, BATCH_LIMIT = 8, 1000, 3
PACED_LIMIT, PACED_EVERY = 5, 0.010
PACED_AT_LEAST = 20  # checks the abuser sends even when the batches are answered sooner
CLIENT_TIMEOUT = 60.0  # seconds: a slow answer is an answer; only a lost one is an error

OVERLOAD_RULES = f"""
[rules.hot-ip]
limit = "{BURST_LIMIT} per minute"
key = ["ip"]
[actions.hot]
rules = ["hot-ip"]

[rules.upload-ip]
limit = "{BATCH_SIZE} per minute"
key = ["ip"]
[rules.upload-user]
limit = "{BATCH_LIMIT} per minute"
key = ["user"]
[actions.upload]
rules = ["upload-ip", "upload-user"]

[rules.login-ip]
limit = "{PACED_LIMIT} per minute"
key = ["ip"]
[actions.login]
rules = ["login-ip"]
"""


def overload_env(redis_url: str, prefix: str) -> dict[str, str]:
    """The environment of a server under test: the product's own Redis deadline, because
    the point is that load alone never reaches the fail mode, whatever the deadline."""
    return {"RATEKEEPER_REDIS_URL": redis_url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": prefix, "RATEKEEPER_REDIS_TIMEOUT_MS": ""}


def raise_fd_limit(wanted: int = 4 * BURST) -> None:
    """Raise this process's soft open-file limit (and so its children's) to ``wanted``, within
    the hard limit: a burst holds one socket per connection on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ReadyServer(ServerProcess):
    """`ratekeeper serve` taken as started the moment /readyz first answers 200, as a load
    balancer would take it, with no grace period after."""

    def wait_ready(self, workers: int) -> None:
        """Poll /readyz until it answers 200."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # not listening yet, or 503 until Redis and the workers are ready
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server was not ready in 30 s: {self.log.read_text()}")


@dataclass
class Tally:
    """Answers counted: allowed and denied decisions, how many of them were degraded, and
    errors (a status other than 200, or no answer)."""

    allowed: int = 0
    degraded: int = 0
    denied: int = 0
    errors: int = 0

    @classmethod
    def of(cls, answers: Iterable[dict[str, Any] | None]) -> Tally:
        """Count decisions (``None`` stands for an error)."""
        tally = cls()
        for answer in answers:
            if answer is None:
                tally.errors += 1
                continue
            tally.degraded += bool(answer["degraded"])
            if answer["allowed"]:
                tally.allowed += 1
            else:
                tally.denied += 1
        return tally

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.allowed + other.allowed, self.degraded + other.degraded,
                     self.denied + other.denied, self.errors + other.errors)

    def __str__(self) -> str:
        return (f"allowed {self.allowed:4d}  degraded {self.degraded:4d}  "
                f"denied {self.denied:4d}  errors {self.errors:3d}")


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    """The decoded 200 answer, or None for any other status or a failed connection."""
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return None
            return await resp.json()
    except (TimeoutError, aiohttp.ClientError):
        return None


async def burst(base_url: str, ip: str, count: int = BURST) -> Tally:
    """``count`` concurrent checks of ``hot`` for ``ip``, each on a new connection of its own
    that sends its request as soon as it is open: the server meets them while it is still
    accepting the rest."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        body = {"action": "hot", "ip": ip}
        answers = await asyncio.gather(*(_post(session, f"{base_url}/v1/check", body)
                                         for _ in range(count)))
    return Tally.of(answers)


async def batches_beside_abuser(base_url: str, run: int, batches: int = BATCHES,
                                size: int = BATCH_SIZE) -> tuple[list[Tally], Tally]:
    """``batches`` concurrent calls of ``size`` checks of ``upload``, each call for one ip+user
    of its own, while an abuser sends a check of ``login`` every 10 ms from the moment they
    are sent until they are answered (and at least PACED_AT_LEAST checks); a tally per batch,
    and the abuser's. ``run`` makes every subject fresh."""
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def batch(i: int) -> Tally:
            check = {"action": "upload", "ip": f"198.18.{run}.{i + 1}", "user": f"u{run}-{i}"}
            answer = await _post(session, f"{base_url}/v1/check/batch",
                                 {"checks": [check] * size})
            return Tally.of([None] * size if answer is None else answer["results"])

        sent = [asyncio.ensure_future(batch(i)) for i in range(batches)]
        abuser: list[asyncio.Future[Any]] = []
        body = {"action": "login", "ip": f"192.0.2.{run + 1}"}
        while not all(s.done() for s in sent) or len(abuser) < PACED_AT_LEAST:
            abuser.append(asyncio.ensure_future(_post(session, f"{base_url}/v1/check", body)))
            await asyncio.sleep(PACED_EVERY)
        return list(await asyncio.gather(*sent)), Tally.of(await asyncio.gather(*abuser))

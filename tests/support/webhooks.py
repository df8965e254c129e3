"""A real HTTP webhook receiver for the alert tests: it records what it is sent, and can be
told to answer, to fail, or to hang (a slow receiver)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Delivery", "Receiver", "receiver", "signed_by"]


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver took: its headers and its body."""

    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def signed_by(secret: bytes, delivery: Delivery) -> bool:
    """Whether the delivery's Ratekeeper-Signature is the HMAC-SHA256 of its body."""
    want = "sha256=" + hmac.new(secret, delivery.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(delivery.headers.get("Ratekeeper-Signature", ""), want)


class Receiver:
    """A webhook on 127.0.0.1; ``mode`` is ``ok`` (204), ``fail`` (500) or ``hang``."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.deliveries: list[Delivery] = []
        self.attempts = 0  # requests received, answered or not
        self.release = threading.Event()  # ends every hanging request
        self._lock = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner._lock:
                    owner.attempts += 1
                    owner._lock.notify_all()
                if owner.mode == "hang":
                    owner.release.wait(30)
                    return
                if owner.mode == "fail":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with owner._lock:
                    owner.deliveries.append(Delivery(dict(self.headers.items()), body))
                    owner._lock.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float = 10.0, *, attempts: bool = False
                 ) -> list[Delivery]:
        """Wait until ``count`` deliveries (or attempts) have come; the deliveries."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self.attempts if attempts else len(self.deliveries)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{count} {'attempts' if attempts else 'deliveries'}"
                                         f" did not come within {timeout} s "
                                         f"(got {self.attempts} attempts, "
                                         f"{len(self.deliveries)} deliveries)")
                self._lock.wait(left)
            return list(self.deliveries)

    async def arrived(self, count: int, timeout: float = 10.0, *, attempts: bool = False
                      ) -> list[Delivery]:
        """``wait_for`` from a coroutine, leaving the event loop free meanwhile."""
        return await asyncio.to_thread(self.wait_for, count, timeout, attempts=attempts)


@contextmanager
def receiver(mode: str = "ok") -> Iterator[Receiver]:
    """A running receiver, stopped (and any hanging request released) afterwards."""
    made = Receiver(mode)
    thread = threading.Thread(target=made.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        made.release.set()
        made.httpd.shutdown()
        made.httpd.server_close()

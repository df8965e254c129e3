"""The same client for WSGI apps (Warehouse): blocking calls over pooled keep-alive connections.

urllib3's connection pool is thread-safe, so one ``SyncClient`` serves every thread of a
worker. Nothing is retried: a stale connection or a timeout falls back to the action's fail
mode at once rather than doubling the wait (and a retried POST could take a hit twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import urllib3

from ratekeeper.api.wire import Decision, RefundResult
from ratekeeper.client.base import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    NOTHING_TAKEN,
    UNAVAILABLE,
    BaseClient,
    Check,
    FailMode,
    SidecarUnavailable,
    log,
)

__all__ = ["SyncClient"]


class SyncClient(BaseClient):
    """The blocking client: ``check``, ``batch``, ``refund`` as in ``AsyncClient``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT,
                 fail: Mapping[str, FailMode] | None = None, default_fail: FailMode = "open",
                 connections: int = 10) -> None:
        super().__init__(base_url, timeout=timeout, fail=fail, default_fail=default_fail)
        url = urllib3.util.parse_url(self.base_url)
        self._path = (url.path or "").rstrip("/")
        # block=False: a burst beyond `connections` opens extra short-lived connections
        self._pool = urllib3.connection_from_url(
            self.base_url, maxsize=connections, block=False, retries=False,
            timeout=urllib3.Timeout(total=timeout),
            headers={"Content-Type": "application/json"},
        )

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.close()

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            resp = self._pool.urlopen("POST", self._path + path, body=body, retries=False,
                                      redirect=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SidecarUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return resp.status, resp.data

    def check(self, action: str, ip: str | None = None, *, user: str | None = None,
              cost: int = 1, ip_hash: str | None = None, **subjects: str) -> Decision:
        """May this client do ``action`` now? ``cost=0`` only looks."""
        body = Check(action, ip, user=user, cost=cost, ip_hash=ip_hash, **subjects).body
        try:
            status, raw = self._post("/v1/check", self._encode(body))
            return self.answer(status, raw, self._decision)
        except SidecarUnavailable as exc:
            return self.fallback(action, exc)

    def batch(self, checks: Iterable[Check]) -> list[Decision]:
        """Several checks in one round trip, answered in order."""
        items = list(checks)
        if not items:
            return []
        try:
            status, raw = self._post(
                "/v1/check/batch", self._encode({"checks": [c.body for c in items]}))
            return self.answer(status, raw, self._batch).results
        except SidecarUnavailable as exc:
            return self.batch_fallback(items, exc)

    def refund(self, token: str | Decision) -> RefundResult:
        """Give back what a check took (its Decision or its ``refund`` token), at most once."""
        text = self.token_of(token)
        if text is None:
            return NOTHING_TAKEN
        try:
            status, raw = self._post("/v1/refund", self._encode({"token": text}))
            return self.answer(status, raw, self._refund)
        except SidecarUnavailable as exc:
            log.warning("ratekeeper unavailable, refund not given: %s", exc)
            return UNAVAILABLE

"""The same client for WSGI apps (Warehouse): blocking calls over pooled keep-alive connections.

urllib3's connection pool is thread-safe, so one ``SyncClient`` serves every thread of a
worker. Nothing is retried: a stale connection or a timeout falls back to the action's fail
mode at once rather than doubling the wait (and a retried POST could take a hit twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import urllib3

from ratekeeper.api.wire import ClearResult, Decision, FlagStates, RefundResult
from ratekeeper.client.base import (
    CLEAR_UNAVAILABLE,
    DEFAULT_FLAGS_TTL,
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
    """The blocking client: ``check``, ``batch``, ``refund`` and the origin's ``state``,
    ``clear`` and ``flags``, as in ``AsyncClient``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT,
                 fail: Mapping[str, FailMode] | None = None, default_fail: FailMode = "open",
                 connections: int = 10, origin_token: str | None = None,
                 flags_ttl: float = DEFAULT_FLAGS_TTL) -> None:
        super().__init__(base_url, timeout=timeout, fail=fail, default_fail=default_fail,
                         origin_token=origin_token, flags_ttl=flags_ttl)
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

    def _post(self, path: str, body: bytes | None, method: str = "POST",
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        try:
            resp = self._pool.urlopen(method, self._path + path, body=body, retries=False,
                                      redirect=False, headers=headers)
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

    def state(self, action: str, ip: str | None = None, *, user: str | None = None,
              ip_hash: str | None = None, **subjects: str) -> Decision:
        """What a look at ``action`` answers, from Redis (exact milliseconds); raises
        ClientError, as it is no decision to fall back on."""
        body = Check(action, ip, user=user, cost=0, ip_hash=ip_hash, **subjects).body
        status, raw = self._post("/v1/origin/state", self._encode(body),
                                 headers=self.origin_headers())
        return self.answer(status, raw, self._decision)

    def clear(self, action: str, ip: str | None = None, *, user: str | None = None,
              ip_hash: str | None = None, **subjects: str) -> ClearResult:
        """Delete the counters of a clearable ``action`` for these subjects."""
        body = Check(action, ip, user=user, cost=0, ip_hash=ip_hash, **subjects).body
        try:
            status, raw = self._post("/v1/origin/clear", self._encode(body),
                                     headers=self.origin_headers())
            return self.answer(status, raw, self._clear)
        except SidecarUnavailable as exc:
            log.warning("ratekeeper unavailable, %s not cleared: %s", action, exc)
            return CLEAR_UNAVAILABLE

    def flags(self) -> FlagStates:
        """Every kill switch, reused for ``flags_ttl`` seconds."""
        kept = self.cached_flags()
        if kept is not None:
            return kept
        try:
            status, raw = self._post("/v1/origin/flags", None, "GET", self.origin_headers())
            return self.keep_flags(self.answer(status, raw, self._flag_states))
        except SidecarUnavailable as exc:
            return self.stale_flags(exc)

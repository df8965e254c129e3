"""``AsyncClient``: the origin's client for asyncio apps (aiohttp, one pooled session).

``ratekeeper.client.sync.SyncClient`` is the same API for WSGI apps; the fail policy, errors
and ``Check`` are ``ratekeeper.client.base``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import aiohttp

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

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """The asyncio client: one aiohttp session with pooled keep-alive connections."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT,
                 fail: Mapping[str, FailMode] | None = None, default_fail: FailMode = "open",
                 connections: int = 100, origin_token: str | None = None,
                 flags_ttl: float = DEFAULT_FLAGS_TTL) -> None:
        super().__init__(base_url, timeout=timeout, fail=fail, default_fail=default_fail,
                         origin_token=origin_token, flags_ttl=flags_ttl)
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client_session(self) -> aiohttp.ClientSession:
        # made on first use, inside the running loop, as aiohttp requires
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Content-Type": "application/json"},
            )
        return self._session

    async def _post(self, path: str, body: bytes | None, method: str = "POST",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        try:
            async with self._client_session().request(method, self.base_url + path, data=body,
                                                      headers=headers) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SidecarUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def check(self, action: str, ip: str | None = None, *, user: str | None = None,
                    cost: int = 1, ip_hash: str | None = None, **subjects: str) -> Decision:
        """May this client do ``action`` now? ``cost=0`` only looks."""
        body = Check(action, ip, user=user, cost=cost, ip_hash=ip_hash, **subjects).body
        try:
            status, raw = await self._post("/v1/check", self._encode(body))
            return self.answer(status, raw, self._decision)
        except SidecarUnavailable as exc:
            return self.fallback(action, exc)

    async def batch(self, checks: Iterable[Check]) -> list[Decision]:
        """Several checks in one round trip, answered in order."""
        items = list(checks)
        if not items:
            return []
        try:
            status, raw = await self._post(
                "/v1/check/batch", self._encode({"checks": [c.body for c in items]}))
            return self.answer(status, raw, self._batch).results
        except SidecarUnavailable as exc:
            return self.batch_fallback(items, exc)

    async def refund(self, token: str | Decision) -> RefundResult:
        """Give back what a check took (its Decision or its ``refund`` token), at most once."""
        text = self.token_of(token)
        if text is None:
            return NOTHING_TAKEN
        try:
            status, raw = await self._post("/v1/refund", self._encode({"token": text}))
            return self.answer(status, raw, self._refund)
        except SidecarUnavailable as exc:
            log.warning("ratekeeper unavailable, refund not given: %s", exc)
            return UNAVAILABLE

    async def state(self, action: str, ip: str | None = None, *, user: str | None = None,
                    ip_hash: str | None = None, **subjects: str) -> Decision:
        """What a look at ``action`` answers, from Redis (exact milliseconds); raises
        ClientError, as it is no decision to fall back on."""
        body = Check(action, ip, user=user, cost=0, ip_hash=ip_hash, **subjects).body
        status, raw = await self._post("/v1/origin/state", self._encode(body),
                                       headers=self.origin_headers())
        return self.answer(status, raw, self._decision)

    async def clear(self, action: str, ip: str | None = None, *, user: str | None = None,
                    ip_hash: str | None = None, **subjects: str) -> ClearResult:
        """Delete the counters of a clearable ``action`` for these subjects."""
        body = Check(action, ip, user=user, cost=0, ip_hash=ip_hash, **subjects).body
        try:
            status, raw = await self._post("/v1/origin/clear", self._encode(body),
                                           headers=self.origin_headers())
            return self.answer(status, raw, self._clear)
        except SidecarUnavailable as exc:
            log.warning("ratekeeper unavailable, %s not cleared: %s", action, exc)
            return CLEAR_UNAVAILABLE

    async def flags(self) -> FlagStates:
        """Every kill switch, reused for ``flags_ttl`` seconds."""
        kept = self.cached_flags()
        if kept is not None:
            return kept
        try:
            status, raw = await self._post("/v1/origin/flags", None, "GET",
                                           self.origin_headers())
            return self.keep_flags(self.answer(status, raw, self._flag_states))
        except SidecarUnavailable as exc:
            return self.stale_flags(exc)

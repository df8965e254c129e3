"""Admin page sessions, CSRF tokens and same-origin checks.

A session is a random id in an HttpOnly, SameSite=Strict cookie (Secure over TLS) and a
record in Redis that lives ``SESSION_SECONDS`` (then Redis drops it). The record is stored
under a hash of the id and holds the signed-in token's name, a keyed fingerprint of the
token (never the token), the session's CSRF token and a one-shot flash message. Server-side
rather than a signed cookie, because signing out (or removing a token from the environment)
then ends the session in every process at once, and a copied cookie is worthless afterwards.

Every form carries the session's CSRF token, compared in constant time; the sign-in form,
which has no session yet, carries a double-submit token from its own short-lived cookie.
``Origin`` and ``Sec-Fetch-Site``, when the browser sends them, must say the same origin.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ratekeeper.identity.forwarded import TrustedProxies
from ratekeeper.identity.keys import Keyspace
from ratekeeper.server.auth import Principal
from ratekeeper.settings import AdminToken
from ratekeeper.storage.storecall import store_call

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "SIGNIN_COOKIE", "SIGNIN_SECONDS", "Flash",
           "Session", "Sessions", "clear_cookie", "cross_origin", "is_https", "own_origin",
           "same_token", "set_cookie"]

log = logging.getLogger("ratekeeper.admin.web.app")

SESSION_SECONDS = 8 * 3600  # one working shift; then sign in again
SIGNIN_SECONDS = 3600  # how long a sign-in form stays usable
SESSION_COOKIE = "ratekeeper_admin"
SIGNIN_COOKIE = "ratekeeper_signin"
COOKIE_PATH = "/admin"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
# Sec-Fetch-Site values other than same-origin (Fetch Metadata), as the refusal says them
_SITES = {"cross-site": "another site", "same-site": "another site of this domain",
          "none": "no page (an address typed or bookmarked)"}


class Flash(msgspec.Struct, frozen=True):
    """What the page says once after a form: ``ok`` or ``error`` and one sentence."""

    kind: str
    text: str


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A session as Redis holds it (under a hash of its id)."""

    name: str  # the token's name, for the page and the audit trail
    token: str  # keyed fingerprint of the token that signed in (hex), never the token
    csrf: str
    created_at: float
    flash: Flash | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(SessionRecord).decode


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: who it is, what it may do, the token its forms must carry."""

    id: str
    principal: Principal
    csrf: str
    created_at: float
    flash: Flash | None


class Sessions:
    """Creates, loads and ends sessions in Redis; every Redis failure is StoreUnavailable."""

    def __init__(self, redis: Any, keyspace: Keyspace, admins: Iterable[AdminToken],
                 viewers: Iterable[AdminToken], wall: Callable[[], float],
                 seconds: int = SESSION_SECONDS) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.wall = wall
        self.seconds = seconds
        # keyed, so a Redis dump cannot be checked against guessed tokens offline
        self._secret = keyspace.derived_secret(b"admin-session/v1")
        self._known = [(self.fingerprint(t.token), Principal(t.name, "admin")) for t in admins]
        self._known += [(self.fingerprint(t.token), Principal(t.name, "viewer"))
                        for t in viewers]

    def fingerprint(self, token: str) -> str:
        """A keyed digest of a token, which is all a session keeps of it."""
        data = token.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def _principal(self, fingerprint: str) -> Principal | None:
        found: Principal | None = None
        for known, principal in self._known:
            # every one compared, as in server/auth.py, so timing does not tell which one matched
            if hmac.compare_digest(known, fingerprint) and found is None:
                found = principal
        return found

    async def create(self, principal: Principal, token: str) -> Session:
        """A new session for a token that just authenticated."""
        session_id = secrets.token_urlsafe(32)
        record = SessionRecord(name=principal.name, token=self.fingerprint(token),
                               csrf=secrets.token_urlsafe(32), created_at=self.wall())
        async with store_call():
            await self.redis.set(self.keyspace.session_key(session_id), _encode(record),
                                 ex=self.seconds)
        return Session(id=session_id, principal=principal, csrf=record.csrf,
                       created_at=record.created_at, flash=None)

    async def load(self, session_id: str | None, *, take_flash: bool = False) -> Session | None:
        """The live session with this id, or None (unknown, expired, or its token is gone)."""
        if not session_id or not _ID_RE.match(session_id):
            return None
        key = self.keyspace.session_key(session_id)
        async with store_call():
            raw = await self.redis.get(key)
        if raw is None:
            return None
        try:
            record = _decode(raw)
        except msgspec.DecodeError:
            log.error("ignoring an unreadable admin session in Redis")
            return None
        principal = self._principal(record.token)
        if principal is None or principal.name != record.name:
            # the token was removed or replaced since: the session ends with it
            async with store_call():
                await self.redis.delete(key)
            return None
        if take_flash and record.flash is not None:
            async with store_call():
                await self.redis.set(key, _encode(msgspec.structs.replace(record, flash=None)),
                                     keepttl=True, xx=True)
        return Session(id=session_id, principal=principal, csrf=record.csrf,
                       created_at=record.created_at, flash=record.flash)

    async def flash(self, session: Session, kind: str, text: str) -> None:
        """Leave a message for the next page view of this session."""
        key = self.keyspace.session_key(session.id)
        async with store_call():
            raw = await self.redis.get(key)
            if raw is None:
                return
            record = msgspec.structs.replace(_decode(raw), flash=Flash(kind=kind, text=text))
            await self.redis.set(key, _encode(record), keepttl=True, xx=True)

    async def end(self, session_id: str) -> None:
        """Sign out: the session is gone for every process."""
        async with store_call():
            await self.redis.delete(self.keyspace.session_key(session_id))


def same_token(expected: str, given: str | None) -> bool:
    """A form's CSRF token, compared in constant time."""
    if not given or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _forwarded(request: web.Request, proxies: TrustedProxies, header: str) -> str | None:
    value = request.headers.get(header)
    if not value or not proxies.trusts_peer(request.remote):
        return None
    return value.split(",")[0].strip().lower() or None  # the first hop is the client's view


def is_https(request: web.Request, proxies: TrustedProxies) -> bool:
    """Over TLS here, or at a trusted proxy in front (``X-Forwarded-Proto: https``)."""
    return request.secure or _forwarded(request, proxies, "X-Forwarded-Proto") == "https"


def own_origin(request: web.Request, proxies: TrustedProxies) -> str:
    """``scheme://host[:port]`` as the browser sees this page."""
    scheme = "https" if is_https(request, proxies) else "http"
    host = _forwarded(request, proxies, "X-Forwarded-Host") or request.host.lower()
    return f"{scheme}://{host}"


def cross_origin(request: web.Request, proxies: TrustedProxies) -> str | None:
    """Why a form post did not come from this site, or None when nothing says so."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        # the header is the client's text: it picks one of our sentences, never appears itself
        return f"the browser says the form came from {_SITES.get(site, 'elsewhere')}"
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != own_origin(request, proxies):
        return ("the form's Origin is not this site (behind a proxy, pass the Host or "
                "X-Forwarded-Host header through)")
    return None


def set_cookie(response: web.StreamResponse, name: str, value: str, *, secure: bool,
               max_age: int) -> None:
    """An HttpOnly, SameSite=Strict cookie for the admin pages only (Secure over TLS)."""
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, secure=secure,
                        httponly=True, samesite="Strict")


def clear_cookie(response: web.StreamResponse, name: str, *, secure: bool) -> None:
    """Drop a cookie set by ``set_cookie``."""
    response.set_cookie(name, "", max_age=0, path=COOKIE_PATH, secure=secure, httponly=True,
                        samesite="Strict", expires="Thu, 01 Jan 1970 00:00:00 GMT")

"""Bearer tokens from the environment, compared in constant time.

``RATEKEEPER_ADMIN_TOKENS`` may read and change the admin API; ``RATEKEEPER_VIEWER_TOKENS``
may only read it; ``RATEKEEPER_ORIGIN_TOKEN`` opens the origin's endpoints (``origin.py``). A
token is never logged, stored or echoed: only its name reaches the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ratekeeper.settings import AdminToken

__all__ = ["Principal", "TokenAuth"]

Role = Literal["admin", "viewer"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name and what it may do."""

    name: str
    role: Role

    @property
    def can_write(self) -> bool:
        """True for admin tokens."""
        return self.role == "admin"


def _digest(token: str) -> bytes:
    # fixed-length digests, so the comparison time says nothing about the token's length
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, admins: Iterable[AdminToken], viewers: Iterable[AdminToken] = ()) -> None:
        admins, viewers = list(admins), list(viewers)
        self._known: list[tuple[bytes, Principal]] = [
            (_digest(t.token), Principal(t.name, "admin")) for t in admins
        ] + [(_digest(t.token), Principal(t.name, "viewer")) for t in viewers]
        self._secrets = tuple(t.token for t in admins + viewers)

    @property
    def configured(self) -> bool:
        """False when no token is set, so nobody can use the admin API."""
        return bool(self._known)

    def mentions_token(self, text: str) -> bool:
        """True when free text holds one of the tokens (so it must not be stored)."""
        return any(secret in text for secret in self._secrets)

    def authenticate(self, header: str | None) -> Principal | None:
        """The caller for an Authorization header value, or None."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self._known:
            # compare with every token, matched or not, so timing does not tell which one
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found

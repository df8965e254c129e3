"""Refund tokens: what one check took, signed so that only this deployment can give it back.

A token carries the action, the keyed hash of each of its rules' subjects (the 22-character
hashes that already name Redis keys, never an IP or a user name), the cost, the millisecond the
script took the hits at, and a nonce unique to this process and call. It is signed with keyed
BLAKE2b (a MAC; 128-bit tag) under a key derived from the IP salt, so a forged or altered token
is refused before anything is looked up. A refund re-derives the counter keys from those
hashes and the action's rules in the live config; the signature (unique per token) names the
marker that makes a second refund a no-op.

Format: ``r1.<base64url payload>.<base64url signature>``, about 130 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import os
import re
from collections.abc import Sequence

import msgspec

from ratekeeper.errors import BadRequest
from ratekeeper.identity.keys import b64url, b64url_bytes

__all__ = ["RefundClaim", "RefundSigner"]

VERSION = "r1"
SIGNATURE_BYTES = 16
SUBJECT_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
INVALID = "the refund token is not valid"


class RefundClaim(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a token says was taken: a subject hash per rule, ``cost`` hits at ``at_ms``."""

    action: str
    subjects: list[str]
    cost: int
    at_ms: int
    nonce: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RefundClaim).decode


_b64 = b64url
_PREFIX = f"{VERSION}.".encode("ascii")  # a token is assembled as bytes, decoded once


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class RefundSigner:
    """Issues and opens refund tokens with a key derived from the deployment's salt."""

    __slots__ = ("_counter", "_mac", "_process")

    def __init__(self, key: bytes) -> None:
        if not 16 <= len(key) <= 64:
            raise ValueError("the refund signing key must be 16 to 64 bytes")
        # keyed once: copying a keyed BLAKE2b costs less than keying one per token
        self._mac = hashlib.blake2b(key=key, digest_size=SIGNATURE_BYTES)
        # a nonce is this process's random prefix and a counter: unique, no syscall per check
        self._process = _b64(os.urandom(9))
        self._counter = itertools.count()

    def _sign(self, signed_part: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(signed_part)
        return mac.digest()

    def issue(self, action: str, subjects: Sequence[str], cost: int, at_ms: int) -> str:
        """A token for ``cost`` hits taken at ``at_ms`` from the given rule subjects."""
        return self.issue_bytes(action, subjects, cost, at_ms).decode("ascii")

    def issue_bytes(self, action: str, subjects: Sequence[str], cost: int, at_ms: int
                    ) -> bytes:
        """``issue``'s token as ASCII bytes."""
        nonce = f"{self._process}{next(self._counter):x}"
        # the same array RefundClaim decodes (array_like), without building the struct
        signed = _PREFIX + b64url_bytes(_encode((action, subjects, cost, at_ms, nonce)))
        return signed + b"." + b64url_bytes(self._sign(signed))

    def open(self, token: str) -> tuple[RefundClaim, str]:
        """The claim and a unique id of a genuine token; BadRequest for anything else."""
        version, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if version != VERSION or not payload or not signature:
            raise BadRequest(INVALID)
        signed_part = f"{version}.{payload}"
        try:
            given = _unb64(signature)
            expected = self._sign(signed_part.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise BadRequest(INVALID) from None
        if not hmac.compare_digest(given, expected):
            raise BadRequest(INVALID)
        try:
            claim = _decode(_unb64(payload))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            # signed by us yet unreadable: only a different release could have made it
            raise BadRequest(INVALID) from None
        if (claim.cost < 1 or claim.at_ms < 0 or not claim.subjects
                or not all(SUBJECT_RE.match(s) for s in claim.subjects)):
            raise BadRequest(INVALID)
        return claim, _b64(expected)

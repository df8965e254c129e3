"""Who the client is: the peer, or what a trusted proxy in front of us says it is.

``X-Real-IP`` and ``X-Forwarded-For`` are believed only when the peer that sent them is in the
trusted networks (``RATEKEEPER_TRUSTED_PROXIES``, default loopback); from anyone else they are
ignored, so a client cannot pick its own bucket. ``X-Real-IP`` wins (the adjacent proxy sets it
to the address it saw; of several lines, the last, which the nearest proxy added); in
``X-Forwarded-For`` (every line of it, in order, as one list) the rightmost address that is not
itself a trusted proxy is the client, because every entry left of it could have been sent by
the client. An IPv6 form that embeds an IPv4 address is that IPv4 address (``keys.parse_ip``).

``TrustedProxies.from_headers`` is the one place that reads these headers: ``/v1/authz``, the
admin page's sign-in throttle and the middlewares all ask it, so every path agrees on who the
client is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Protocol

from ratekeeper.identity.keys import Address, parse_ip
from ratekeeper.settings import DEFAULT_TRUSTED_PROXIES

__all__ = ["Address", "Headers", "Network", "TrustedProxies", "parse_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REAL_IP = "X-Real-IP"
FORWARDED_FOR = "X-Forwarded-For"


class Headers(Protocol):
    """Request headers that may repeat (aiohttp's ``CIMultiDictProxy``)."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


def parse_address(text: str | None) -> Address | None:
    """An address as a header or the peer gives it (``[v6]:port`` and ``v4:port`` too); None
    when it is not one."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        return parse_ip(text)
    except ValueError:
        return None


class TrustedProxies:
    """The networks whose forwarding headers are believed."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[Network | str] = DEFAULT_TRUSTED_PROXIES) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
                              for n in networks)

    def trusts(self, address: Address) -> bool:
        """True when ``address`` is one of our proxies."""
        return any(address in network for network in self.networks)

    def trusts_peer(self, peer: str | None) -> bool:
        """True when the peer of a connection is one of our proxies."""
        address = parse_address(peer)
        return address is not None and self.trusts(address)

    def from_headers(self, peer: str | None, headers: Headers, *, real_ip: bool = True
                     ) -> str | None:
        """The client of a request from ``peer`` with these headers (``real_ip=False``: read
        ``X-Forwarded-For`` alone, for a proxy that never sets ``X-Real-IP``)."""
        real = headers.getall(REAL_IP, []) if real_ip else []
        return self.client_ip(peer, real_ip=real[-1] if real else None,
                              forwarded_for=headers.getall(FORWARDED_FOR, []))

    def client_ip(self, peer: str | None, *, real_ip: str | None = None,
                  forwarded_for: str | Iterable[str] | None = None) -> str | None:
        """The client's address as text, or None when even the peer is unknown.

        ``forwarded_for`` is the ``X-Forwarded-For`` value, or each of its lines in order.
        """
        peer_address = parse_address(peer)
        if peer_address is None:
            return None
        if not self.trusts(peer_address):
            return str(peer_address)
        real = parse_address(real_ip)
        if real is not None:
            return str(real)
        if forwarded_for:
            joined = forwarded_for if isinstance(forwarded_for, str) else ",".join(forwarded_for)
            hops = [part for part in joined.split(",") if part.strip()]
            for hop in reversed(hops):
                address = parse_address(hop)
                if address is None:
                    break  # a proxy we trust wrote garbage: believe nothing further left
                if not self.trusts(address):
                    return str(address)
            else:
                if hops:  # every hop is one of ours: the leftmost is the origin of the request
                    first = parse_address(hops[0])
                    if first is not None:
                        return str(first)
        return str(peer_address)

"""Who the client is: the peer, or what a trusted proxy in front of us says it is.

``X-Real-IP`` and ``X-Forwarded-For`` are believed only when the peer that sent them is in the
trusted networks (``RATEKEEPER_TRUSTED_PROXIES``, default loopback); from anyone else they are
ignored, so a client cannot pick its own bucket. ``X-Real-IP`` wins (the adjacent proxy sets it
to the address it saw); in ``X-Forwarded-For`` the rightmost address that is not itself a
trusted proxy is the client, because every entry left of it could have been sent by the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .settings import DEFAULT_TRUSTED_PROXIES

__all__ = ["TrustedProxies"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse(text: str | None) -> Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The networks whose forwarding headers are believed."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[Network | str] = DEFAULT_TRUSTED_PROXIES) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
                              for n in networks)

    def trusts(self, address: Address) -> bool:
        """True when ``address`` is one of our proxies."""
        return any(address in network for network in self.networks)

    def client_ip(self, peer: str | None, *, real_ip: str | None = None,
                  forwarded_for: str | None = None) -> str | None:
        """The client's address as text, or None when even the peer is unknown."""
        peer_address = _parse(peer)
        if peer_address is None:
            return None
        if not self.trusts(peer_address):
            return str(peer_address)
        real = _parse(real_ip)
        if real is not None:
            return str(real)
        if forwarded_for:
            hops = [part for part in forwarded_for.split(",") if part.strip()]
            for hop in reversed(hops):
                address = _parse(hop)
                if address is None:
                    break  # a proxy we trust wrote garbage: believe nothing further left
                if not self.trusts(address):
                    return str(address)
            else:
                if hops:  # every hop is one of ours: the leftmost is the origin of the request
                    first = _parse(hops[0])
                    if first is not None:
                        return str(first)
        return str(peer_address)

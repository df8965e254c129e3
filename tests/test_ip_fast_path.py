"""Keyspace.ip_value's C fast path for dotted-quad IPv4 agrees with ipaddress everywhere."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ratekeeper.config.rules import IPGrouping
from ratekeeper.errors import BadRequest
from ratekeeper.identity.keys import Keyspace

from support.common import SALT

ODD = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3.04", "00.1.2.3",
       "256.1.1.1", "1.2.3", "1.2.3.4.5", " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\x00", "1..3.4", "",
       "0x1.2.3.4", "1.2.3.4/32", "\u0661.2.3.4", "+1.2.3.4", "1.2.3.-4", "1e2.2.3.4"]


def expected(text: str, prefix: int) -> bytes | None:
    """What ipaddress makes of ``text`` (None: refused)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    assert isinstance(address, ipaddress.IPv4Address)
    network = (int(address) >> (32 - prefix)) << (32 - prefix)
    return b"4" + bytes([prefix]) + network.to_bytes(4, "big")


def inputs() -> list[str]:
    rng = random.Random(20_000)
    octets = [*map(str, range(300)), "00", "01", "007", "1a", "", "-1", "+1", "\u0663", " 1"]
    return ODD + [".".join(rng.choice(octets) for _ in range(rng.choice([3, 4, 4, 4, 5])))
                  for _ in range(5_000)]


@pytest.mark.parametrize("prefix", [32, 24, 8])
def test_fast_path_matches_ipaddress(prefix: int) -> None:
    """Every input is normalised to the same bytes, or refused with a 400, as ipaddress does."""
    keyspace = Keyspace(SALT, grouping=IPGrouping(ipv4_prefix=prefix, ipv6_prefix=64))
    for text in inputs():
        want = expected(text, prefix)
        if want is None:
            with pytest.raises(BadRequest):
                keyspace.ip_value(text)
        else:
            assert keyspace.ip_value(text) == want, text

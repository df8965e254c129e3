"""Property tests: IP normalisation and the config parser hold for any input."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ratekeeper.config.rules import config_from_data, parse_config
from ratekeeper.errors import BadRequest, ConfigError
from ratekeeper.identity.keys import Keyspace

KEYSPACE = Keyspace(b"property-test-salt-0123")


def ip_key(text: str) -> str:
    return KEYSPACE.subject([("ip", KEYSPACE.ip_value(text))])


@st.composite
def ipv6_forms(draw: st.DrawFn, value: int) -> str:
    """One of the many ways to write an IPv6 address."""
    groups = [(value >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    texts = [draw(st.sampled_from([f"{g:x}", f"{g:04x}", f"{g:X}", f"{g:04X}"]))
             for g in groups]
    zero_runs = [(i, j) for i in range(8) for j in range(i + 1, 9)
                 if all(g == 0 for g in groups[i:j])]
    if zero_runs and draw(st.booleans()):
        i, j = draw(st.sampled_from(zero_runs))
        text = ":".join(texts[:i]) + "::" + ":".join(texts[j:])
    else:
        text = ":".join(texts)
    if draw(st.booleans()):
        text += "%" + draw(st.sampled_from(["eth0", "1", "lo"]))
    return text


@given(st.integers(min_value=0, max_value=2**128 - 1), st.data())
@settings(max_examples=300)
def test_every_textual_form_of_an_ipv6_address_is_one_key(value: int, data: st.DataObject
                                                          ) -> None:
    """Any spelling of one IPv6 address (case, zeros, '::', zone) gives the same key."""
    canonical = str(ipaddress.IPv6Address(value))
    form = data.draw(ipv6_forms(value))
    assert ip_key(form) == ip_key(canonical)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
@settings(max_examples=300)
def test_every_address_of_one_64_is_one_key(prefix: int, host_a: int, host_b: int) -> None:
    """Two addresses that share their first 64 bits share a key (unless IPv4-mapped)."""
    a = ipaddress.IPv6Address((prefix << 64) | host_a)
    b = ipaddress.IPv6Address((prefix << 64) | host_b)
    if a.ipv4_mapped is None and b.ipv4_mapped is None:
        assert ip_key(str(a)) == ip_key(str(b))


@given(st.integers(min_value=0, max_value=2**32 - 1), st.sampled_from(range(5)))
@settings(max_examples=300)
def test_ipv4_and_its_mapped_forms_are_one_key(value: int, style: int) -> None:
    """Dotted IPv4 and every IPv4-mapped IPv6 spelling of it give the same key."""
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | value)
    forms = [str(v4), f"::ffff:{v4}", str(mapped), mapped.exploded,
             f"0:0:0:0:0:FFFF:{v4}"]
    assert ip_key(forms[style]) == ip_key(str(v4))


@given(st.text(max_size=60))
@settings(max_examples=500)
def test_ip_parsing_only_ever_raises_bad_request(text: str) -> None:
    """Arbitrary text either parses or is a BadRequest that does not repeat it."""
    try:
        KEYSPACE.ip_value(text)
    except BadRequest as exc:
        # one fixed sentence, whatever the input ("add" is in "address", so a substring
        # check fails on inputs that are not echoed at all)
        assert str(exc) == "ip is not a valid IPv4 or IPv6 address"


@given(st.text(max_size=400))
@settings(max_examples=300)
def test_config_text_only_ever_raises_config_error(text: str) -> None:
    """Arbitrary text is a Config or a ConfigError, never another exception."""
    try:
        parse_config(text, source="fuzz.toml")
    except ConfigError as exc:
        assert all(line.startswith("fuzz.toml: ") for line in exc.errors)


WORDS = ["ip", "rules", "actions", "flags", "routes", "limit", "key", "algorithm", "fail",
         "shadow", "penalty", "description", "message", "method", "path", "action", "r", "a",
         "user", "ipv4_prefix", "ipv6_prefix", "sliding-log", "sliding-counter", "open",
         "closed", "5 per minute", "1/second;10/hour", "1 hour", "POST", "/x/*", "", "-1"]
scalars = st.one_of(st.sampled_from(WORDS), st.integers(-5, 300), st.booleans(),
                    st.floats(allow_nan=False), st.text(max_size=10))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(WORDS), inner, max_size=5)),
    max_leaves=30,
)


@given(st.dictionaries(st.sampled_from(WORDS), documents, max_size=6))
@settings(max_examples=500)
def test_config_documents_only_ever_raise_config_error(data: dict[str, Any]) -> None:
    """Any TOML-shaped document (right words, wrong shapes) is a Config or a ConfigError."""
    try:
        config_from_data(data, source="fuzz.toml")
    except ConfigError as exc:
        assert exc.errors and all(line.startswith("fuzz.toml: ") for line in exc.errors)

"""Client addresses: IPv4 embedded in IPv6, one reading of the forwarding headers for every
path, and raw addresses in admin free text found however they are written."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from ratekeeper.identity.forwarded import TrustedProxies
from ratekeeper.identity.keys import Keyspace, contains_ip, parse_ip, unwrap_ipv4

from support.admin import ALICE_TOKEN, admin_settings, call, dump, keys_under
from support.common import SALT
from support.redis_servers import RedisServer

CONFIG = """
[rules.per-ip]
limit = "2 per minute"
key = ["ip"]
[actions.register]
rules = ["per-ip"]
[[routes]]
method = "POST"
path = "/register"
action = "register"
"""
CLIENT = "203.0.113.7"
EMBEDDINGS = ["::ffff:203.0.113.7", "::ffff:cb00:7107",  # IPv4-mapped
              "::ffff:0:203.0.113.7", "::ffff:0:cb00:7107",  # SIIT, IPv4-translated
              "64:ff9b::203.0.113.7", "64:ff9b::cb00:7107",  # NAT64 well-known prefix
              "0064:ff9b:0000:0000:0000:0000:cb00:7107"]
Client = TestClient[Any, Any]


def ip_subject(keyspace: Keyspace, text: str) -> str:
    return keyspace.subject([("ip", keyspace.ip_value(text))])


@pytest.mark.parametrize("form", EMBEDDINGS)
def test_every_ipv6_form_of_an_ipv4_client_is_that_client(form: str) -> None:
    """Mapped, SIIT and NAT64 forms hash to the IPv4 client's subject and parse as it."""
    keyspace = Keyspace(SALT)
    assert ip_subject(keyspace, form) == ip_subject(keyspace, CLIENT)
    assert parse_ip(form) == ipaddress.IPv4Address(CLIENT)


@pytest.mark.parametrize("other", ["64:ff9b::1:203.0.113.7", "64:ff9b:1::203.0.113.7",
                                   "::203.0.113.7", "2002:cb00:7107::1", "::ffff:1:0:0:1"])
def test_addresses_outside_those_prefixes_stay_ipv6(other: str) -> None:
    """Only the three /96 prefixes unwrap; other IPv6 addresses keep their /64 grouping."""
    address = ipaddress.IPv6Address(other)
    assert unwrap_ipv4(address) == address
    keyspace = Keyspace(SALT)
    assert ip_subject(keyspace, other) != ip_subject(keyspace, CLIENT)


async def test_one_ipv4_client_has_one_bucket_whatever_form_it_comes_in(
        make_client: Callable[..., Any]) -> None:
    """Two checks as NAT64 and SIIT forms use up the IPv4 client's limit of 2: its own
    dotted-quad check is denied, and a neighbour in the same /64 of the NAT64 prefix (another
    IPv4 client) is not."""
    client: Client = await make_client(CONFIG)
    for form in ("64:ff9b::203.0.113.7", "::ffff:0:203.0.113.7"):
        resp = await client.post("/v1/check", json={"action": "register", "ip": form})
        assert (await resp.json())["allowed"] is True
    resp = await client.post("/v1/check", json={"action": "register", "ip": CLIENT})
    assert (await resp.json())["reason"] == "rate_limited"
    resp = await client.post("/v1/check", json={"action": "register",
                                                "ip": "64:ff9b::203.0.113.8"})
    assert (await resp.json())["allowed"] is True


async def test_authz_reads_an_embedded_client_as_its_ipv4_address(
        make_client: Callable[..., Any]) -> None:
    """Through /v1/authz too: X-Real-IP in NAT64 form then the dotted quad share a bucket."""
    client: Client = await make_client(CONFIG)
    statuses = []
    for real_ip in ("64:ff9b::cb00:7107", "::ffff:203.0.113.7", CLIENT):
        resp = await client.get("/v1/authz", headers={
            "X-Original-Method": "POST", "X-Original-URI": "/register", "X-Real-IP": real_ip})
        statuses.append(resp.status)
    assert statuses == [204, 204, 429]


# -- one reading of the forwarding headers ---------------------------------------------------

def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_every_forwarded_for_line_is_read_and_the_last_real_ip_wins() -> None:
    """X-Forwarded-For split over several lines is one list; of several X-Real-IP lines the
    nearest proxy's (the last) is believed; an untrusted peer's headers are ignored."""
    proxies = TrustedProxies()
    split = headers(("X-Forwarded-For", "198.51.100.1"),
                    ("X-Forwarded-For", "203.0.113.9, 127.0.0.1"))
    assert proxies.from_headers("127.0.0.1", split) == "203.0.113.9"
    assert proxies.client_ip("127.0.0.1", forwarded_for="198.51.100.1, 203.0.113.9") == \
        "203.0.113.9"
    real = headers(("X-Real-IP", "198.51.100.1"), ("X-Real-IP", "203.0.113.9"))
    assert proxies.from_headers("127.0.0.1", real) == "203.0.113.9"
    assert proxies.from_headers("127.0.0.1", real, real_ip=False) == "127.0.0.1"
    assert proxies.from_headers("192.0.2.1", split) == "192.0.2.1"
    mapped = headers(("X-Forwarded-For", "::ffff:203.0.113.9"))
    assert proxies.from_headers("::ffff:127.0.0.1", mapped) == "203.0.113.9"


@pytest.fixture
async def admin_client(make_client: Callable[..., Any], redis_server: RedisServer,
                       key_prefix: str) -> Client:
    """The service with an admin token (alice)."""
    made: Client = await make_client(CONFIG, app_settings=admin_settings(redis_server.url,
                                                                         key_prefix))
    return made


async def test_sign_in_throttle_reads_every_forwarded_for_line(admin_client: Client) -> None:
    """Failed sign-ins whose X-Forwarded-For comes in two lines, the first one different
    every time (the client's own), count against the client the second line names, as
    /v1/authz would read it: the eleventh try is refused."""
    client = admin_client
    for i in range(11):
        form = await client.get("/admin/signin")
        csrf = (await form.text()).split('name="csrf" value="')[1].split('"')[0]
        forwarded = [("X-Forwarded-For", f"198.51.100.{i}"), ("X-Forwarded-For", "203.0.113.9")]
        resp = await client.post("/admin/signin", allow_redirects=False,
                                 headers=CIMultiDict(forwarded),
                                 data={"csrf": csrf, "token": f"guess-{i}"})
        expected = 429 if i == 10 else 303
        assert resp.status == expected, (i, resp.status)


# -- free text -------------------------------------------------------------------------------

HIDDEN = ["bad:203.0.113.7", "e203.0.113.7", "203.0.113.7a", "203.0.113.007",
          "host a2001:db8::1", "from 0xcb.0.113.7 again", "x2001:0db8:0:0:0:0:0:1y",
          "at [2001:db8::1]:443", "via ::ffff:203.0.113.7", "nat64 64:ff9b::cb00:7107",
          "fe80::1%eth0 link", "203.000.113.7", "ip=203.0.113.7;", "0203.0.113.7",
          "2001:db8::1.", "1.2.3.4.5"]
PLAIN = ["spammer from the usual network", "version 1.2.3", "at 10:30:00", "ratio 3:2",
         "a:b:c", "rule per-ip", "see ticket 12345", ""]


@pytest.mark.parametrize("text", HIDDEN)
def test_an_address_hidden_in_free_text_is_found(text: str) -> None:
    """Letters or punctuation glued on, leading zeros, hex and embedded forms are addresses."""
    assert contains_ip(text)


@pytest.mark.parametrize("text", PLAIN)
def test_text_without_an_address_passes(text: str) -> None:
    """Sentences, short version numbers and times are not addresses."""
    assert not contains_ip(text)


@pytest.mark.parametrize("text", HIDDEN[:6])
async def test_admin_free_text_with_a_hidden_address_is_refused_and_never_stored(
        admin_client: Client, redis: aioredis.Redis, key_prefix: str, text: str) -> None:
    """A ban reason or a flag message with an address in it is a 400 that does not repeat
    it; Redis holds nothing of it afterwards."""
    ban = await call(admin_client, "POST", "/v1/admin/bans", expect=400,
                     json={"ip": "192.0.2.1", "duration": 60, "reason": text})
    assert "IP address" in ban["error"] and text not in ban["error"]
    # (no flags in this config: the reset reason goes through the same check)
    reset = await call(admin_client, "POST", "/v1/admin/reset", expect=400,
                       json={"rule": "per-ip", "ip": "192.0.2.1", "reason": text})
    assert "IP address" in reset["error"]
    assert await keys_under(redis, key_prefix) == []
    blob = await dump(redis, key_prefix)
    assert b"203" not in blob and b"2001" not in blob
    assert ALICE_TOKEN.encode() not in blob

"""``GET /v1/authz`` under arbitrary forwarding headers, against a real server and Redis:
every answer is a defined one (204, 400, 403 or 429), never a 5xx."""

from __future__ import annotations

import socket
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.common import EXAMPLE, SALT
from support.processes import ServerProcess
from support.redis_servers import RedisServer

DEFINED = {200, 204, 400, 403, 404, 429}  # 404: a path that only starts like Envoy's
NO_LINE_BREAK = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
AUTHORITY = st.text(alphabet="[]:@.%-_0123456789abcdefz", max_size=24)
PATH = st.sampled_from(["/legacy/x", "/search/q", "/pypi", "", "/", "?x", "#y", "/%zz",
                        "/%2e%2e/legacy/", "//legacy", "\\legacy\\x"])
URI = st.one_of(
    st.builds(lambda scheme, authority, path: f"{scheme}://{authority}{path}".encode(),
              st.sampled_from(["http", "https", "HTTP", "hTtP", "ftp", "x+y"]), AUTHORITY,
              PATH),
    PATH.map(str.encode),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    NO_LINE_BREAK,
)
ADDRESS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"64:ff9b::{a}"),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:0:{a}"),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:8080"),
    st.text(alphabet="0123456789abcdef:.[]% ", max_size=40),
)
ADDRESS_BYTES = st.one_of(ADDRESS.map(str.encode), NO_LINE_BREAK)
FORWARDED_FOR = st.lists(ADDRESS_BYTES, max_size=4).map(b", ".join)
METHOD = st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"get", b"*"]), NO_LINE_BREAK)


@st.composite
def forwarding_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """nginx's or Traefik's headers, each present or not, some of them repeated."""
    nginx = draw(st.booleans())
    method_name, uri_name = ((b"X-Original-Method", b"X-Original-URI") if nginx
                             else (b"X-Forwarded-Method", b"X-Forwarded-Uri"))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)):
        headers.append((method_name, draw(METHOD)))
    if draw(st.integers(0, 9)):
        headers.append((uri_name, draw(URI)))
    for _ in range(draw(st.integers(0, 2))):
        headers.append((b"X-Real-IP", draw(ADDRESS_BYTES)))
    for _ in range(draw(st.integers(0, 3))):
        headers.append((b"X-Forwarded-For", draw(FORWARDED_FOR)))
    return headers


# Envoy's endpoint: the original path follows the prefix, the method is the request's own
ENVOY_TARGET = st.one_of(
    PATH.map(lambda path: f"/v1/authz/envoy{path}".encode()),
    st.binary(max_size=60).map(lambda b: b"/v1/authz/envoy/" + bytes(
        c for c in b if c > 0x20 and c != 0x7F)),
)
TARGET = st.one_of(st.just(b"/v1/authz"), ENVOY_TARGET)


def status_of(port: int, target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Send one GET ``target`` with ``headers`` on a fresh connection; the answer's status."""
    head = b"GET " + target + b" HTTP/1.1\r\nHost: ratekeeper\r\nConnection: close\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), reply[:200]
    return int(status_line.split(b" ")[1])


def test_authz_never_answers_5xx(serve_process: Callable[..., ServerProcess],
                                 redis_server: RedisServer, key_prefix: str) -> None:
    """Arbitrary X-Original-*/X-Forwarded-* values and client addresses, on /v1/authz and on
    Envoy's /v1/authz/envoy/<path>, against the example config's routes: every answer is a
    defined one (Envoy's allowed is 200); the log holds no traceback."""
    server = serve_process(EXAMPLE.read_text(), {"RATEKEEPER_REDIS_URL": redis_server.url,
                                                 "RATEKEEPER_IP_SALT": SALT.decode(),
                                                 "RATEKEEPER_KEY_PREFIX": key_prefix})
    seen: set[int] = set()

    @given(target=TARGET, headers=forwarding_headers())
    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        status = status_of(server.port, target, headers)
        seen.add(status)
        assert status in DEFINED, (status, headers)

    run()
    assert {204, 400} <= seen
    assert "Traceback" not in server.log.read_text()

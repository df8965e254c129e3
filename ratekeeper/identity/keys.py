"""Identity and Redis keys: the only module that sees a raw IP or formats a key.

A subject (an IP, a user, a project, or a combination a rule keys on) becomes a keyed hash:
HMAC-SHA256 with the secret salt over length-prefixed ``field=value`` parts, truncated to
128 bits and written as 22 base64url characters. IPs are normalised first (an IPv6 form that
embeds an IPv4 client is that IPv4 client, see ``unwrap_ipv4``; IPv6 is grouped to its /64 by
default), so every textual form of one client and every address of one /64 give one subject.
The hash is the Redis Cluster hash tag of every key of that subject, so all of a subject's keys
live in one slot.

During a salt rotation a Keyspace also knows the previous salt (``previous``): the same keys
under the hashes of the old salt, which ``rotation`` still honours for a grace period.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping

from ratekeeper.config.rules import IPGrouping, Rule
from ratekeeper.errors import BadRequest

__all__ = ["Address", "Keyspace", "SubjectParts", "contains_ip", "is_subject_hash", "parse_ip",
           "unwrap_ipv4"]

# (field, normalised value bytes) pairs, in the order of a rule's key
SubjectParts = Iterable[tuple[str, bytes]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DIGEST_BYTES = 16  # 128 bits kept of the HMAC-SHA256
SHA256_BLOCK = 64  # bytes: HMAC pads (or first hashes) its key to this
_IPAD = bytes(b ^ 0x36 for b in range(256))  # (bytes.translate tables: each byte XOR pad)
_OPAD = bytes(b ^ 0x5C for b in range(256))
# Recently seen IP texts and subjects, per process: a request hashes its IP subject twice (its
# ban key and its rule key) and a flood repeats a few subjects, so most lookups hit. Bounded,
# and emptied when full; it lives in process memory only, like the request itself.
CACHE_ENTRIES = 1 << 14
SUBJECT_HASH_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
# The high 96 bits of the IPv6 forms that embed an IPv4 address in their low 32 bits:
# IPv4-mapped ::ffff:0:0/96 (RFC 4291), SIIT's IPv4-translated ::ffff:0:0:0/96 (RFC 2765) and
# NAT64's well-known prefix 64:ff9b::/96 (RFC 6052).
_EMBEDDING = frozenset({0xFFFF, 0xFFFF_0000, 0x64_FF9B << 64})
# Free text: dotted runs of numbers (an IPv4 address among them, however written), and runs of
# the characters of an IPv6 literal with at least two colons.
_DOTTED_RE = re.compile(r"(?:0[xX][0-9A-Fa-f]+|[0-9]+)(?:\.(?:0[xX][0-9A-Fa-f]+|[0-9]+)){3,}")
_DOTTED_PART_RE = re.compile(r"0[xX][0-9A-Fa-f]+|[0-9]+")
_COLON_RUN_RE = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
IPV6_TEXT_MAX = 45  # characters of the longest IPv6 literal, an IPv4 tail included
_HEX = frozenset("0123456789abcdefABCDEF")


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url_bytes(raw: bytes) -> bytes:
    """``raw`` in unpadded base64url (``base64.urlsafe_b64encode`` without the padding)."""
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_URLSAFE)


def b64url(raw: bytes) -> str:
    """``b64url_bytes`` as text."""
    return b64url_bytes(raw).decode("ascii")


def is_subject_hash(text: str) -> bool:
    """True when ``text`` looks like a subject hash (22 base64url characters)."""
    return SUBJECT_HASH_RE.match(text) is not None


def unwrap_ipv4(address: Address) -> Address:
    """The IPv4 address an IPv6 form embeds (IPv4-mapped ``::ffff:a.b.c.d``, SIIT
    ``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``); any other address unchanged.

    Each of them is that IPv4 client seen through a dual stack or a translator, so it must
    share the IPv4 client's bucket rather than make another by its /64.
    """
    if isinstance(address, ipaddress.IPv6Address):
        value = int(address)
        if value >> 32 in _EMBEDDING:
            return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    return address


def parse_ip(text: str) -> Address:
    """An IP literal as the client it names (``unwrap_ipv4``); ValueError when it is none."""
    return unwrap_ipv4(ipaddress.ip_address(text))


def _dotted_ipv4(run: str) -> bool:
    """True when four consecutive parts of a dotted run are each a byte (decimal with any
    leading zeros, or hex): what ``inet_aton`` and many tools read as an IPv4 address."""
    values = [int(part, 0) if part[:2] in ("0x", "0X") else int(part)
              for part in _DOTTED_PART_RE.findall(run)]
    fits = [value <= 255 for value in values]
    return any(all(fits[i:i + 4]) for i in range(len(fits) - 3))


def _ipv6_within(run: str) -> bool:
    """True when any stretch of ``run`` is an IPv6 literal with a hex digit in it."""
    for start in range(len(run) - 1):
        first_colon = run.find(":", start)
        if first_colon < 0:
            break
        if first_colon - start > 4:  # a group has at most four hex digits
            continue
        for end in range(min(len(run), start + IPV6_TEXT_MAX), first_colon, -1):
            candidate = run[start:end]
            tail = candidate[candidate.rfind(":") + 1:]
            if (len(tail) > 4 and "." not in tail) or candidate.count(":") < 2 \
                    or not any(c in _HEX for c in candidate):
                continue
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            return True
    return False


def contains_ip(text: str) -> bool:
    """True when free text (a reason, a message) holds an IPv4 or IPv6 address anywhere.

    Admin free text goes to Redis and the audit trail, where no raw IP may ever go. Letters
    or punctuation glued to an address do not hide it (``bad:203.0.113.7``, ``e203.0.113.7``,
    ``203.0.113.7a``, ``a2001:db8::1``), nor do leading zeros or hex parts
    (``203.0.113.007``, ``0xcb.0.113.7``); an IPv4 address inside an IPv6 form is found as
    the IPv4 address it is. A version number of four parts is refused too: a false alarm
    costs the admin a rewording, a miss a stored address.
    """
    if any(_dotted_ipv4(m.group(0)) for m in _DOTTED_RE.finditer(text)):
        return True
    return any(_ipv6_within(m.group(0)) for m in _COLON_RUN_RE.finditer(text))


class Keyspace:
    """Turns subjects into salted hashes and hashes into Redis key names."""

    __slots__ = ("_grouping", "_inner", "_ips", "_outer", "_rule_tags", "_salt", "_subjects",
                 "prefix", "previous")

    def __init__(self, salt: bytes, *, prefix: str = "rk", grouping: IPGrouping | None = None,
                 previous_salt: bytes | None = None) -> None:
        if not salt:
            raise ValueError("the IP salt must not be empty")
        self._salt = salt
        self.prefix = prefix
        self._grouping = grouping or IPGrouping()
        self._rule_tags: dict[tuple[str, str], str] = {}
        # HMAC-SHA256 keyed once (RFC 2104): its inner and outer hashes, copied per subject;
        # two hashlib copies cost less than copying an hmac.HMAC, which keys nothing anew
        # but goes through Python (0.66 against 1.09 us per subject)
        key = (hashlib.sha256(salt).digest() if len(salt) > SHA256_BLOCK else salt).ljust(
            SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))
        self._ips: dict[str, bytes] = {}
        self._subjects: dict[tuple[tuple[str, bytes], ...], str] = {}
        # the same keyspace under the salt before the last rotation, while it is honoured
        self.previous = (Keyspace(previous_salt, prefix=prefix, grouping=self._grouping)
                         if previous_salt else None)

    # -- identity --------------------------------------------------------------------------

    def ip_value(self, text: str) -> bytes:
        """Normalise an IP literal to the bytes that identify its client group.

        This is the only function that holds a raw IP; what it returns is the masked network,
        which is hashed before it goes anywhere. Errors never repeat the input.
        """
        cached = self._ips.get(text)
        if cached is not None:
            return cached
        value = self._ip_value(text)
        if len(self._ips) >= CACHE_ENTRIES:
            self._ips.clear()
        self._ips[text] = value
        return value

    def _ip_value(self, text: str) -> bytes:
        if ":" not in text:
            # Dotted-quad IPv4, the common case, parsed in C: inet_pton accepts exactly what
            # ipaddress does (four decimal octets, no leading zeros); anything it refuses
            # goes the long way below, which gives the error.
            try:
                packed = socket.inet_pton(socket.AF_INET, text)
            except (OSError, UnicodeError, ValueError):
                pass
            else:
                prefix = self._grouping.ipv4_prefix
                network = (int.from_bytes(packed, "big") >> (32 - prefix)) << (32 - prefix)
                return b"4" + bytes([prefix]) + network.to_bytes(4, "big")
        try:
            address = parse_ip(text)
        except ValueError:
            raise BadRequest("ip is not a valid IPv4 or IPv6 address") from None
        if isinstance(address, ipaddress.IPv4Address):
            bits, prefix, tag = 32, self._grouping.ipv4_prefix, b"4"
        else:
            bits, prefix, tag = 128, self._grouping.ipv6_prefix, b"6"
        network = (int(address) >> (bits - prefix)) << (bits - prefix)
        return tag + bytes([prefix]) + network.to_bytes(bits // 8, "big")

    @staticmethod
    def ip_hash_value(text: str) -> bytes:
        """An already-hashed IP (e.g. the CDN's): re-keyed so a dump can't be joined with it."""
        return b"h" + text.encode("utf-8", "surrogatepass")

    @staticmethod
    def text_value(text: str) -> bytes:
        """Any other subject value (user, project, ...)."""
        return text.encode("utf-8", "surrogatepass")

    def subject(self, parts: SubjectParts) -> str:
        """The keyed hash of a subject: 22 base64url characters (128 bits)."""
        key = tuple(parts)
        cached = self._subjects.get(key)
        if cached is not None:
            return cached
        inner = self._inner.copy()
        for field, value in key:
            inner.update(b"%s\x00%d\x00%s" % (field.encode(), len(value), value))
        outer = self._outer.copy()
        outer.update(inner.digest())
        subject = b64url(outer.digest()[:DIGEST_BYTES])
        if len(self._subjects) >= CACHE_ENTRIES:
            self._subjects.clear()
        self._subjects[key] = subject
        return subject

    def derived_secret(self, purpose: bytes) -> bytes:
        """A secret for another use (e.g. signing refund tokens), derived from the salt."""
        return hmac.digest(self._salt, b"ratekeeper derived secret\x00" + purpose, hashlib.sha256)

    # -- key names -------------------------------------------------------------------------

    def rule_tag(self, rule: Rule) -> str:
        """A short stable tag for a rule; a new algorithm gets a new tag (the key type differs)."""
        cache_key = (rule.name, rule.algorithm)
        tag = self._rule_tags.get(cache_key)
        if tag is None:
            raw = hashlib.blake2s(f"{rule.name}\x00{rule.algorithm}".encode(), digest_size=5)
            tag = base64.b32encode(raw.digest()).decode("ascii").lower()
            self._rule_tags[cache_key] = tag
        return tag

    def key_parts(self, rule: Rule | None = None) -> tuple[str, str, str]:
        """What surrounds a subject in its key names, for building many: ``head + subject +
        tail`` is its ban key (no ``rule``) or the rule's counter key, ``head + subject +
        penalty_tail`` the rule's penalty key (the methods below are built on it)."""
        head = f"{self.prefix}:{{"
        if rule is None:
            return head, "}:b", ""
        tag = self.rule_tag(rule)
        return head, f"}}:{tag}", f"}}:{tag}:p"

    def counter_key(self, subject: str, rule: Rule) -> str:
        """Where a rule keeps its hits for one subject (a LIST for the log, a STRING counter)."""
        head, tail, _ = self.key_parts(rule)
        return head + subject + tail

    def penalty_key(self, subject: str, rule: Rule) -> str:
        """Present while a subject sits in a rule's penalty box."""
        head, _, penalty_tail = self.key_parts(rule)
        return head + subject + penalty_tail

    def ban_key(self, subject: str) -> str:
        """Present while a subject is banned; its TTL is the ban's remaining time."""
        head, tail, _ = self.key_parts()
        return head + subject + tail

    def signin_key(self, subject: str) -> str:
        """Failed admin-page sign-ins from one client (a counter with the window's TTL)."""
        return f"{self.prefix}:{{{subject}}}:signin"

    def refund_key(self, subject: str, token_id: str) -> str:
        """Present once a refund token was used; lives as long as the hits it gave back."""
        return f"{self.prefix}:{{{subject}}}:r:{token_id}"

    def subject_ban_keys(self, values: Mapping[str, bytes]) -> list[str]:
        """The ban key of each single-field subject of a request."""
        return [self.ban_key(self.subject(((field, value),))) for field, value in values.items()]

    def rule_keys(self, rule: Rule, values: Mapping[str, bytes]) -> tuple[str, str]:
        """A rule's state key and penalty key for the subjects of a request."""
        subject = self.subject((field, values[field]) for field in rule.key)
        return self.counter_key(subject, rule), self.penalty_key(subject, rule)

    # -- admin state: one hash tag each, so every one of them is a single slot on a cluster --

    def flags_key(self) -> str:
        """A HASH of every flag that was ever set: name -> its state as JSON."""
        return f"{self.prefix}:{{flags}}"

    def ban_index_key(self) -> str:
        """A HASH listing active bans: ban id (the subject hash) -> the ban as JSON."""
        return f"{self.prefix}:{{bans}}"

    def audit_key(self) -> str:
        """The capped STREAM of admin events."""
        return f"{self.prefix}:{{audit}}"

    def top_key(self, rule: Rule, bucket: int | str) -> str:
        """A ZSET of denials per subject hash of one rule in one minute (or a query's sum)."""
        return f"{self.prefix}:{{top.{self.rule_tag(rule)}}}:{bucket}"

    def session_key(self, session_id: str) -> str:
        """An admin page session (a STRING with a TTL), named by a hash of its id.

        The cookie holds the id; Redis only its SHA-256, so reading Redis yields no session.
        """
        digest = hashlib.sha256(session_id.encode("ascii", "replace")).digest()[:DIGEST_BYTES]
        name = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        return f"{self.prefix}:{{session}}:{name}"

    def decisions_key(self, second: int) -> str:
        """A counter of the decisions every process made in one Unix second (admin page)."""
        return f"{self.prefix}:{{decisions}}:{second}"

    # -- the traffic picture and the tripwires: one hash tag, so one script call reaches all --

    def traffic_minute_key(self, minute: int) -> str:
        """A HASH of every process's decisions in one minute (``minute``: Unix seconds // 60):
        ``<action>|<category>`` and ``rule|<rule>|<category>`` -> count."""
        return f"{self.prefix}:{{traffic}}:m:{minute}"

    def tripwires_disarmed_key(self) -> str:
        """A HASH of the disarmed tripwires: name -> who disarmed it, when and why (JSON)."""
        return f"{self.prefix}:{{traffic}}:disarmed"

    def tripwire_counter_key(self, name: str) -> str:
        """A tripwire's counter: a HASH of window bucket -> decisions."""
        return f"{self.prefix}:{{traffic}}:tw:{name}"

    def tripwire_trip_key(self, name: str) -> str:
        """Present while a tripwire is tripped (a STRING whose TTL is the trip's duration)."""
        return f"{self.prefix}:{{traffic}}:trip:{name}"

    def events_channel(self) -> str:
        """The pub/sub channel on which admin changes reach every process."""
        return f"{self.prefix}:events"

"""Identity: normalisation and keyed hashing of subjects, and key names."""

from __future__ import annotations

import ipaddress

import pytest

from ratekeeper.config.rules import IPGrouping, Rule, Window
from ratekeeper.errors import BadRequest
from ratekeeper.identity.keys import Keyspace

SALT = b"0123456789abcdef-salt"


def ip_subject(keyspace: Keyspace, text: str) -> str:
    return keyspace.subject([("ip", keyspace.ip_value(text))])


@pytest.mark.parametrize("forms", [
    ["192.0.2.1", "::ffff:192.0.2.1", "::ffff:c000:201", "0:0:0:0:0:ffff:c000:0201"],
    ["2001:db8::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:DB8::1",
     "2001:db8:0:0::1", "2001:db8::ffff:ffff:ffff:ffff", "2001:db8::1%eth0"],
])
def test_every_form_of_one_client_is_one_subject(forms: list[str]) -> None:
    """Textual forms, IPv4-mapped IPv6 and addresses in one /64 hash alike."""
    keyspace = Keyspace(SALT)
    assert len({ip_subject(keyspace, f) for f in forms}) == 1


def test_other_64s_and_other_addresses_differ() -> None:
    """The next /64 and the next IPv4 address are other subjects."""
    keyspace = Keyspace(SALT)
    assert ip_subject(keyspace, "2001:db8:0:1::1") != ip_subject(keyspace, "2001:db8:0:2::1")
    assert ip_subject(keyspace, "192.0.2.1") != ip_subject(keyspace, "192.0.2.2")


def test_prefixes_are_configurable() -> None:
    """A /48 grouping joins /64s; a /24 IPv4 grouping joins neighbours."""
    keyspace = Keyspace(SALT, grouping=IPGrouping(ipv4_prefix=24, ipv6_prefix=48))
    assert ip_subject(keyspace, "2001:db8:0:1::1") == ip_subject(keyspace, "2001:db8:0:2::1")
    assert ip_subject(keyspace, "192.0.2.1") == ip_subject(keyspace, "192.0.2.200")
    assert ip_subject(Keyspace(SALT), "192.0.2.1") != ip_subject(keyspace, "192.0.2.1")


def test_salt_keys_the_hash_and_128_bits_are_kept() -> None:
    """Another salt gives another hash; a hash is 22 base64url characters."""
    one, two = Keyspace(SALT), Keyspace(SALT + b"x")
    assert ip_subject(one, "192.0.2.1") != ip_subject(two, "192.0.2.1")
    digest = ip_subject(one, "192.0.2.1")
    assert len(digest) == 22
    assert set(digest) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_ip_hash_and_user_are_domain_separated() -> None:
    """An ip_hash, a user and an ip with the same text never share a bucket."""
    keyspace = Keyspace(SALT)
    text = "192.0.2.1"
    subjects = {
        ip_subject(keyspace, text),
        keyspace.subject([("ip", keyspace.ip_hash_value(text))]),
        keyspace.subject([("user", keyspace.text_value(text))]),
    }
    assert len(subjects) == 3
    # parts are length-prefixed: ("ab", "c") and ("a", "bc") differ
    assert keyspace.subject([("user", b"ab"), ("project", b"c")]) != keyspace.subject(
        [("user", b"a"), ("project", b"bc")])


@pytest.mark.parametrize("bad", ["192.0.2.300", "1.2.3", "example.org", "", " 192.0.2.1",
                                 "192.0.2.1/24", "[::1]", "::1::2"])
def test_bad_ips_are_bad_requests_that_do_not_echo(bad: str) -> None:
    """Anything but an IP literal is a BadRequest whose message does not repeat it."""
    with pytest.raises(BadRequest) as caught:
        Keyspace(SALT).ip_value(bad)
    assert bad.strip() == "" or bad.strip() not in str(caught.value)


def test_keys_share_the_subject_hash_tag() -> None:
    """Counter, penalty and ban keys of one subject share a cluster hash tag."""
    keyspace = Keyspace(SALT, prefix="rk")
    rule = Rule(name="login-ip", windows=(Window(10, 300),), key=("ip",))
    subject = ip_subject(keyspace, "192.0.2.1")
    keys = [keyspace.counter_key(subject, rule), keyspace.penalty_key(subject, rule),
            keyspace.ban_key(subject)]
    assert {k.split("{")[1].split("}")[0] for k in keys} == {subject}
    assert all(k.startswith("rk:") for k in keys)
    counter = Rule(name="login-ip", windows=(Window(10, 300),), key=("ip",),
                   algorithm="sliding-counter")
    assert keyspace.counter_key(subject, rule) != keyspace.counter_key(subject, counter)


@pytest.mark.parametrize("prefix", ["rk", "pypi-prod", "x:y"])
def test_key_parts_build_the_documented_names(prefix: str) -> None:
    """A subject's keys are ``<prefix>:{<subject>}:b`` (ban), ``...:<rule tag>`` (counter)
    and ``...:<rule tag>:p`` (penalty box), whether built from the parts a check uses or by
    the methods (which are built on them)."""
    keyspace = Keyspace(SALT, prefix=prefix)
    subject = ip_subject(keyspace, "2001:db8::1")
    head, tail, _ = keyspace.key_parts()
    assert head + subject + tail == keyspace.ban_key(subject) == f"{prefix}:{{{subject}}}:b"
    for algorithm in ("sliding-log", "sliding-counter"):
        rule = Rule(name="upload-ip", windows=(Window(10, 300),), key=("ip",),
                    algorithm=algorithm)
        tag = keyspace.rule_tag(rule)
        head, tail, penalty_tail = keyspace.key_parts(rule)
        assert head + subject + tail == keyspace.counter_key(subject, rule) == (
            f"{prefix}:{{{subject}}}:{tag}")
        assert head + subject + penalty_tail == keyspace.penalty_key(subject, rule) == (
            f"{prefix}:{{{subject}}}:{tag}:p")


@pytest.mark.parametrize("prefix", ["rk", "pypi-prod"])
def test_traffic_and_tripwire_keys_share_one_hash_tag(prefix: str) -> None:
    """The traffic picture's minutes and every tripwire's counter, trip and the disarmed list
    are ``<prefix>:{traffic}:...``: one cluster slot, so one script call reaches them all;
    two tripwires never share a key."""
    keyspace = Keyspace(SALT, prefix=prefix)
    keys = [keyspace.traffic_minute_key(29_000_000), keyspace.tripwires_disarmed_key(),
            keyspace.tripwire_counter_key("project-flood"),
            keyspace.tripwire_trip_key("project-flood"),
            keyspace.tripwire_counter_key("register-flood")]
    assert keys == [f"{prefix}:{{traffic}}:m:29000000", f"{prefix}:{{traffic}}:disarmed",
                    f"{prefix}:{{traffic}}:tw:project-flood",
                    f"{prefix}:{{traffic}}:trip:project-flood",
                    f"{prefix}:{{traffic}}:tw:register-flood"]


def test_network_bytes_never_hold_host_bits() -> None:
    """What ip_value returns for IPv6 carries only the /64 network."""
    value = Keyspace(SALT).ip_value("2001:db8:1:2:aaaa:bbbb:cccc:dddd")
    assert value[2:] == ipaddress.IPv6Address("2001:db8:1:2::").packed


def test_subject_hashes_never_change_between_releases() -> None:
    """Pinned vectors (HMAC-SHA256 over length-prefixed field=value parts, 128 bits, base64url):
    a change here would rename every counter, ban and penalty key at the next deploy."""
    import base64
    import hashlib
    import hmac

    salt = b"pinned-salt-for-a-test-vector-01"
    keyspace = Keyspace(salt)
    ip = keyspace.ip_value("192.0.2.1")
    assert keyspace.subject((("ip", ip),)) == "F-hNpXx_GZejF0OOPbMOAQ"
    pair = (("user", b"alice"), ("project", b"numpy"))
    assert keyspace.subject(pair) == "ym2BTqi6cACF6rwBaRILNg"
    # and the definition, written out
    mac = hmac.new(salt, b"user\x005\x00alice" b"project\x005\x00numpy", hashlib.sha256)
    assert base64.urlsafe_b64encode(mac.digest()[:16]).rstrip(b"=").decode() == (
        "ym2BTqi6cACF6rwBaRILNg")


@pytest.mark.parametrize("length", [1, 31, 64, 65, 200])
def test_subject_hashes_are_hmac_sha256_for_any_salt_length(length: int) -> None:
    """Keyspace computes HMAC from its own inner and outer hashes: it agrees with the hmac
    module for salts shorter than, as long as and longer than SHA-256's block (which
    HMAC hashes first)."""
    import base64
    import hashlib
    import hmac

    salt = bytes((7 + i) % 256 for i in range(length))
    keyspace = Keyspace(salt)
    for parts in ((("ip", b"4 \xc0\x00\x02\x01"),), (("user", b"alice"), ("project", b"x"))):
        message = b"".join(b"%s\x00%d\x00%s" % (f.encode(), len(v), v) for f, v in parts)
        mac = hmac.new(salt, message, hashlib.sha256).digest()[:16]
        assert keyspace.subject(parts) == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


STAGED = """
[rules.boxed]
limit = "5 per minute"
key = ["ip"]
penalty = "10 minutes"
[rules.log]
limit = "3 per minute, 10 per hour"
key = ["ip"]
algorithm = "sliding-log"
[rules.watch]
limit = "1 per minute"
key = ["ip"]
shadow = true
[rules.pair]
limit = "2 per minute"
key = ["ip", "user"]
penalty = "1 minute"
[actions.ip-only]
rules = ["boxed", "log", "watch"]
[actions.mixed]
rules = ["boxed", "pair"]
"""


@pytest.mark.parametrize("shadow_all", [False, True])
@pytest.mark.parametrize(("action", "user"), [("ip-only", None), ("ip-only", "alice"),
                                              ("mixed", "alice")])
def test_a_staged_check_names_the_keys_the_methods_name(action: str, user: str | None,
                                                        shadow_all: bool) -> None:
    """Whether its action keys every rule on one field (``ActionPlan.one_field``: key names
    from per-plan tails) or not, a check stages its ban keys, then each rule's counter key
    and, for an enforced penalty rule outside global shadow mode, its penalty key."""
    from ratekeeper.decision.checker import Checker, Pending
    from ratekeeper.decision.flags import FlagBoard

    from support.common import config_from

    config = config_from(STAGED)
    keyspace = Keyspace(SALT, prefix="pk")
    checker = Checker(config, keyspace, None, FlagBoard(config.flags))  # type: ignore[arg-type]
    checker.shadow_all = shadow_all
    values = {"ip": keyspace.ip_value("192.0.2.1")}
    if user is not None:
        values["user"] = keyspace.text_value(user)
    stage = checker._stage(checker.plans[action], values, 1)
    assert isinstance(stage, Pending)
    expected = [keyspace.ban_key(keyspace.subject(((field, value),)))
                for field, value in values.items()]
    for rule in config.actions[action].rules:
        subject = keyspace.subject(tuple((field, values[field]) for field in rule.key))
        expected.append(keyspace.counter_key(subject, rule))
        if rule.penalty and not rule.shadow and not shadow_all:
            expected.append(keyspace.penalty_key(subject, rule))
    keys, cost, n_bans, n_rules, _ = stage.call
    assert (keys, cost, n_bans, n_rules) == (expected, 1, len(values),
                                             len(config.actions[action].rules))
    assert stage.ban_fields == list(values)

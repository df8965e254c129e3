"""Allowed answers made from an action's form (allowed.py) are the bytes the usual way makes:
a Decision encoded by msgspec, its RateLimit headers, answers.wire_head."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ratekeeper.allowed import _MARK, AllowedForm
from ratekeeper.answers import JSON, wire_head, wire_tail
from ratekeeper.config import load_config
from ratekeeper.headers import rate_limit_headers
from ratekeeper.keys import Keyspace
from ratekeeper.limiter import parse_outcome
from ratekeeper.service import Checker, reply_figures

from conftest import config_from

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCH = ROOT / "loadtest" / "bench.toml"

Windows = list[tuple[str, int, int]]

CONFIGS = {
    "one window": """
[rules.login]
limit = "10 per minute"
key = ["ip"]
[actions.login]
rules = ["login"]
""",
    "two windows": """
[rules.bench-ip]
limit = "1000 per hour, 10000 per day"
key = ["ip"]
[actions.check]
rules = ["bench-ip"]
""",
    "three rules, log and counter": """
[rules."up.load_1"]
limit = "20 per minute, 100 per hour"
key = ["ip"]
[rules.user]
limit = "3 per 10 seconds"
key = ["user"]
algorithm = "sliding-log"
[rules.pair]
limit = "1 per second"
key = ["ip", "user"]
[actions.upload]
rules = ["up.load_1", "user", "pair"]
""",
}


def random_reply(rng: random.Random, n_windows: int) -> list[int]:
    reply = [1, rng.randrange(1 << 41), 0, 0, 0]
    for _ in range(n_windows):
        # remaining and reset: zero, negative (a cost over the limit in shadow), any size
        reply += [rng.choice([0, -3, 1, rng.randrange(10**9)]),
                  rng.choice([0, -1, 1, 999, 1000, 1001, rng.randrange(10**12)]), 0]
    return reply


@pytest.mark.parametrize("name", list(CONFIGS))
def test_form_answers_are_the_usual_bytes(name: str) -> None:
    """Five hundred random replies per action: the form's answer and the usual way's
    (Checker.decision, then the server's DenialBodies.wire) are equal, byte for byte."""
    from ratekeeper.server import DenialBodies

    checker = Checker(config_from(CONFIGS[name]), Keyspace(b"s" * 32),
                      None, None)  # type: ignore[arg-type]
    (plan,) = checker.plans.values()
    form = plan.allowed
    assert form is not None and form.size == 5 + 3 * len(plan.windows)
    rng = random.Random(name)
    bodies = DenialBodies()
    for _ in range(500):
        reply = random_reply(rng, len(plan.windows))
        token = b"r1." + bytes(rng.choice(b"abcXYZ019_-") for _ in range(90)) + b".sig"
        usual = bodies.wire(checker.decision(plan, parse_outcome(reply), token.decode()))
        made = form.wire(reply_figures(reply), token)
        if made != usual and wire_tail() not in usual:  # the Date's second ticked between
            usual = bodies.wire(checker.decision(plan, parse_outcome(reply), token.decode()))
        assert made == usual, reply
        assert usual.endswith(form.body(reply_figures(reply), token))


def test_figures_are_shown_as_answers_show_them() -> None:
    """Per window: hits left never below 0, reset in whole seconds rounded up, 0 when
    nothing is counted."""
    reply = [1, 5, 0, 0, 0, -3, 1001, 0, 7, 1000, 0, 0, 0, 0, 4, -1, 0]
    assert reply_figures(reply) == [0, 2, 7, 1, 0, 0, 4, 0]


def test_a_percent_sign_or_quote_in_a_name_is_kept_as_the_encoder_writes_it() -> None:
    """Names come from the config (no '%' or '"' there today); the form escapes its own
    format characters and keeps JSON's escaping, so such a name would still come out right."""
    windows: Windows = [('10%"off', 5, 60)]
    form = AllowedForm.of('act%"ion', windows)
    assert form is not None
    reply = [1, 5, 0, 0, 0, 4, 60000, 0]
    body = form.body(reply_figures(reply), b"tok")
    assert b'"action":"act%\\"ion"' in body and b'"rule":"10%\\"off"' in body
    headers = rate_limit_headers_for(windows)
    assert form.wire(reply_figures(reply), b"tok").startswith(wire_head(200, headers, len(body)))


def rate_limit_headers_for(windows: Windows) -> dict[str, str]:
    from ratekeeper.wire import Decision, LimitState

    decision = Decision(allowed=True, reason=None, action="x", refund="tok",
                        limits=[LimitState(rule, limit, seconds, 4, 60)
                                for rule, limit, seconds in windows])
    headers = rate_limit_headers(decision)
    headers["Content-Type"] = JSON
    return headers


def test_no_form_when_a_marker_is_part_of_a_name() -> None:
    """A name that holds a marker's digits cannot be cut into a form: None, and the usual way
    answers that action."""
    assert AllowedForm.of(f"a{_MARK}", [("r", 1, 1)]) is None
    assert AllowedForm.of("a", [(f"r{_MARK + 1}", 1, 1)]) is None
    assert AllowedForm.of("a", [("r\n", 1, 1)]) is None  # (config refuses such names)


def test_every_action_of_the_example_configs_has_a_form() -> None:
    for path in [*sorted(EXAMPLES.glob("*.toml")), BENCH]:
        checker = Checker(load_config(str(path)), Keyspace(b"s" * 32),
                          None, None)  # type: ignore[arg-type]
        assert checker.plans, path
        assert all(plan.allowed is not None for plan in checker.plans.values()), path

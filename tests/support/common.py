"""What the tests share: the salt, the rules they use most, a clock they drive, a config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

from ratekeeper.config.rules import Config, parse_config

__all__ = [
    "EXAMPLE",
    "ONE_RULE",
    "ROOT",
    "SALT",
    "TEST_DEADLINE_MS",
    "FakeClock",
    "close_opened",
    "config_from",
    "opened",
    "sample",
]

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "pypi.toml"
SALT = b"test-salt-that-is-long-enough"
# One rule on ip in one action; format it with the limit and the algorithm.
ONE_RULE = """
[rules.r]
limit = "{limit}"
key = ["ip"]
algorithm = "{algorithm}"
[actions.a]
rules = ["r"]
"""
TEST_DEADLINE_MS = 2000  # see the settings fixture


class FakeClock:
    """Milliseconds that only move when a test moves them."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the first sample of metric ``name`` carrying ``labels`` in Prometheus
    text (an unlabelled sample when none are asked); 0.0 when there is none."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        elif line.startswith(name + " "):
            found = {}
        else:
            continue
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def config_from(text: str) -> Config:
    """A Config from TOML text."""
    return parse_config(text, source="test.toml")



Opened = TypeVar("Opened")
_OPENED: list[Any] = []


def opened(thing: Opened) -> Opened:
    """``thing`` (a limiter or a coalescer), whose connections to Redis are closed when the
    test ends: by the ``closes_opened`` fixture, which the test's module uses."""
    _OPENED.append(thing)
    return thing


async def close_opened() -> None:
    """Close what was ``opened`` (in the event loop it was used in)."""
    while _OPENED:
        await _OPENED.pop().close()

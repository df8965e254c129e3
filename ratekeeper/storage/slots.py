"""One check split across Redis Cluster slots, and the slots' answers put back together.

check.lua must see only keys of one slot. Keys of one subject share a hash tag, so a rule's
state and penalty keys, and the ban key of a subject a rule keys on alone, are always in one
slot; an action whose rules key on different subjects (an IP rule and a user rule) spans
several. Each slot then gets its own check.lua call over its bans and rules, all or nothing
within the slot; when any slot denies, the slots that took hits give them back (refund.lua),
so a denied request consumes nothing once the refund has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.crc import key_slot

__all__ = [
    "Answer",
    "Merged",
    "Refund",
    "RulePart",
    "SlotGroup",
    "SlotPlan",
    "merge",
    "split",
    "split_refund",
    "taken",
]


@dataclass(frozen=True, slots=True)
class RulePart:
    """One rule of a check: its keys and its segment of check.lua's ARGV."""

    keys: tuple[str, ...]  # state key, then penalty key when the rule has a penalty
    args: tuple[str | int, ...]  # algorithm, shadow, penalty_ms, nw, (limit, ms) * nw
    n_windows: int

    @property
    def refund_args(self) -> list[str | int]:
        """Its segment of refund.lua's ARGV: algorithm, nw, the window lengths."""
        return [self.args[0], self.n_windows, *self.args[5::2]]


@dataclass(slots=True)
class SlotGroup:
    """The bans and rules of one check that live in one slot."""

    slot: int
    bans: list[int] = field(default_factory=list)  # indexes into SlotPlan.ban_keys
    rules: list[int] = field(default_factory=list)  # indexes into SlotPlan.rules


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """A check taken apart: its ban keys, its rules, and which slot holds each."""

    ban_keys: tuple[str, ...]
    rules: tuple[RulePart, ...]
    groups: tuple[SlotGroup, ...]

    def keys(self, group: SlotGroup) -> list[str]:
        """KEYS of check.lua for one group."""
        keys = [self.ban_keys[i] for i in group.bans]
        for r in group.rules:
            keys += self.rules[r].keys
        return keys

    def args(self, group: SlotGroup) -> list[str | int]:
        """The per-rule ARGV tail of check.lua for one group."""
        args: list[str | int] = []
        for r in group.rules:
            args += self.rules[r].args
        return args


def split(keys: Sequence[str], n_bans: int, n_rules: int,
          rule_args: Sequence[str | int]) -> SlotPlan:
    """Take check.lua's KEYS and ARGV tail apart by slot (same layout as check.lua reads)."""
    rules: list[RulePart] = []
    a, k = 0, n_bans
    for _ in range(n_rules):
        n_windows = int(rule_args[a + 3])
        width = 4 + 2 * n_windows
        n_keys = 2 if int(rule_args[a + 2]) > 0 else 1
        rules.append(RulePart(keys=tuple(keys[k:k + n_keys]),
                              args=tuple(rule_args[a:a + width]), n_windows=n_windows))
        a, k = a + width, k + n_keys
    if a != len(rule_args) or k != len(keys):
        raise ValueError("keys and rule arguments do not match check.lua's layout")
    groups: dict[int, SlotGroup] = {}
    for i, key in enumerate(keys[:n_bans]):
        slot = key_slot(key.encode())
        groups.setdefault(slot, SlotGroup(slot)).bans.append(i)
    for r, rule in enumerate(rules):
        slot = key_slot(rule.keys[0].encode())
        groups.setdefault(slot, SlotGroup(slot)).rules.append(r)
    return SlotPlan(ban_keys=tuple(keys[:n_bans]), rules=tuple(rules),
                    groups=tuple(groups.values()))


def split_refund(keys: Sequence[str], rule_args: Sequence[str | int]
                 ) -> list[tuple[list[int], list[str | int]]]:
    """Group refund.lua's rules by slot: (indexes into ``keys``, their ARGV tail) per slot."""
    groups: dict[int, tuple[list[int], list[str | int]]] = {}
    a = 0
    for i, key in enumerate(keys):
        width = 2 + int(rule_args[a + 1])  # algorithm, nw, then nw window lengths
        indexes, args = groups.setdefault(key_slot(key.encode()), ([], []))
        indexes.append(i)
        args += rule_args[a:a + width]
        a += width
    if a != len(rule_args):
        raise ValueError("keys and rule arguments do not match refund.lua's layout")
    return list(groups.values())


@dataclass(frozen=True, slots=True)
class Answer:
    """What one group's check.lua call returned, flattened (see limiter.Outcome)."""

    status: int
    now_ms: int
    shadowed: bool
    index: int
    wait_ms: int
    windows: tuple[tuple[int, int, int], ...]  # remaining, reset_ms, retry_ms


Refund = tuple[SlotGroup, tuple[int, ...], int]  # a group, its rules that took, at now_ms


@dataclass(frozen=True, slots=True)
class Merged:
    """The request's answer, and the hits to give back."""

    answer: Answer
    refunds: tuple[Refund, ...]


ALLOWED, LIMITED, BANNED, PENALTY = 1, 0, 2, 3


def _rule_windows(plan: SlotPlan, group: SlotGroup,
                  answer: Answer) -> dict[int, list[tuple[int, int, int]]]:
    windows = iter(answer.windows)
    return {r: [next(windows) for _ in range(plan.rules[r].n_windows)] for r in group.rules}


def _takers(plan: SlotPlan, group: SlotGroup, answer: Answer) -> tuple[int, ...]:
    """The rules of an allowed group that took hits: all but shadow rules that would deny."""
    if answer.status != ALLOWED:
        return ()
    return tuple(r for r, states in _rule_windows(plan, group, answer).items()
                 if not any(retry > 0 for _, _, retry in states))


def taken(plan: SlotPlan, answers: Sequence[Answer | None], cost: int) -> list[Refund]:
    """What the groups that answered took (None: the group's call failed)."""
    if cost <= 0:
        return []
    refunds = []
    for group, answer in zip(plan.groups, answers, strict=True):
        if answer is not None and (rules := _takers(plan, group, answer)):
            refunds.append((group, rules, answer.now_ms))
    return refunds


def merge(plan: SlotPlan, answers: Sequence[Answer], cost: int) -> Merged:
    """Combine the groups' answers as one check.lua call over every key would have answered.

    Bans come first, then penalty boxes, then limits; windows are reported in the request's
    rule order, and a rule whose hits are to be given back reports what it had before.
    """
    by_rule: dict[int, list[tuple[int, int, int]]] = {}
    banned: tuple[int, Answer] | None = None
    boxed: tuple[int, Answer] | None = None
    limited_wait = -1
    for group, answer in zip(plan.groups, answers, strict=True):
        if answer.status == BANNED:
            index = group.bans[answer.index - 1]
            if banned is None or index < banned[0]:
                banned = (index, answer)
        elif answer.status == PENALTY:
            index = group.rules[answer.index - 1]
            if boxed is None or index < boxed[0]:
                boxed = (index, answer)
        else:
            by_rule.update(_rule_windows(plan, group, answer))
            if answer.status == LIMITED:
                limited_wait = max(limited_wait, answer.wait_ms)
    now = answers[0].now_ms
    shadowed = any(answer.shadowed for answer in answers)
    if banned is None and boxed is None and limited_wait < 0:
        windows = tuple(w for r in range(len(plan.rules)) for w in by_rule[r])
        return Merged(Answer(ALLOWED, now, shadowed, 0, 0, windows), ())
    # denied: every hit a slot took is given back
    refunds = tuple(taken(plan, answers, cost))
    if banned is not None:
        index, answer = banned
        return Merged(Answer(BANNED, now, shadowed, index + 1, answer.wait_ms, ()), refunds)
    if boxed is not None:
        index, answer = boxed
        return Merged(Answer(PENALTY, now, shadowed, index + 1, answer.wait_ms, ()), refunds)
    refunded = {r for _, rules, _ in refunds for r in rules}
    windows = tuple(
        (remaining + cost, reset, retry) if r in refunded else (remaining, reset, retry)
        for r in range(len(plan.rules)) for remaining, reset, retry in by_rule[r]
    )
    return Merged(Answer(LIMITED, now, shadowed, 0, limited_wait, windows), refunds)

"""Each process's memory of banned and over-limit subjects, so repeat offenders cost no Redis call.

Every entry is something Redis answered — "banned for another 3 s", "in rule R's penalty box
for 40 min", "rule R denies a cost of 2 or more for 900 ms" — and stays true until its
deadline however other processes add hits. So the cache only ever denies: it can never let a
request past a limit. It must not deny wrongly either:

- a limit entry records the cost it was denied at, and answers only requests of at least
  that cost (a denial at cost 5 says nothing about cost 1);
- deadlines start from the moment *before* the Redis call, so they end no later than the
  real ones;
- what can end an entry early is an admin lift or reset, or a refund: those are applied at
  once by the process that made them and sent to every other one on pub/sub. While that
  channel is down (Redis down, a failover) the cache goes on answering until each entry's
  deadline, as what Redis said is then the best knowledge there is; once it is back, the
  changes made meanwhile are applied from a log, or the cache is emptied if some could have
  been missed (see ``sync.py``);
- per-rule shadow rules are never cached, and nothing but bans is answered while global
  shadow mode is on; a config reload starts from an empty cache;
- a request that could earn a penalty box (cost > 0 on an action with a penalty rule) is
  answered only by a known box or ban, so the cache never spares anyone a box.

Known difference: a box or ban set by *another* process is unknown here until Redis says so,
so a request this cache denies for a limit may be told ``rate_limited`` where Redis would
have said ``banned``; it is denied either way (a new ban empties every cache).

It holds at most ``max_entries`` entries; when full, the oldest goes first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ratekeeper.api.wire import Decision, LimitState
from ratekeeper.config.rules import Action, Window
from ratekeeper.storage.limiter import Outcome, Status

__all__ = ["CacheHit", "LocalCache"]

BAN, PENALTY, LIMIT = 0, 1, 2
# A ban key without a TTL (set by hand) is remembered this long only.
UNBOUNDED_MS = 1000

CacheKey = str | tuple[str, str]  # a ban: subject hash; a rule: (rule name, subject hash)


def monotonic_ms() -> int:
    """Milliseconds of a clock that never goes back."""
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class Entry:
    """One remembered denial, valid until ``until_ms``."""

    kind: int
    until_ms: int
    want: int = 0  # LIMIT: answers only requests taking at least this many hits
    at_ms: int = 0
    windows: tuple[tuple[Window, int, int], ...] = ()  # (window, remaining, reset_ms) at at_ms
    # the last answer given from this entry: (action, the ms it was made in, the hit). An
    # answer says its waits to the millisecond, so it holds for that millisecond alone.
    memo: tuple[str, int, CacheHit] | None = None


class CacheHit(NamedTuple):
    """A denial answered from the cache; ``rule`` is the index of the denying rule, or -1;
    ``banned`` the banned subject's hash when a ban denied."""

    decision: Decision
    rule: int
    banned: str = ""


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def boxed_decision(action: Action, index: int, wait_ms: int) -> Decision:
    """A denial by the penalty box of the action's rule ``index``: ``banned`` for ``wait_ms``,
    naming the rule in ``limits`` (nothing left in any of its windows; a reset no longer than
    the window)."""
    rule = action.rules[index]
    retry_after = _seconds(wait_ms)
    return Decision(allowed=False, reason="banned", action=action.name, retry_after=retry_after,
                    retry_after_ms=wait_ms,
                    limits=[LimitState(rule=rule.name, limit=window.limit,
                                       window=window.seconds, remaining=0,
                                       reset=min(retry_after, window.seconds),
                                       reset_ms=min(wait_ms, window.seconds * 1000))
                            for window in rule.windows])


def _banned(entry: Entry, action: str, now: int, index: int, subject: str = "") -> CacheHit:
    wait_ms = max(0, entry.until_ms - now)
    return CacheHit(Decision(allowed=False, reason="banned", action=action,
                             retry_after=_seconds(wait_ms), retry_after_ms=wait_ms),
                    index, subject)


def _boxed(entry: Entry, action: Action, now: int, index: int) -> CacheHit:
    wait_ms = max(0, entry.until_ms - now)
    return CacheHit(boxed_decision(action, index, wait_ms), index)


def _limited(entry: Entry, rule: str, action: str, now: int, index: int) -> CacheHit:
    elapsed = now - entry.at_ms
    limits = []
    for window, remaining, reset_ms in entry.windows:
        left_ms = max(0, reset_ms - elapsed)
        limits.append(LimitState(rule=rule, limit=window.limit, window=window.seconds,
                                 remaining=max(0, remaining), reset=_seconds(left_ms),
                                 reset_ms=left_ms))
    wait_ms = max(1, entry.until_ms - now)
    return CacheHit(Decision(allowed=False, reason="rate_limited", action=action,
                             retry_after=_seconds(wait_ms), retry_after_ms=wait_ms,
                             limits=limits), index)


def _remembered(entry: Entry, action: str, now: int) -> CacheHit | None:
    memo = entry.memo
    if memo is not None and memo[1] == now and memo[0] == action:
        return memo[2]
    return None


def _memo(entry: Entry, action: str, now: int, hit: CacheHit) -> CacheHit:
    """Remember ``hit``, the answer at ``now``, for the rest of this millisecond (a flood
    asks many times in one)."""
    entry.memo = (action, now, hit)
    return hit


class LocalCache:
    """Bounded map of subjects known to be banned, boxed or over a limit, with deadlines."""

    def __init__(self, max_entries: int = 50_000,
                 now_ms: Callable[[], int] | None = None) -> None:
        self.max_entries = max_entries
        self.now_ms = now_ms or monotonic_ms
        # False until the pub/sub channel is first up: before, changes could be missed with no
        # log position to catch up from (sync.py)
        self.active = True
        # tells the other processes that hits were given back (see sync.py)
        self.announce: Callable[[list[tuple[str, str]]], Awaitable[object]] | None = None
        self.hits = 0
        self._entries: dict[CacheKey, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, action: Action, ban_subjects: Sequence[str],
               rule_subjects: Sequence[str], cost: int, shadow_all: bool) -> CacheHit | None:
        """A denial this cache can vouch for, or None (then Redis decides)."""
        entries = self._entries
        if not self.active or not entries:
            return None
        now = self.now_ms()
        for subject in ban_subjects:
            entry = entries.get(subject)
            if entry is not None:
                if entry.until_ms > now:
                    self.hits += 1
                    return _remembered(entry, action.name, now) or _memo(
                        entry, action.name, now, _banned(entry, action.name, now, -1, subject))
                del entries[subject]
        if shadow_all:
            return None
        want = cost or 1
        # A request that takes hits may put its subject in a penalty box on the way to being
        # denied (check.lua boxes for every enforced penalty rule it exceeds); only Redis can
        # do that, so such requests are answered here only by a box or a ban already known.
        boxing = cost > 0 and any(rule.penalty and not rule.shadow for rule in action.rules)
        for index, rule in enumerate(action.rules):
            if rule.shadow:
                continue
            key = (rule.name, rule_subjects[index])
            entry = entries.get(key)
            if entry is None:
                continue
            if entry.until_ms <= now:
                del entries[key]
                continue
            if entry.kind == PENALTY:
                self.hits += 1
                return _remembered(entry, action.name, now) or _memo(
                    entry, action.name, now, _boxed(entry, action, now, index))
            if want >= entry.want and not boxing:
                self.hits += 1
                return _remembered(entry, action.name, now) or _memo(
                    entry, action.name, now, _limited(entry, rule.name, action.name, now, index))
        return None

    def remember(self, action: Action, ban_subjects: Sequence[str],
                 rule_subjects: Sequence[str], cost: int, outcome: Outcome,
                 started_ms: int) -> None:
        """Keep what a denial taught us; ``started_ms`` is ``now_ms()`` before the call."""
        if not self.active or self.max_entries <= 0 or outcome.status is Status.ALLOWED:
            return
        if outcome.status is Status.BANNED:
            if outcome.culprit > len(ban_subjects):
                return  # a ban under the previous salt (rotation.py): lifted by its own id
            wait = outcome.wait_ms if outcome.wait_ms >= 0 else UNBOUNDED_MS
            self._put(ban_subjects[outcome.culprit - 1], Entry(BAN, started_ms + wait))
            return
        if outcome.status is Status.PENALTY:
            index = outcome.culprit - 1
            wait = outcome.wait_ms if outcome.wait_ms >= 0 else UNBOUNDED_MS
            self._put((action.rules[index].name, rule_subjects[index]),
                      Entry(PENALTY, started_ms + wait))
            return
        position = 0
        for index, rule in enumerate(action.rules):
            states = outcome.windows[position:position + len(rule.windows)]
            position += len(rule.windows)
            retry = max((state.retry_ms for state in states), default=0)
            if rule.shadow or retry <= 0:
                continue
            key = (rule.name, rule_subjects[index])
            if cost > 0 and rule.penalty:
                # check.lua boxed the subject for the rule's penalty as it denied
                self._put(key, Entry(PENALTY, started_ms + rule.penalty * 1000))
                continue
            fresh = Entry(LIMIT, started_ms + retry, want=cost or 1, at_ms=started_ms,
                          windows=tuple((window, state.remaining, state.reset_ms)
                                        for window, state in zip(rule.windows, states,
                                                                 strict=True)))
            old = self._entries.get(key)
            if old is not None and old.until_ms > started_ms and (
                old.kind == PENALTY or old.want < fresh.want
                or (old.want == fresh.want and old.until_ms >= fresh.until_ms)
            ):
                continue  # what we know already covers at least as much
            self._put(key, fresh)

    def forget_subjects(self, subjects: Iterable[str]) -> None:
        """Drop the bans of these subject hashes (a lift)."""
        for subject in subjects:
            self._entries.pop(subject, None)

    def forget_rules(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop what is known about these (rule name, subject hash) pairs (a reset)."""
        for rule, subject in pairs:
            self._entries.pop((rule, subject), None)

    async def gave_back(self, pairs: list[tuple[str, str]]) -> None:
        """Hits of these (rule name, subject hash) pairs were refunded: forget them here and,
        through ``announce`` (set when pub/sub runs), in every other process."""
        self.forget_rules(pairs)
        if self.announce is not None:
            await self.announce(pairs)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def sweep(self) -> int:
        """Drop entries past their deadline; how many went."""
        now = self.now_ms()
        stale = [key for key, entry in self._entries.items() if entry.until_ms <= now]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def _put(self, key: CacheKey, entry: Entry) -> None:
        entries = self._entries
        if entries.pop(key, None) is None and len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = entry

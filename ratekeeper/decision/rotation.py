"""Salt rotation: what a check still honours of the previous IP salt during its grace period.

With ``RATEKEEPER_IP_SALT_PREVIOUS`` set, every subject has two hashes, so two sets of keys.
Checks write only under the new salt; the previous salt is honoured so that a rotation hands
no client a fresh window and drops no ban:

- bans: the ban keys under the previous salt are checked along with the current ones, so a
  ban holds until it expires, and lifting it (deleting its key) still works;
- counters and penalty boxes: the first time this process meets a rule's key under the new
  salt, the key under the previous salt is copied to it with its TTL, unless the new key
  already exists (DUMP/RESTORE, which works across cluster slots). A bounded memory of keys
  already carried over keeps that to about once per key and process.

Keep the previous salt set for at least the longest window and the longest running ban,
then unset it: after that nothing under the old hashes matters any more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from ratekeeper.config.rules import Rule
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.limiter import Limiter

__all__ = ["Rotation"]

MEMORY = 100_000  # keys remembered as carried over, per process


class Rotation:
    """Old-salt keys a check still looks at, and the copying of counters to new-salt keys."""

    def __init__(self, keyspace: Keyspace, *, memory: int = MEMORY) -> None:
        if keyspace.previous is None:
            raise ValueError("a rotation needs a keyspace with a previous salt")
        self.current = keyspace
        self.previous = keyspace.previous
        self._memory = memory
        self._carried: OrderedDict[str, None] = OrderedDict()

    def ban_keys(self, values: Mapping[str, bytes]) -> list[str]:
        """The ban keys of a request's subjects under the previous salt."""
        return self.previous.subject_ban_keys(values)

    def pending(self, rules: Iterable[Rule], values: Mapping[str, bytes]
                ) -> list[tuple[str, str]]:
        """(old key, new key) pairs this process has not carried over yet."""
        pairs = []
        for rule in rules:
            new_state, new_penalty = self.current.rule_keys(rule, values)
            if new_state in self._carried:
                self._carried.move_to_end(new_state)
                continue
            old_state, old_penalty = self.previous.rule_keys(rule, values)
            pairs.append((old_state, new_state))
            if rule.penalty:
                pairs.append((old_penalty, new_penalty))
        return pairs

    async def carry_over(self, limiter: Limiter, rules: Iterable[Rule],
                         values: Mapping[str, bytes]) -> None:
        """Copy the state of ``rules`` from old-salt keys to new-salt keys where not yet done."""
        pairs = self.pending(rules, values)
        if not pairs:
            return
        await limiter.carry_over(pairs)
        for _, new in pairs:
            self._carried[new] = None
        while len(self._carried) > self._memory:
            self._carried.popitem(last=False)

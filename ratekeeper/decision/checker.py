"""The decision: may this client do this action now?

Order: the action's kill switches (local state, no Redis), then this process's cache of
subjects Redis already said are banned or over a limit (it only ever denies), then bans and
penalty boxes and every window of every rule in one script call, all or nothing. When Redis
cannot be asked, the rules' fail modes decide here, and only here.

For the origin alone (``server/origin.py``): ``state`` reads an action's windows from Redis,
past the cache, so its figures are exact to the millisecond; ``clear`` deletes the counters of
an action that allows it (``clearable``), here and in the caches of every process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from ratekeeper.api.wire import (
    ClearResult,
    Decision,
    LimitState,
    RefundRequest,
    RefundResult,
    batch_request_type,
    check_request_type,
    decode,
)
from ratekeeper.config.rules import Action, Config, Rule
from ratekeeper.decision.cache import LocalCache, boxed_decision
from ratekeeper.decision.flags import SHADOW_FLAG, FlagBoard
from ratekeeper.decision.observe import DenialLog, Observer
from ratekeeper.decision.refunds import RefundSigner
from ratekeeper.decision.rotation import Rotation
from ratekeeper.decision.top import TopDenials
from ratekeeper.errors import BadRequest, StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.storage.limiter import CheckCall, Limiter, Outcome, Status, parse_outcome

__all__ = ["Checker", "NotClearable", "Pending"]

REFUND_SLACK_MS = 1000  # as check.lua's SLACK_MS: the marker outlives the hits it guards


class NotClearable(BadRequest):
    """A clear of an action whose config does not allow it (the origin endpoint's 403)."""


@dataclass(frozen=True, slots=True)
class ActionPlan:
    """What a check of one action needs, prepared once per config."""

    action: Action
    required: tuple[tuple[str, str], ...]  # (subject field, the rule that needs it)
    rule_args: tuple[str | int, ...]  # check.lua ARGV per rule, as configured
    refund_args: tuple[str | int, ...]  # refund.lua ARGV per rule
    shadow_args: tuple[str | int, ...]  # the same with every rule in shadow mode
    fail_closed: bool
    rule_keys: tuple[tuple[str, ...], ...]  # each rule's subject fields
    windows: tuple[tuple[str, int, int], ...]  # (rule, limit, seconds) of every window, in order
    boxes: tuple[bool, ...]  # each rule: has a penalty and is not in shadow mode
    key_parts: tuple[tuple[str, str, str], ...]  # each rule's Keyspace.key_parts


def _rule_args(rule: Rule, *, shadow: bool) -> list[str | int]:
    args: list[str | int] = [
        "l" if rule.algorithm == "sliding-log" else "c",
        "1" if shadow else "0",
        0 if shadow else rule.penalty * 1000,
        len(rule.windows),
    ]
    for window in rule.windows:
        args += [window.limit, window.seconds * 1000]
    return args


def _plan(action: Action, keyspace: Keyspace) -> ActionPlan:
    required: dict[str, str] = {}
    normal: list[str | int] = []
    shadow: list[str | int] = []
    refund: list[str | int] = []
    for rule in action.rules:
        for field in rule.key:
            required.setdefault(field, rule.name)
        normal += _rule_args(rule, shadow=rule.shadow)
        shadow += _rule_args(rule, shadow=True)
        refund += ["l" if rule.algorithm == "sliding-log" else "c", len(rule.windows)]
        refund += [window.seconds * 1000 for window in rule.windows]
    return ActionPlan(
        action=action,
        required=tuple(required.items()),
        rule_args=tuple(normal),
        refund_args=tuple(refund),
        shadow_args=tuple(shadow),
        fail_closed=any(r.fail == "closed" and not r.shadow for r in action.rules),
        rule_keys=tuple(tuple(rule.key) for rule in action.rules),
        windows=tuple((rule.name, w.limit, w.seconds) for rule in action.rules
                      for w in rule.windows),
        boxes=tuple(bool(rule.penalty) and not rule.shadow for rule in action.rules),
        key_parts=tuple(keyspace.key_parts(rule) for rule in action.rules),
    )


_new = tuple.__new__

# What decided a ban or penalty-box denial: (the subject's fields, its hash), for the log
Culprit = tuple[str, str] | None
Answer = tuple[Decision, Culprit]


class Pending(NamedTuple):
    """A check staged up to its Redis call: what deciding it after the call needs."""

    plan: ActionPlan
    values: dict[str, bytes]  # the request's normalised subject values
    cost: int
    ban_fields: list[str]  # the field of each ban subject
    ban_subjects: list[str]
    subjects: list[str]
    started_ms: int  # the local cache's clock before the call
    call: CheckCall  # Limiter.check's arguments


def _rule_culprit(rule: Rule, subject: str) -> Culprit:
    return "+".join(rule.key) or "global", subject


def _seconds(ms: int) -> int:
    return -(-ms // 1000) if ms > 0 else 0  # whole seconds, rounded up


def count_denials(denials: TopDenials, action: Action, subjects: Sequence[str],
                  outcome: Outcome) -> None:
    """Count, per rule, the subject it denied (or would have, in shadow mode)."""
    if outcome.status is Status.PENALTY:
        index = outcome.culprit - 1
        denials.add(action.rules[index], subjects[index])
        return
    if outcome.status is Status.BANNED:
        return  # a ban is no rule's doing
    states = iter(outcome.windows)
    for rule, subject in zip(action.rules, subjects, strict=True):
        retry = max((next(states).retry_ms for _ in rule.windows), default=0)
        if retry > 0:
            denials.add(rule, subject)


class Checker:
    """Decides checks for one config; a reload builds a new Checker and swaps it in."""

    def __init__(self, config: Config, keyspace: Keyspace, limiter: Limiter,
                 flags: FlagBoard, *, cache: LocalCache | None = None,
                 denials: TopDenials | None = None, metrics: Metrics | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.keyspace = keyspace
        self.limiter = limiter
        self.flags = flags
        self.cache = cache  # banned / over-limit subjects this process already knows
        self.denials = denials  # counts for GET /v1/admin/top
        self.metrics = metrics
        self.wall = wall  # Unix seconds, for flag expiry (tests inject their clock)
        self.request_type = check_request_type(config.subjects)
        self.decoder = msgspec.json.Decoder(self.request_type)
        self.batch_type = batch_request_type(self.request_type)
        self.batch_decoder = msgspec.json.Decoder(self.batch_type)
        self.subject_fields = tuple(sorted(config.subjects - {"ip"}))
        self.plans = {name: _plan(action, keyspace) for name, action in config.actions.items()}
        self._ban_key_parts = keyspace.key_parts()
        self.refunds = RefundSigner(keyspace.derived_secret(b"refund-token/v1"))
        self.refund_decoder = msgspec.json.Decoder(RefundRequest)
        # while a previous IP salt is honoured: its bans and counters (see rotation.py)
        self.rotation = Rotation(keyspace) if keyspace.previous is not None else None
        self._shadow_all = False
        # which denials get a log line (observe.py), on a clock that never steps back
        self.observer = Observer(keyspace, metrics,
                                 DenialLog(time.monotonic if wall is time.time else wall))
        self.decided = 0  # decisions made by this checker (the admin page's rate)

    @property
    def shadow_all(self) -> bool:
        """Global shadow mode: the built-in ``shadow-mode`` flag (or a test's override)."""
        return self._shadow_all or self.flags.is_on(SHADOW_FLAG, self.wall())

    @shadow_all.setter
    def shadow_all(self, value: bool) -> None:
        self._shadow_all = value

    def decode(self, body: bytes | bytearray) -> Any:
        """Decode one check request; raise BadRequest with msgspec's sentence."""
        return decode(self.decoder, body)

    def decode_batch(self, body: bytes | bytearray) -> list[Any]:
        """Decode a batch request; raise BadRequest with msgspec's sentence."""
        return list(decode(self.batch_decoder, body).checks)

    def subjects(self, request: Any) -> dict[str, bytes]:
        """The normalised value of every subject the request carries."""
        if request.ip is not None and request.ip_hash is not None:
            raise BadRequest("send either ip or ip_hash, not both")
        values: dict[str, bytes] = {}
        if request.ip is not None:
            values["ip"] = self.keyspace.ip_value(request.ip)
        elif request.ip_hash is not None:
            values["ip"] = self.keyspace.ip_hash_value(request.ip_hash)
        for field in self.subject_fields:
            value = getattr(request, field)
            if value is not None:
                values[field] = self.keyspace.text_value(value)
        return values

    def prepare(self, request: Any) -> tuple[ActionPlan, dict[str, bytes]]:
        """Validate a decoded request against the config; raise BadRequest."""
        plan = self.plans.get(request.action)
        if plan is None:
            raise BadRequest("unknown action: it names no action of the config")
        values = self.subjects(request)
        for field, rule_name in plan.required:
            if field not in values:
                what = "ip or ip_hash" if field == "ip" else f"'{field}'"
                raise BadRequest(
                    f"action '{plan.action.name}' needs {what} (rule '{rule_name}')"
                )
        return plan, values

    async def check(self, request: Any) -> Decision:
        """Decide one decoded request."""
        return (await self._decide([self.prepare(request)], [request.cost]))[0]

    async def state(self, request: Any) -> Decision:
        """What a look (cost 0) at ``request``'s action answers, always from Redis: never the
        local cache, whose denials keep the ``remaining`` Redis gave when it denied; counted
        and logged as no decision."""
        plan, values = self.prepare(request)
        return (await self._decide([(plan, values)], [0], fresh=True))[0]

    async def clear(self, request: Any) -> ClearResult:
        """Delete the counters of ``request``'s action for its subjects (penalty boxes and bans
        stay): only for an action whose config says ``clearable``. Raises BadRequest."""
        plan, values = self.prepare(request)
        action = plan.action
        if not action.clearable:
            raise NotClearable(f"action '{action.name}' is not clearable (set clearable = "
                               "true on it in the config)")
        keyspace = self.keyspace
        pairs = [(rule, keyspace.subject((f, values[f]) for f in rule.key))
                 for rule in action.rules]
        keys = [keyspace.counter_key(subject, rule) for rule, subject in pairs]
        if self.rotation is not None:  # else a check would carry the old counts over again
            keys += [self.rotation.previous.rule_keys(rule, values)[0] for rule in action.rules]
        try:
            deleted = await self.limiter.clear(keys) if keys else 0
        except StoreUnavailable:
            return ClearResult(cleared=False, reason="unavailable", degraded=True)
        if self.cache is not None:  # a denial remembered for these subjects no longer holds
            await self.cache.gave_back([(rule.name, subject) for rule, subject in pairs])
        return ClearResult(cleared=True, deleted=deleted)

    async def check_batch(self, requests: Sequence[Any]) -> list[Decision]:
        """Decide decoded requests in order, each as if after the one before it.

        Every request is validated before any is decided: a bad one is a BadRequest that
        names its index, and nothing is consumed.
        """
        prepared = []
        for index, request in enumerate(requests):
            try:
                prepared.append(self.prepare(request))
            except BadRequest as exc:
                raise BadRequest(f"checks[{index}]: {exc}") from None
        return await self._decide(prepared, [request.cost for request in requests])

    async def _decide(self, prepared: Sequence[tuple[ActionPlan, dict[str, bytes]]],
                      costs: Sequence[int], *, fresh: bool = False) -> list[Decision]:
        """Stage every check, decide the ones Redis must in one call, settle them all
        (``fresh``: past the local cache, and not counted as decisions)."""
        staged = [self._stage(plan, values, cost, fresh=fresh)
                  for (plan, values), cost in zip(prepared, costs, strict=True)]
        pending = [stage for stage in staged if isinstance(stage, Pending)]
        replies: Iterator[Sequence[int] | StoreUnavailable] = iter(())
        if pending:
            if self.rotation is not None:  # a check may first copy keys to the new salt
                for stage in pending:
                    with contextlib.suppress(StoreUnavailable):  # (then decide says so)
                        await self.rotation.carry_over(self.limiter, stage.plan.action.rules,
                                                       stage.values)
            replies = iter(await self.limiter.decide([stage.call for stage in pending]))
        if fresh:
            return [self._looked(stage, next(replies)) if isinstance(stage, Pending)
                    else stage[0] for stage in staged]
        return [self._observed(plan, values, cost,
                               self._finish(stage, next(replies))
                               if isinstance(stage, Pending) else stage)
                for stage, (plan, values), cost in zip(staged, prepared, costs, strict=True)]

    def _count_allowed(self, action: str, count: int) -> None:
        self.decided += count
        if self.metrics is not None:
            self.metrics.decision(action, "", "allowed", count)

    def _observed(self, plan: ActionPlan, values: dict[str, bytes], cost: int,
                  answer: Answer) -> Decision:
        """Count the decision (and log it if it denied)."""
        decision, culprit = answer
        if decision.allowed and not decision.shadow and not decision.degraded:
            self._count_allowed(plan.action.name, 1)
        else:
            self.decided += 1
            self.observer.observe(plan.action, values, cost, decision, culprit)
        return decision

    def _stage(self, plan: ActionPlan, values: dict[str, bytes], cost: int, *,
               fresh: bool = False) -> Answer | Pending:
        """Everything before Redis: the answer when flags or the cache decide, else the call."""
        action = plan.action
        now = self.wall()
        if action.flags:
            blocking = self.flags.blocking(action.flags, now)
            if blocking is not None:
                # retrying helps only once every switch of the action is off: say when, if
                # each has an expiry (headers.retry_after)
                off_at = self.flags.off_at(action.flags, now)
                wait_ms = 0 if off_at is None else max(1000, math.ceil((off_at - now) * 1000))
                return Decision(allowed=False, reason="disabled", action=action.name,
                                flag=blocking.name, message=self.flags.message_for(blocking),
                                retry_after=_seconds(wait_ms), retry_after_ms=wait_ms), None
        shadow_all = self._shadow_all or self.flags.is_on(SHADOW_FLAG, now)
        subject = self.keyspace.subject
        # one subject per field (its bans), then one per rule: a one-field rule's is the same
        by_field = {field: subject(((field, value),)) for field, value in values.items()}
        ban_fields, ban_subjects = list(by_field), list(by_field.values())
        subjects = [by_field[fields[0]] if len(fields) == 1
                    else subject(tuple([(f, values[f]) for f in fields]))
                    for fields in plan.rule_keys]
        cache = self.cache
        if cache is not None and not fresh:
            hit = cache.lookup(action, ban_subjects, subjects, cost, shadow_all)
            if hit is not None:
                if self.metrics is not None:
                    self.metrics.cache_hit(hit.decision.reason or "allowed")
                culprit: Culprit = None
                if hit.rule >= 0:
                    if self.denials is not None:
                        self.denials.add(action.rules[hit.rule], subjects[hit.rule])
                    culprit = _rule_culprit(action.rules[hit.rule], subjects[hit.rule])
                elif hit.banned:
                    culprit = next(((f, s) for f, s in zip(ban_fields, ban_subjects, strict=True)
                                    if s == hit.banned), None)
                return hit.decision, culprit
        # the key names, from their parts (keys.py): the bans', then each rule's
        head, tail, _ = self._ban_key_parts
        keys = [head + s + tail for s in ban_subjects]
        if self.rotation is not None:
            keys += self.rotation.ban_keys(values)
        n_bans = len(keys)
        for rule_subject, (head, tail, penalty_tail), boxes in zip(
                subjects, plan.key_parts, plan.boxes, strict=True):
            keys.append(head + rule_subject + tail)
            if boxes and not shadow_all:
                keys.append(head + rule_subject + penalty_tail)
        if not keys:
            return Decision(allowed=True, reason=None, action=action.name), None
        rule_args = plan.shadow_args if shadow_all else plan.rule_args
        # (Pending(...) without its Python __new__: one is made per check)
        return _new(Pending, (plan, values, cost, ban_fields, ban_subjects, subjects,
                              cache.now_ms() if cache is not None else 0,
                              (keys, cost, n_bans, len(action.rules), rule_args)))

    def _looked(self, stage: Pending, reply: Sequence[int] | StoreUnavailable) -> Decision:
        """A look's answer from Redis (``state``): nothing remembered, nothing counted."""
        if isinstance(reply, StoreUnavailable):
            return self.degraded(stage.plan)
        return self.decision(stage.plan, reply)

    def _finish(self, stage: Pending, reply: Sequence[int] | StoreUnavailable) -> Answer:
        """Everything after Redis answered (check.lua's reply) or could not."""
        plan = stage.plan
        if isinstance(reply, StoreUnavailable):
            return self.degraded(plan), None
        action, subjects, cost = plan.action, stage.subjects, stage.cost
        if reply[0] != Status.ALLOWED or reply[2]:  # denied, or a shadow rule would have
            outcome = parse_outcome(reply)
            if self.denials is not None:
                count_denials(self.denials, action, subjects, outcome)
            if outcome.status is not Status.ALLOWED:
                if self.cache is not None:
                    self.cache.remember(action, stage.ban_subjects, subjects, cost, outcome,
                                        stage.started_ms)
                culprit: Culprit = None
                at = outcome.culprit - 1
                if outcome.status is Status.BANNED and 0 <= at < len(stage.ban_subjects):
                    culprit = (stage.ban_fields[at], stage.ban_subjects[at])
                elif outcome.status is Status.PENALTY and 0 <= at < len(subjects):
                    culprit = _rule_culprit(action.rules[at], subjects[at])
                return self.decision(plan, reply), culprit
        token = None
        if cost > 0 and subjects:
            token = self.refunds.issue(action.name, subjects, cost, reply[1])
        return self.decision(plan, reply, token), None

    def decision(self, plan: ActionPlan, reply: Sequence[int], refund: str | None = None
                 ) -> Decision:
        """Turn check.lua's flat reply for one check into the API's Decision (``refund``: its
        token). Raises ValueError for a reply not of the plan's shape."""
        action = plan.action
        status, _, shadowed, culprit, wait = reply[:5]
        # a box's or ban's wait (-1: without end) is its key's PTTL, which runs on Redis's own
        # clock whatever clock the windows use; the local cache counts down from the same ms
        wait = wait if wait > 0 else 0
        if status == Status.PENALTY:
            return boxed_decision(action, culprit - 1, wait)
        if status == Status.BANNED:
            return Decision(allowed=False, reason="banned", action=action.name,
                            retry_after=_seconds(wait), retry_after_ms=wait)
        if len(reply) != 5 + 3 * len(plan.windows) or (
                status != Status.ALLOWED and status != Status.LIMITED):
            raise ValueError(f"check.lua answered {len(reply)} values, status {status!r}")
        # each window as the answer shows it: hits left, never below 0, and the time until it
        # resets in whole seconds (rounded up) and in milliseconds (LimitState's fields, in
        # order: one is made per window of every decision)
        limits = []
        at = 5
        for rule, limit, seconds in plan.windows:
            remaining, reset_ms = reply[at], reply[at + 1]
            at += 3
            reset_ms = reset_ms if reset_ms > 0 else 0
            limits.append(LimitState(rule, limit, seconds, remaining if remaining > 0 else 0,
                                     -(-reset_ms // 1000), reset_ms))
        if status == Status.LIMITED:
            return Decision(allowed=False, reason="rate_limited", action=action.name,
                            retry_after=max(1, _seconds(wait)), retry_after_ms=max(1, wait),
                            limits=limits)
        if shadowed:
            return Decision(allowed=True, reason="rate_limited", action=action.name,
                            shadow=True, limits=limits, refund=refund)
        # (Decision's fields in order, each given: one is made per allowed check)
        return Decision(True, None, action.name, 0, 0, None, None, False, False, limits, refund)

    def degraded(self, plan: ActionPlan) -> Decision:
        """Redis could not be asked: fail closed if any enforced rule says so, else open."""
        if plan.fail_closed and not self.shadow_all:
            return Decision(allowed=False, reason="rate_limited", action=plan.action.name,
                            retry_after=1, degraded=True)
        return Decision(allowed=True, reason=None, action=plan.action.name, degraded=True)

    def decode_refund(self, body: bytes) -> str:
        """The token of a ``POST /v1/refund`` body; raise BadRequest."""
        request: RefundRequest = decode(self.refund_decoder, body)
        return request.token

    async def refund(self, token: str) -> RefundResult:
        """Give back what the check that issued ``token`` took, at most once per token.

        A marker key (SET NX, living as long as the hits could) is claimed before refund.lua
        runs, so two refunds of one token, even concurrent ones, give back once.
        """
        claim, token_id = self.refunds.open(token)
        plan = self.plans.get(claim.action)
        rules = plan.action.rules if plan is not None else ()
        if plan is None or len(claim.subjects) != len(rules):
            raise BadRequest("the refund token does not match an action of the current config")
        longest_ms = max(w.seconds for rule in rules for w in rule.windows) * 1000
        if self.limiter.now_ms() > claim.at_ms + longest_ms:
            raise BadRequest("the refund token has expired: its hits have left every window")
        keyspace = self.keyspace
        keys = [keyspace.counter_key(subject, rule)
                for subject, rule in zip(claim.subjects, rules, strict=True)]
        marker = keyspace.refund_key(claim.subjects[0], token_id)
        try:
            if not await self.limiter.claim(marker, longest_ms + REFUND_SLACK_MS):
                return RefundResult(refunded=False, reason="already_refunded")
            try:
                await self.limiter.refund(keys, claim.cost, claim.at_ms, plan.refund_args)
            except StoreUnavailable:
                # let a retry try again rather than leave the token spent with nothing given
                with contextlib.suppress(StoreUnavailable):
                    await self.limiter.release(marker)
                raise
        except StoreUnavailable:
            return RefundResult(refunded=False, reason="unavailable", degraded=True)
        if self.cache is not None:  # a denial remembered for these subjects may no longer hold
            await self.cache.gave_back([(rule.name, subject)
                                        for rule, subject in zip(rules, claim.subjects,
                                                                 strict=True)])
        return RefundResult(refunded=True)

"""Allowed check answers, made from a form prepared once per action.

Nearly every check a healthy origin sends is allowed, and most of its answer never changes
between two checks of one action: only each window's remaining hits and reset, the refund
token and the length vary. Building a Decision, a LimitState per window and a dict of header
lines and encoding them cost more than the rest of the check, so an action's allowed answer
is a %-format of its bytes instead (``AllowedForm``).

The form is made from the bytes the usual way gives (msgspec's encoding of a Decision,
``rate_limit_headers``, ``answers.wire_head``) for a Decision whose figures are markers, which
are then cut out: its answers are those bytes, with the same figures (a test compares them
over many). It covers an allowed, enforced answer that took hits and carries a refund token;
every other answer (denied, shadow mode, cost 0, degraded) is built the usual way.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .answers import JSON, wire_head, wire_tail
from .headers import rate_limit_headers
from .wire import Decision, LimitState

__all__ = ["AllowedForm"]

_encode = msgspec.json.Encoder().encode
# markers for the figures: 19 digits, and numbered, so each is found exactly once or the
# form is not made (``AllowedForm.of``)
_MARK = 9_137_000_000_000_000_000
_TOKEN_MARK = "rkTOKENrkMARKrk"


class AllowedForm:
    """The allowed answer of one action: ``wire`` or ``body`` from its figures (each
    window's remaining hits and reset in whole seconds, as the answer shows them:
    ``service.reply_figures``) and its refund token."""

    __slots__ = ("_body", "_head", "size")

    def __init__(self, head: bytes, body: bytes, size: int) -> None:
        self._head = head  # %d per window figure, then the Content-Length
        self._body = body  # %d per window figure, then %s for the token
        self.size = size  # the length of a reply this form fills in

    @classmethod
    def of(cls, action: str, windows: Sequence[tuple[str, int, int]]) -> AllowedForm | None:
        """The form for an action with these (rule, limit, seconds) windows, in order; None
        when its bytes cannot be cut into one (a marker found elsewhere in them, a name that
        cannot go in a header)."""
        marks = [_MARK + i for i in range(2 * len(windows) + 1)]
        limits = [LimitState(rule, limit, seconds, marks[2 * i], marks[2 * i + 1])
                  for i, (rule, limit, seconds) in enumerate(windows)]
        decision = Decision(allowed=True, reason=None, action=action, limits=limits,
                            refund=_TOKEN_MARK)
        headers = rate_limit_headers(decision)
        headers["Content-Type"] = JSON
        figures = [str(mark) for mark in marks]
        try:
            head_bytes = wire_head(200, headers, marks[-1])
        except ValueError:  # a line break in a name (the config refuses them): no form
            return None
        head = _cut(head_bytes, figures, [b"%d"] * len(figures))
        body = _cut(_encode(decision), [*figures[:-1], _TOKEN_MARK],
                    [b"%d"] * (len(figures) - 1) + [b"%s"])
        if head is None or body is None:
            return None
        return cls(head, body, 5 + 3 * len(windows))

    def body(self, figures: Sequence[int], token: bytes) -> bytes:
        """The answer's JSON body."""
        return self._body % (*figures, token)

    def wire(self, figures: Sequence[int], token: bytes) -> bytes:
        """The whole HTTP answer (``answers.wire``'s bytes)."""
        body = self._body % (*figures, token)
        return self._head % (*figures, len(body)) + wire_tail() + body


def _cut(data: bytes, marks: Sequence[str], blanks: Sequence[bytes]) -> bytes | None:
    """``data`` as a %-format: each mark (in order, each found once) becomes its blank."""
    text = data.replace(b"%", b"%%")
    at = 0
    for mark, blank in zip(marks, blanks, strict=True):
        needle = mark.encode()
        found = text.find(needle, at)
        if found < 0 or text.count(needle) != 1:
            return None
        text = text[:found] + blank + text[found + len(needle):]
        at = found + len(blank)
    return text

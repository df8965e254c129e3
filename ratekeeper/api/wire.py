"""Request and response types of the HTTP API, decoded and encoded by msgspec.

The check request type is generated from the config, because its subject fields (user,
project, ...) are the ones the rules key on; anything else is an unknown field and a 400.
The same types generate the OpenAPI document, so the spec cannot drift from the server.

A body that does not decode is a 400 whose sentence is msgspec's, cut down to what our
schema says: the JSON path (``$.checks[3]``: field names of ours and indexes), the types
and bounds expected, a required field's name. What the client chose is never repeated: an
unknown field is named by where it is, with the fields we know there, and a value msgspec
would quote is not quoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ratekeeper.errors import BadRequest

__all__ = [
    "MAX_BATCH",
    "MAX_COST",
    "BatchResponse",
    "CheckRequestType",
    "ClearResult",
    "Decision",
    "ErrorBody",
    "FlagStates",
    "Health",
    "LimitState",
    "OriginFlag",
    "Problem",
    "Readiness",
    "RefundRequest",
    "RefundResult",
    "batch_request_type",
    "check_request_type",
    "decode",
]

MAX_COST = 1_000_000
MAX_BATCH = 1000
FIXED_FIELDS = ("action", "ip", "ip_hash", "cost")

ActionName = Annotated[str, Meta(min_length=1, max_length=128)]
SubjectValue = Annotated[str, Meta(min_length=1, max_length=1024)]
IPText = Annotated[str, Meta(min_length=1, max_length=64)]
Cost = Annotated[int, Meta(ge=0, le=MAX_COST)]

# Generated per config; every instance has .action .ip .ip_hash .cost and one attribute per
# subject field.
CheckRequestType = type[msgspec.Struct]


def check_request_type(subjects: Iterable[str]) -> CheckRequestType:
    """The ``POST /v1/check`` body type for a config whose rules key on ``subjects``."""
    fields: list[tuple[str, Any, Any]] = [
        ("action", ActionName, msgspec.NODEFAULT),
        ("ip", IPText | None, None),
        ("ip_hash", SubjectValue | None, None),
        ("cost", Cost, 1),
    ]
    fields += [(name, SubjectValue | None, None)
               for name in sorted(set(subjects)) if name not in FIXED_FIELDS]
    return msgspec.defstruct("CheckRequest", fields, forbid_unknown_fields=True,
                             kw_only=True)


def batch_request_type(check_type: CheckRequestType) -> type[msgspec.Struct]:
    """The ``POST /v1/check/batch`` body type."""
    checks = Annotated[list[check_type], Meta(min_length=1, max_length=MAX_BATCH)]  # type: ignore[valid-type]
    return msgspec.defstruct("BatchRequest", [("checks", checks)], forbid_unknown_fields=True)


class LimitState(msgspec.Struct, frozen=True):
    """One window of one rule, as the check answer reports it.

    ``reset`` is whole seconds, rounded up, until ``remaining`` next goes up (the oldest hit
    still counted leaves the window); ``reset_ms`` is the same in milliseconds. A window that
    holds no hits has nothing to wait for: both are 0 (and ``remaining`` is the limit).
    """

    rule: str
    limit: int
    window: int
    remaining: int
    reset: int
    # -1: not given, which is taken as the whole seconds (an answer built without the
    # milliseconds still says them, never less than the truth)
    reset_ms: int = -1

    def __post_init__(self) -> None:
        if self.reset_ms < 0:
            msgspec.structs.force_setattr(self, "reset_ms", self.reset * 1000)


RefundText = Annotated[str, Meta(
    description="a token for POST /v1/refund; absent when the check took nothing")]


class Decision(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer to one check."""

    allowed: bool
    reason: str | None
    action: str
    # Always sent: omit_defaults never calls a default_factory to compare a value with what
    # it makes, so of the fields below it leaves out only ``refund`` (when None).
    retry_after: int = msgspec.field(default_factory=lambda: 0)
    # the same in milliseconds (-1 when built without them: then the whole seconds')
    retry_after_ms: int = msgspec.field(default_factory=lambda: -1)
    flag: str | None = msgspec.field(default_factory=lambda: None)
    message: str | None = msgspec.field(default_factory=lambda: None)
    degraded: bool = msgspec.field(default_factory=lambda: False)
    shadow: bool = msgspec.field(default_factory=lambda: False)
    limits: list[LimitState] = msgspec.field(default_factory=lambda: [])
    # Sent only when hits were taken (None, and absent on the wire, for a look or a denial):
    # hand it to POST /v1/refund to give them back.
    refund: RefundText | None = None

    def __post_init__(self) -> None:
        if self.retry_after_ms < 0:
            msgspec.structs.force_setattr(self, "retry_after_ms", self.retry_after * 1000)


class BatchResponse(msgspec.Struct, frozen=True):
    """The answers to a batch, in the order of the checks."""

    results: list[Decision]


RefundToken = Annotated[str, Meta(min_length=1, max_length=4096)]


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``POST /v1/refund`` body: the token a check answer carried."""

    token: RefundToken


class RefundResult(msgspec.Struct, frozen=True):
    """The answer to a refund: given back, or why not (``already_refunded``, ``unavailable``)."""

    refunded: bool
    reason: str | None = None
    degraded: bool = False


class ClearResult(msgspec.Struct, frozen=True):
    """The answer to ``POST /v1/origin/clear``: whether the counters are gone, and how many
    keys held them (``reason``: why not, ``unavailable`` when Redis could not be asked)."""

    cleared: bool
    deleted: int = 0
    reason: str | None = None
    degraded: bool = False


class OriginFlag(msgspec.Struct, frozen=True):
    """One kill switch as the origin reads it: on or off, what to tell users, whether to
    show that site-wide (``notify``), and ``assumed`` when Redis holds no state for it (the
    config's ``assume`` decided)."""

    name: str
    enabled: bool
    message: str
    notify: bool = False
    assumed: bool = False
    expires_at: float | None = None


class FlagStates(msgspec.Struct, frozen=True):
    """``GET /v1/origin/flags``: every declared kill switch, by name (``stale``: a client's
    last known copy, kept because the sidecar could not be asked)."""

    flags: list[OriginFlag]
    stale: bool = False

    def enabled(self, name: str) -> bool:
        """True when flag ``name`` is on (a flag not listed is off)."""
        return any(flag.enabled for flag in self.flags if flag.name == name)

    def get(self, name: str) -> OriginFlag | None:
        """Flag ``name``, or None when it is not declared."""
        return next((flag for flag in self.flags if flag.name == name), None)

    def notifications(self) -> list[OriginFlag]:
        """The flags that are on and declared ``notify``: the site-wide banners to show."""
        return [flag for flag in self.flags if flag.enabled and flag.notify]


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx body: one sentence saying what is wrong."""

    error: str


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """An RFC 9457 problem: what a proxy or middleware answers a denied request with."""

    type: str
    title: str
    status: int
    detail: str
    flag: str | None = None
    violated_policies: list[str] | None = msgspec.field(default=None, name="violated-policies")


class Health(msgspec.Struct, frozen=True):
    """``GET /healthz``: the process answers; which worker process it is."""

    status: str
    pid: int


class Readiness(msgspec.Struct, frozen=True):
    """``GET /readyz``: whether Redis answers with the scripts loaded, and the breaker state."""

    status: str
    store: str
    breaker: str


# msgspec's sentences that hold nothing but what the schema says (types, bounds, our field
# names, our patterns); any other is replaced by one that does (``_validation_error``)
_SCHEMA_SENTENCE = re.compile(
    r"Expected `[\w |]+`(?:, got `[\w |]+`)?[^`]*|Object missing required field `\w+`|"
    r"(?:Integer value|Number) out of range")
_AT = re.compile(r"(.*) - at `(\$(?:\.\w+|\[\d+\]|\[\.\.\.\])*)`", re.DOTALL)
# "JSON is malformed: <what> (byte N)", where <what> is one of msgspec's fixed phrases
_MALFORMED = re.compile(r"JSON is malformed: [a-z0-9 ,:'\"\]\}\[\{-]+ \(byte \d+\)|"
                        r"Input data was truncated")


def _fields_at(root: msgspec.inspect.Type, path: str) -> list[str] | None:
    """The field names of the struct at ``path`` below ``root``, or None when there is none."""
    node = root
    for step in re.findall(r"\.\w+|\[[^\]]*\]", path):
        while isinstance(node, msgspec.inspect.UnionType):
            structs = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(structs) != 1:
                return None
            node = structs[0]
        if step.startswith(".") and isinstance(node, msgspec.inspect.StructType):
            found = [f.type for f in node.fields if f.encode_name == step[1:]]
            if not found:
                return None
            node = found[0]
        elif step.startswith("[") and isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        else:
            return None
    while isinstance(node, msgspec.inspect.UnionType):
        structs = [t for t in node.types if isinstance(t, msgspec.inspect.StructType)]
        if len(structs) != 1:
            return None
        node = structs[0]
    if isinstance(node, msgspec.inspect.StructType):
        return [f.encode_name for f in node.fields]
    return None


def _validation_error(decoder: msgspec.json.Decoder[Any], message: str) -> str:
    """msgspec's sentence for ``message`` with nothing in it the client chose."""
    located = _AT.fullmatch(message)
    what, path = (located.group(1), located.group(2)) if located else (message, "")
    where = f" - at `{path}`" if path else ""
    if what.startswith("Object contains unknown field"):
        known = _fields_at(msgspec.inspect.type_info(decoder.type), path or "$")
        fields = f" (expected: {', '.join(known)})" if known else ""
        return f"Object contains an unknown field{fields}{where}"
    if _SCHEMA_SENTENCE.fullmatch(what):
        return f"{what}{where}"
    return f"Invalid value{where}"


def decode(decoder: msgspec.json.Decoder[Any], body: bytes | bytearray) -> Any:
    """Decode a request body; bad input becomes BadRequest with a sentence that says what is
    wrong and where, in the schema's terms, never in the client's."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(_validation_error(decoder, str(exc))) from None
    except msgspec.DecodeError as exc:
        detail = str(exc)
        shown = f": {detail}" if _MALFORMED.fullmatch(detail) else ""
        raise BadRequest(f"malformed JSON{shown}") from None

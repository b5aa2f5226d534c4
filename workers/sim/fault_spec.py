"""The fault script of the simulated worker: what can go wrong, for which requests, and its syntax.

A script is an ordered list of ``FaultSpec`` rules plus the seed of the generator that draws
probabilistic ones. Each request takes at most one fault: the first rule, in order, that applies
to its endpoint, still has injections left (``count``) and wins its draw (``probability``). Scripted
tests use count-based rules, which are deterministic; the soak benchmark uses probabilities, which
are reproducible because the generator is seeded. The same model validates the simulator's
config (``--fault`` on the command line) and the body of ``POST /sim/faults``. It holds no runtime
state and imports nothing from the simulator, so ``SimConfig`` can embed it; the injector that
applies a script lives in ``workers.sim.faults``.

Command-line syntax: ``KIND[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``refuse``,
``status:status=503,count=2``, ``die_mid_stream:after_tokens=3,probability=0.1``; a spec that
starts with ``{`` is read as the JSON object that ``POST /sim/faults`` takes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FaultKind = Literal[
    "refuse",  # reset the connection at once, no HTTP response
    "status",  # answer an HTTP error with vLLM's error body
    "hang_before_first_byte",  # accept, then send no body byte until cleared or disconnected
    "die_mid_stream",  # after N tokens drop the connection: no [DONE], no chunked end
    "stall_between_tokens",  # after N tokens pause for stall_s seconds, then carry on
    "slow_tokens",  # every decoded token takes factor times as many engine steps
]
FaultScope = Literal["inference", "all"]

# HTTP status -> vLLM's error ``type`` (reference/vllm-interface.md §4.4); vLLM itself never says
# 429 or 502, so those carry the HTTP phrase, as its handler for HTTPException does.
FAULT_STATUS_TYPES: dict[int, str] = {
    429: "Too Many Requests",
    500: "InternalServerError",
    502: "Bad Gateway",
    503: "ServiceUnavailableError",
}

# Fields a rule of each kind may set besides kind, count, probability and scope; naming another
# one is an error rather than silently ignored, so a typo in a script cannot pass for a fault.
_KIND_FIELDS: dict[str, frozenset[str]] = {
    "refuse": frozenset(),
    "status": frozenset({"status", "retry_after_s"}),
    "hang_before_first_byte": frozenset(),
    "die_mid_stream": frozenset({"after_tokens"}),
    "stall_between_tokens": frozenset({"after_tokens", "stall_s"}),
    "slow_tokens": frozenset({"factor"}),
}
_COMMON_FIELDS = frozenset({"kind", "count", "probability", "scope"})
# Only these can happen before a response exists, so only these make sense on /health & co.
_ANY_ENDPOINT_KINDS = frozenset({"refuse", "status", "hang_before_first_byte"})


class FaultSpec(BaseModel):
    """One rule of a fault script."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    count: int | None = Field(
        default=None, ge=1, description="inject into this many requests, then stop; None: no end"
    )
    probability: float = Field(
        default=1.0, gt=0.0, le=1.0, description="chance that an eligible request gets the fault"
    )
    scope: FaultScope = Field(
        default="inference",
        description="'inference': completions and chat only; 'all': also /health, /v1/models, "
        "/metrics (never /sim/*)",
    )
    status: int = Field(default=503, description="HTTP status of a 'status' fault")
    retry_after_s: int | None = Field(
        default=None, ge=0, description="Retry-After header of a 'status' fault"
    )
    after_tokens: int = Field(
        default=0, ge=0, description="tokens sent before a die_mid_stream or stall_between_tokens"
    )
    stall_s: float = Field(default=5.0, ge=0.0, description="pause of stall_between_tokens")
    factor: float = Field(default=10.0, ge=1.0, description="per-token slowdown of slow_tokens")

    @model_validator(mode="after")
    def _check_fields(self) -> FaultSpec:
        stray = self.model_fields_set - _COMMON_FIELDS - _KIND_FIELDS[self.kind]
        if stray:
            raise ValueError(f"a {self.kind!r} fault takes no {', '.join(sorted(stray))}")
        if self.kind == "status" and self.status not in FAULT_STATUS_TYPES:
            allowed = ", ".join(map(str, sorted(FAULT_STATUS_TYPES)))
            raise ValueError(f"status must be one of {allowed}, got {self.status}")
        if self.scope == "all" and self.kind not in _ANY_ENDPOINT_KINDS:
            raise ValueError(f"a {self.kind!r} fault only applies to inference requests")
        return self

    def public(self) -> dict[str, Any]:
        """The fields that mean something for this kind, as JSON (``GET /sim/faults``)."""
        return self.model_dump(mode="json", include=set(_COMMON_FIELDS | _KIND_FIELDS[self.kind]))


class FaultScript(BaseModel):
    """The body of ``POST /sim/faults``: rules in priority order and the generator's seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    faults: tuple[FaultSpec, ...] = Field(default=(), max_length=64)
    seed: int = Field(default=0, description="seed of the draws of probabilistic rules")


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse one ``--fault`` value; raises ``ValueError`` with a message fit for the user."""
    text = text.strip()
    data: Any
    try:
        if text.startswith("{"):
            data = json.loads(text)
        else:
            kind, _, rest = text.partition(":")
            data = {"kind": kind.strip()}
            for item in filter(None, (part.strip() for part in rest.split(","))):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"expected KEY=VALUE, got {item!r}")
                # Values stay strings: pydantic's lax mode turns "3" into 3 for int fields.
                data[key.strip()] = value.strip()
        return FaultSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid fault {text!r}: {problems}") from None
    except ValueError as exc:  # bad JSON or a malformed KEY=VALUE
        raise ValueError(f"invalid fault {text!r}: {exc}") from None

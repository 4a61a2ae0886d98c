"""Frozen, checked configuration: one dataclass per concern, passed down.

Every ``from_dict`` accepts the YAML/JSON shape documented in ``docs/config.md``
(the operator writes exactly that shape into the sidecar's ConfigMap) and raises
``ValueError`` naming the offending field for anything it cannot accept.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

PREEMPTION_MODES = ("swap", "recompute", "off")
BATCHING_MODES = ("rebatch", "run_to_completion")
QUANTIZATIONS = ("none", "int8")


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


def _build(cls, data: Mapping[str, Any] | None, prefix: str):
    """Build dataclass ``cls`` from a mapping; every error names the field as ``prefix + name``."""
    if data is None:
        return cls()
    _check(isinstance(data, Mapping), prefix.rstrip(".") or cls.__name__, "must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{prefix}{unknown[0] if unknown else ''}", "unknown field")
    try:
        return cls(**dict(data))
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None


@dataclass(frozen=True)
class SLAClass:
    """Targets for one class of traffic; ``priority`` is the default for its requests."""

    priority: int = 0
    ttft_ms: float | None = None  # time to first token objective
    tpot_ms: float | None = None  # time per output token objective
    e2e_ms: float | None = None  # end-to-end latency objective

    def __post_init__(self) -> None:
        _check(isinstance(self.priority, int) and not isinstance(self.priority, bool),
               "priority", "must be an integer")
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, (int, float)) and value > 0), name,
                   "must be a positive number")


def default_sla_classes() -> dict[str, SLAClass]:
    return {
        "interactive": SLAClass(priority=0, ttft_ms=1000.0, tpot_ms=200.0),
        "batch": SLAClass(priority=10),
    }


@dataclass(frozen=True)
class PreemptionPolicy:
    mode: str = "swap"  # swap | recompute | off
    max_preemptions_per_request: int = 4

    def __post_init__(self) -> None:
        _check(self.mode in PREEMPTION_MODES, "mode", f"must be one of {PREEMPTION_MODES}")
        _check(isinstance(self.max_preemptions_per_request, int) and self.max_preemptions_per_request >= 0,
               "max_preemptions_per_request", "must be an integer >= 0")


@dataclass(frozen=True)
class PaddingPolicy:
    """Trades attention work wasted on padding against the copies that remove it.

    ``compaction_threshold``: when the live window uses less than this fraction of the
    allocated cache buffers (long rows have left), the buffers are re-packed tighter (one
    O(B*L) copy) to return memory.
    ``max_padding_ratio``: a newcomer whose insertion would push the ratio above this
    waits for a better-fitting moment unless it is urgent (length-aware admission).
    ``bucketing``: order admissions by prompt length so similar lengths run together.
    """

    compaction_threshold: float = 0.25
    max_padding_ratio: float = 0.9
    bucketing: bool = False

    def __post_init__(self) -> None:
        for name in ("compaction_threshold", "max_padding_ratio"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, name,
                   "must be a number in [0, 1]")
        _check(isinstance(self.bucketing, bool), "bucketing", "must be a boolean")


PREFILL_BUDGETS = ("time", "tokens")
PREFILL_MODES = ("fused", "separate")


@dataclass(frozen=True)
class PrefillPolicy:
    """How much of a waiting prompt one step prefills, and in which forward pass.

    ``budget``: ``time`` sizes each step's prefill from a live model of step cost so that,
    while rows are decoding, the step stays under the step-time target (``max_step_ms``);
    ``tokens`` uses ``limits.max_prefill_tokens`` alone (an upper bound in both).
    ``mode``: ``fused`` runs prompt chunks in the decode rows' forward pass, packed (the
    weights are read once per step) where the model allows; ``separate`` gives prefills a
    forward pass of their own before the decode pass.
    """

    budget: str = "time"
    mode: str = "fused"

    def __post_init__(self) -> None:
        _check(self.budget in PREFILL_BUDGETS, "budget", f"must be one of {PREFILL_BUDGETS}")
        _check(self.mode in PREFILL_MODES, "mode", f"must be one of {PREFILL_MODES}")


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 32
    max_kv_tokens: int = 65536  # counts padded slots: what the cache really holds
    max_queue: int = 256
    max_prefill_tokens: int = 512  # prefill tokens per engine step (padded); bounds how long a step stalls running rows

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f.name, "must be an integer >= 1")


@dataclass(frozen=True)
class PolicyConfig:
    """Everything an operator may change at run time, applied between engine steps."""

    preemption: PreemptionPolicy = field(default_factory=PreemptionPolicy)
    padding: PaddingPolicy = field(default_factory=PaddingPolicy)
    sla_classes: Mapping[str, SLAClass] = field(default_factory=default_sla_classes)
    aging_s: float = 30.0  # a waiting request gains one priority level per aging_s
    limits: Limits = field(default_factory=Limits)
    prefill: PrefillPolicy = field(default_factory=PrefillPolicy)
    # Step-time target of the time budget; None: the "interactive" class's tpot_ms.
    max_step_ms: float | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.aging_s, (int, float)) and self.aging_s > 0, "aging_s", "must be > 0")
        _check(self.max_step_ms is None or (isinstance(self.max_step_ms, (int, float))
                                            and not isinstance(self.max_step_ms, bool) and self.max_step_ms > 0),
               "max_step_ms", "must be a positive number")

    @property
    def step_target_ms(self) -> float | None:
        """The step-time target: ``max_step_ms``, else the interactive class's ``tpot_ms``."""
        if self.max_step_ms is not None:
            return float(self.max_step_ms)
        interactive = self.sla_classes.get("interactive")
        return interactive.tpot_ms if interactive is not None else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PolicyConfig":
        data = dict(data or {})
        known = {"preemption", "padding", "sla_classes", "aging_s", "limits", "prefill", "max_step_ms"}
        unknown = sorted(set(data) - known)
        _check(not unknown, unknown[0] if unknown else "", "unknown policy field")
        classes_raw = data.get("sla_classes")
        if classes_raw is None:
            classes = default_sla_classes()
        else:
            _check(isinstance(classes_raw, Mapping), "sla_classes", "must be a mapping")
            classes = {str(k): _build(SLAClass, v, f"sla_classes.{k}.") for k, v in classes_raw.items()}
        return cls(
            preemption=_build(PreemptionPolicy, data.get("preemption"), "preemption."),
            padding=_build(PaddingPolicy, data.get("padding"), "padding."),
            sla_classes=classes,
            aging_s=data.get("aging_s", 30.0),
            limits=_build(Limits, data.get("limits"), "limits."),
            prefill=_build(PrefillPolicy, data.get("prefill"), "prefill."),
            max_step_ms=data.get("max_step_ms"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EngineConfig:
    """Fixed at start-up: the model and how the engine batches."""

    model: str | None = None  # local transformers dir or .gguf file; None = embedded default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    batching: str = "rebatch"  # rebatch | run_to_completion
    max_model_len: int | None = None  # None = the model's own context length
    # auto: on CPU, run 2- or 3-row decode steps at the row count the matmuls are fastest at
    # (measured at start-up, see engine/row_padding.py); off: never add dummy rows.
    decode_row_padding: str = "auto"
    # int8: every linear layer int8 (W8A8, per-row activations; CPU only; see quantization.py).
    quantization: str = "none"  # none | int8

    def __post_init__(self) -> None:
        _check(self.batching in BATCHING_MODES, "batching", f"must be one of {BATCHING_MODES}")
        _check(self.decode_row_padding in ("auto", "off"), "decode_row_padding", "must be auto or off")
        _check(self.dtype in ("float32", "float16", "bfloat16", "auto"), "dtype",
               "must be float32, float16, bfloat16 or auto")
        _check(self.quantization in QUANTIZATIONS, "quantization", f"must be one of {', '.join(QUANTIZATIONS)}")


@dataclass(frozen=True)
class RouterConfig:
    """A/B split between the in-process Baton engine and the incumbent server."""

    incumbent_url: str | None = None  # e.g. http://127.0.0.1:8000; None = all traffic to Baton
    baton_weight: float = 100.0  # percent of traffic to Baton, 0..100
    sticky_header: str = "x-baton-session"  # hash this header (or the body's `user`) to pick an arm
    fallback_to_baton: bool = False  # on incumbent failure, retry on Baton (counted)
    incumbent_timeout_s: float = 300.0
    # Of the requests the incumbent serves, the percent also run on Baton and discarded (mirroring),
    # for paired statistics; the client always gets the incumbent's answer.
    shadow_percent: float = 0.0
    profile_text: bool = False  # the traffic profile ring keeps prompt text (else token counts only)

    def __post_init__(self) -> None:
        _check(isinstance(self.baton_weight, (int, float)) and not isinstance(self.baton_weight, bool)
               and 0 <= self.baton_weight <= 100,
               "baton_weight", "must be a number in [0, 100]")
        _check(isinstance(self.shadow_percent, (int, float)) and not isinstance(self.shadow_percent, bool)
               and 0 <= self.shadow_percent <= 100, "shadow_percent", "must be a number in [0, 100]")
        _check(isinstance(self.profile_text, bool), "profile_text", "must be a boolean")
        _check(self.incumbent_url is None or (isinstance(self.incumbent_url, str)
                                              and self.incumbent_url.startswith(("http://", "https://"))
                                              and not urllib.parse.urlsplit(self.incumbent_url).query
                                              and "#" not in self.incumbent_url),
               "incumbent_url", "must be an http(s) URL without a query or fragment (the client's path "
                                "and query are appended to it)")
        _check(isinstance(self.sticky_header, str) and bool(self.sticky_header), "sticky_header",
               "must be a non-empty header name")
        _check(isinstance(self.fallback_to_baton, bool), "fallback_to_baton", "must be a boolean")
        _check(isinstance(self.incumbent_timeout_s, (int, float)) and not isinstance(self.incumbent_timeout_s, bool)
               and self.incumbent_timeout_s > 0, "incumbent_timeout_s", "must be a positive number")

    @property
    def incumbent_base(self) -> str | None:
        """``incumbent_url`` without credentials (``http://user:token@host/v1`` -> ``http://host/v1``): the
        base the proxy appends the client's path to (it sends them as Basic auth, ``proxy.with_credentials``),
        and what reports, logs and error messages show."""
        if self.incumbent_url is None:
            return None
        parts = urllib.parse.urlsplit(self.incumbent_url)
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RouterConfig":
        return _build(cls, data, "router.")


TOOL_CALL_PARSERS = ("hermes",)  # <tool_call>{"name", "arguments"}</tool_call> blocks (server/tools.py)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str = "baton-default"
    max_body_bytes: int = 1 << 20
    config_file: str | None = None  # sidecar file with `policy:` and `router:` sections, hot-reloaded
    policy_file: str | None = None  # a file with only the policy section; hot-reloaded when no config_file
    admin_token: str | None = None  # bearer token for /admin; None disables admin endpoints
    drain_timeout_s: float = 30.0
    # Slow clients: a request's headers must arrive within header_timeout_s of its first byte, and a
    # body may pause at most body_timeout_s between reads; otherwise the connection is closed / 408.
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    # Chat prompts: a Jinja template replacing the tokenizer's own (vLLM's --chat-template); None
    # keeps the tokenizer's, or for tool calls the shipped Hermes one when the tokenizer's knows no tools.
    chat_template: str | None = None
    tool_call_parser: str = "hermes"  # how auto tool calls are read back (TOOL_CALL_PARSERS)

    def __post_init__(self) -> None:
        _check(self.tool_call_parser in TOOL_CALL_PARSERS, "tool_call_parser",
               f"must be one of {', '.join(TOOL_CALL_PARSERS)}")
        for name in ("drain_timeout_s", "header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                   name, "must be a positive number")

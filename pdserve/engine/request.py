"""Requests inside the engine: sampling parameters, per-request state and per-step outputs.

Parameter names are SGLang's (``max_new_tokens``, ``stop_token_ids``, ``min_p`` ...) so a
``sampling_params`` dict written for SGLang works unchanged.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pdserve.request_bodies import SAMPLING_PARAMS, check_sampling_key

MAX_TEMPERATURE = 100.0  # the distribution is near uniform long before; 1e39 overflows float32 to inf
MIN_REPETITION_PENALTY = 1e-2  # SGLang allows (0, 2]; dividing logits by ~0 overflows to inf
MAX_INT = 2**31 - 1  # token counts and top_k (the tensors that carry them are int32-safe)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k")


class RequestError(ValueError):
    """Invalid request input; the message names the offending field and the allowed range."""


MAX_STOP_STRINGS = 64  # each output token is checked against every stop string
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
INT_LIMIT = 1 << 63  # integer parameters must lie in (-2^63, 2^63): they travel as int64


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1
    # structured output (engine/grammar.py): at most one of these, SGLang's names
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    _ALIASES = {"sampling_seed": "seed"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> SamplingParams:
        """Validate a user-supplied dict; unknown keys and wrong types raise :class:`RequestError`."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise RequestError(f"sampling_params must be an object, got {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = cls._ALIASES.get(key, key)
            if name not in known:
                if check_sampling_key(key, value):  # SGLang's, at a value that asks for nothing
                    continue
                off = SAMPLING_PARAMS.off.get(key)
                raise RequestError(
                    f"unsupported field: sampling_params.{key} ("
                    + (f"only accepted with a value in {list(off)}" if off else f"known: {', '.join(sorted(known))}")
                    + ")"
                )
            if value is None:
                continue
            values[name] = _coerce(name, value, known[name].type)
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        """Every number finite and in a range the sampler computes safely with (SGLang's ranges,
        where it has one); a :class:`RequestError` names the first field that is not."""
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not -MAX_INT <= value <= MAX_INT:
                raise RequestError(f"{name} must be in [{-MAX_INT}, {MAX_INT}], got {value}")
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= max(self.max_new_tokens, 0):
            raise RequestError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise RequestError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.frequency_penalty <= 2:
            raise RequestError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise RequestError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2:
            raise RequestError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, 2], got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise RequestError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        if self.n < 1:
            raise RequestError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise RequestError(f"stop strings may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(
                f"stop_token_ids has {len(self.stop_token_ids)} entries; at most {MAX_STOP_TOKEN_IDS} are allowed"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a JSON value against the field's declared type, allowing int for float."""
    kind = str(annotation)
    if name == "stop":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise RequestError("stop must be a string or a list of strings")
    if name == "stop_token_ids":
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if any(not -INT_LIMIT < t < INT_LIMIT for t in value):
                raise RequestError("stop_token_ids entries must be 64-bit integers")
            return list(value)
        raise RequestError("stop_token_ids must be a list of integers")
    if kind.startswith("str"):
        if isinstance(value, str):
            return value
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise RequestError(f"{name} must be a boolean, got {type(value).__name__}")
    if kind.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT < value < INT_LIMIT:
                raise RequestError(f"{name} must be a 64-bit integer, got one of {len(str(abs(value)))} digits")
            return value
        raise RequestError(f"{name} must be an integer, got {value!r}"[:300])
    if kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RequestError(f"{name} must be a number, got {value!r}")
    return value


def sample_rid(rid: str, index: int) -> str:
    """The rid of sample ``index`` (>= 1) of a request with ``n`` > 1; sample 0 keeps ``rid``."""
    return f"{rid}.s{index}"


@dataclass
class TokenLogprobs:
    """Logprobs of some tokens: ``values[i]`` for ``ids[i]``, plus top-k alternatives per position."""

    ids: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] | None = None


class ReqState(enum.Enum):
    WAITING = "waiting"  # queued, no KV yet (or retracted)
    WAITING_KV = "waiting_kv"  # pages allocated, KV being filled by another server (P/D decode)
    PREFILLING = "prefilling"  # prompt chunks being computed
    DECODING = "decoding"
    PREFILL_DONE = "prefill_done"  # P/D prefill: KV computed and held until handed off
    FINISHED = "finished"


@dataclass
class Attempt:
    """One try at running a request: what a retraction drops (nano-vllm's "free the block table,
    requeue"). A retracted request starts a fresh attempt; its identity, parameters and output stay
    on the :class:`Req`."""

    slot: int | None = None  # its running slot (resources.SlotTable), held while it may run
    pages: list[int] = field(default_factory=list)  # one page reference each
    num_computed: int = 0  # tokens whose KV is in the pool (chunk progress)
    input_logprobs: TokenLogprobs | None = None  # accumulated across this attempt's prefill chunks


@dataclass
class Req:
    """One generation request as the scheduler sees it: identity, parameters and output, plus the
    :class:`Attempt` now running it."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stop_after_prefill: bool = False  # P/D prefill side: keep KV after the first token
    prefilled_externally: bool = False  # P/D decode side: KV arrives from a prefill server
    # --- durable state (survives retraction) ---
    state: ReqState = ReqState.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    generator: Any = None  # torch.Generator when seeded
    penalty_counts: Any = None  # sampler.PenaltyCounts of output tokens, for penalties
    arrival_order: int = 0
    num_retractions: int = 0
    stalled_since: float | None = None  # retracted after its first token: when it last stopped running
    stalled_s: float = 0.0  # seconds spent retracted after its first token, earlier waits only
    num_preempted: int = 0  # times retracted to make room for a request that had waited longer
    priority_tried: bool = False  # its priority was applied during the current wait
    cached_tokens: int = 0
    decode_cached_tokens: int = 0  # P/D decode: leading prompt tokens whose KV this rank's cache held
    grammar: Any = None  # llguidance matcher when the output is constrained (engine/grammar.py)
    history: list[str] = field(default_factory=list)  # state changes, for integrity reports
    # --- this attempt (dropped by retraction) ---
    attempt: Attempt = field(default_factory=Attempt)

    @property
    def pages(self) -> list[int]:
        return self.attempt.pages

    @pages.setter
    def pages(self, pages: list[int]) -> None:
        self.attempt.pages = pages

    @property
    def num_computed(self) -> int:
        return self.attempt.num_computed

    @num_computed.setter
    def num_computed(self, count: int) -> None:
        self.attempt.num_computed = count

    @property
    def num_samples(self) -> int:
        """Ids this request answers for: itself and its samples (the P/D prefill side never forks)."""
        return 1 if self.stop_after_prefill else self.params.n

    @property
    def fill_target(self) -> int:
        """Tokens whose KV must be computed before the next decode step (all but the newest token
        once there is output, else the whole prompt)."""
        return self.seq_len - 1 if self.output_ids else len(self.input_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)


@dataclass
class StepOutput:
    """What one scheduler step produced for one request."""

    rid: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    output_logprobs: TokenLogprobs | None = None
    input_logprobs: TokenLogprobs | None = None  # sent once, when the prompt finished prefilling
    prompt_tokens: int = 0
    cached_tokens: int = 0

"""Model architecture description parsed from a Hugging Face ``config.json``.

Both transformers 4.x and 5.x spellings are accepted (``rope_theta``/``rope_scaling`` vs
``rope_parameters``, ``torch_dtype`` vs ``dtype``). Everything the forward pass needs is
normalised into one frozen dataclass so the rest of pdserve never reads raw config dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


class ModelConfigError(ValueError):
    """A checkpoint's configuration is missing a field, malformed or unsupported."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: base ``theta`` and an optional scaling rule."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Normalised description of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r} in config.json 'architectures'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"unsupported hidden_act {raw.get('hidden_act')!r}; supported: silu")

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelConfigError(f"config.json is missing required field {key!r} for {arch}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = int(raw.get("head_dim") or hidden // heads)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_parse_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Read RoPE settings from either the 4.x (``rope_theta`` + ``rope_scaling``) or 5.x
    (``rope_parameters``) spelling."""
    params = raw.get("rope_parameters")
    scaling = dict(params) if isinstance(params, dict) else dict(raw.get("rope_scaling") or {})
    theta = float(scaling.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype picked for a model, and why when ``auto`` did not follow the checkpoint."""

    dtype: torch.dtype
    fallback_reason: str | None = None  # set when auto ran float32 instead of the checkpoint's half dtype


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None,
                  detect_bf16_isa: Callable[[], str | None] | None = None) -> DtypeChoice:
    """Pick the compute dtype: an explicit choice, else ``auto`` (``None`` means ``auto``).

    ``auto`` on CUDA: the checkpoint's bf16/fp16, else bfloat16. ``auto`` on CPU: a bf16 or fp16
    checkpoint runs in bfloat16 where the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16;
    ``detect_bf16_isa``, by default :func:`pdserve.models.cpu_features.bf16_isa`), else float32 with the
    reason; a float32 checkpoint (the embedded default model's) runs in float32.
    """
    if isinstance(name, torch.dtype):
        return DtypeChoice(name)
    if name in (None, "", "default", "auto"):
        stored = DTYPES.get(checkpoint_dtype or "")
        if device.type != "cpu":
            return DtypeChoice(stored if stored in HALF_DTYPES else torch.bfloat16)
        if stored not in HALF_DTYPES:
            return DtypeChoice(torch.float32)
        if detect_bf16_isa is None:
            from pdserve.models.cpu_features import bf16_isa as detect_bf16_isa
        if detect_bf16_isa():
            return DtypeChoice(torch.bfloat16)
        return DtypeChoice(torch.float32, f"the checkpoint is {checkpoint_dtype} but this CPU has neither AMX-BF16 nor "
                                          "AVX512-BF16, where bf16 runs emulated and slower than float32 "
                                          "(--dtype bfloat16 forces it)")
    if name not in DTYPES:
        raise ModelConfigError(f"unsupported dtype {name!r}; supported: float32, bfloat16, float16, auto")
    return DtypeChoice(DTYPES[name])

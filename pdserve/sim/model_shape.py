"""What the cost models need to know about a model, read from its ``config.json`` alone (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.sim.hardware import SimConfigError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4, "float": 4, "half": 2}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-family decoder; ``dtype_bytes`` applies to weights and KV alike."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, raw: dict[str, Any], dtype_bytes: int = 2) -> ModelShape:
        def need(key: str) -> int:
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SimConfigError(f"config.json field {key!r} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )

    @classmethod
    def from_folder(cls, folder: str | Path, dtype_bytes: int = 2) -> ModelShape:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise SimConfigError(f"--model-path {folder}: no config.json there (a sim model needs only config.json)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SimConfigError(f"{path}: not readable JSON: {e}") from e
        if not isinstance(raw, dict):
            raise SimConfigError(f"{path}: must hold a JSON object")
        return cls.from_config(raw, dtype_bytes)

    @property
    def layer_params(self) -> int:
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        return attn + 3 * d * self.intermediate_size + 2 * d

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + heads + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token (the embedding lookup is free, the LM head is not)."""
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

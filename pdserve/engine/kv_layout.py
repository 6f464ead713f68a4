"""The shape of a KV page that two pools must share before pages can be copied between them.

Torch-free: it travels in the P/D wire messages (:mod:`pdserve.disagg.messages`), which the
front and the router import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on before pages can be copied between two pools."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str

    @property
    def page_numel(self) -> int:
        return 2 * self.page_size * self.num_kv_heads * self.head_dim

    def mismatch(self, other: KVLayout) -> str | None:
        """Human-readable description of the first difference, or None when compatible."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                hint = (" (prefill and decode must run the same --dtype; auto picks bfloat16 only on CPUs with "
                        "AMX-BF16 or AVX512-BF16)" if name == "dtype" else "")
                return f"{name} differs: {mine} vs {theirs}{hint}"
        return None

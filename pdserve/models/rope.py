"""Rotary position embeddings (HF "rotate_half" convention) with default, linear and llama3 scaling."""

from __future__ import annotations

import math

import torch

from pdserve.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Always computed on the CPU, whatever the default device, as transformers computes them: on
    CUDA, ``pow`` may differ from the CPU's in the last bit, and float32 greedy output must stay
    token-identical to transformers'."""
    arange = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (rope.theta ** (arange.float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        ambient = torch.empty(0).device  # the default device of the caller's context
        # On the meta device (a checkpoint's skeleton) the tables are built on the CPU: meta ops that
        # PyTorch implements in Python import torch._dynamo, seconds of every worker's start.
        build = torch.device("cpu") if ambient.type == "meta" else ambient
        positions = torch.arange(max_positions, dtype=torch.float32, device=build)
        freqs = torch.outer(positions, inverse_frequencies(rope, head_dim).to(build))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(ambient), persistent=False)
        self.register_buffer("sin", emb.sin().to(ambient), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of ``positions`` [T]: looked up once per step, shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hkv, D] by their positions [T]."""
        cos, sin = self.tables(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [T, H, D] rotated by the per-token tables from :meth:`RotaryEmbedding.tables`."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

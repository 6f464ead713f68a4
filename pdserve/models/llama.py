"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Module and parameter names follow Hugging Face so checkpoints load without renaming.
Differences between the architectures are flags on :class:`ModelConfig`: Qwen2's q/k/v bias,
Qwen3's per-head q/k RMSNorm, tied embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.models import native
from pdserve.models.attention import AttentionMetadata, paged_attention
from pdserve.models.config import ModelConfig
from pdserve.models.rope import RotaryEmbedding, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and native.fused_ok(x) and x.is_contiguous() and self.weight.dtype == x.dtype:
            return native.add_rms_norm(x, None, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + residual`` and its norm; the fused kernel adds into ``x`` in place (a layer's own input)."""
        if (native.fused_ok(x) and x.is_contiguous() and residual.is_contiguous() and x.dim() == 2
                and residual.dtype == x.dtype == self.weight.dtype):
            return x, native.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, self(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj: nn.Linear | None = None
        self.qkv_sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)

    def fuse(self) -> None:
        """Replace q/k/v projections by one matmul (same weights, stacked) for inference speed."""
        self.qkv_proj = _stack_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``rope``: the step's cos/sin tables (:meth:`RotaryEmbedding.tables`)."""
        t = x.shape[0]
        cos, sin = rope
        nq, nkv = self.num_heads, self.num_kv_heads
        if self.qkv_proj is not None and not self.qk_norm:
            qkv = self.qkv_proj(x)
            if native.fused_ok(qkv) and cos.dtype == qkv.dtype and cos.is_contiguous() and sin.is_contiguous():
                # one pass, contiguous q and k
                q, k = native.rope(qkv, cos, sin, nq, nkv, self.head_dim)
                v = qkv.view(t, nq + 2 * nkv, self.head_dim)[:, nq + nkv :]
            else:
                qkv = qkv.view(t, nq + 2 * nkv, self.head_dim)
                qk = rotate(qkv[:, : nq + nkv], cos, sin)  # q and k heads rotated in one pass
                q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv :]
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.reshape(t, nq, self.head_dim)
            k = k.reshape(t, nkv, self.head_dim)
            v = v.reshape(t, nkv, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = paged_attention(q, k, v, kv_layer, meta, self.scale)
        return self.o_proj(o.reshape(t, nq * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """Replace gate/up projections by one matmul (same weights, stacked)."""
        self.gate_up_proj = _stack_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if native.fused_ok(gate_up) and gate_up.is_contiguous():
                act = native.silu_mul(gate_up)  # None in bf16 without AVX512-BF16 (torch's ops are faster)
                if act is not None:
                    return self.down_proj(act)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, kv_layer, meta) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), rope, kv_layer, meta))
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The loader fills every weight. An explicit (empty) weight skips nn.Embedding's normal_() init,
        # which on the meta device imports torch._dynamo: ~3.4 s of every worker's start on this CPU.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Causal LM whose forward reads and writes a paged KV cache (one tensor per layer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up weights into single matmuls (idempotent; after loading weights)."""
        for layer in self.model.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up_proj is None:
                layer.mlp.fuse()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for flat tokens ``input_ids`` [T]."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        for layer, kv_layer in zip(self.model.layers, kv_cache, strict=True):
            x = layer(x, rope, kv_layer, meta)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _stack_linears(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused

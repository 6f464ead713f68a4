"""Runs one forward step of the model over a mixed batch of decode tokens and prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.decode_graphs import DecodeGraphs
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.request import Req
from pdserve.models.attention import AttentionMetadata, Workspace
from pdserve.models.llama import LlamaForCausalLM


@dataclass
class ExtendChunk:
    """A prefill chunk: tokens ``[start, start + length)`` of ``req.all_ids``."""

    req: Req
    start: int
    length: int
    logit_from: int | None = None  # first position (absolute) whose logits are needed for input logprobs
    needs_sample: bool = False  # last position's logits are needed to sample the first output token


@dataclass
class ForwardBatch:
    decodes: list[Req] = field(default_factory=list)
    extends: list[ExtendChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.extends)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.extends)


@dataclass
class ForwardResult:
    decode_logits: torch.Tensor | None  # [num_decodes, V]
    sample_logits: dict[str, torch.Tensor]  # rid -> [V] logits of the last prompt position
    input_logits: dict[str, tuple[int, torch.Tensor]]  # rid -> (first position, [n, V] logits)


class ModelRunner:
    """Owns the model and builds tensors for :class:`ForwardBatch` steps."""

    def __init__(self, model: LlamaForCausalLM, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.workspace = Workspace()
        self.kv_written: torch.cuda.Event | None = None  # CUDA: recorded after each step's KV writes
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, max_bs: int, context_length: int) -> DecodeGraphs:
        """Run decode-only steps of up to ``max_bs`` rows over static padded buffers, captured as CUDA
        graphs on a GPU (:mod:`pdserve.engine.decode_graphs`); takes one scratch page from the pool."""
        self.decode_graphs = DecodeGraphs(self.model, self.pool, self.device, max_bs, context_length,
                                          capture=self.device.type == "cuda")
        return self.decode_graphs

    def wait_kv_written(self) -> None:
        """Block until the KV written by the last step is in device memory (no-op on CPU): P/D calls
        this before a transfer backend reads pages."""
        if self.kv_written is not None:
            self.kv_written.synchronize()

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        batch.decodes.sort(key=lambda r: r.seq_len)  # similar lengths share a padded attention group
        graphs = self.decode_graphs
        if not batch.extends and graphs is not None and graphs.can_run(batch.decodes):
            logits = graphs.forward(batch.decodes)
            self._record_kv_written()
            return ForwardResult(decode_logits=logits, sample_logits={}, input_logits={})
        ids: list[int] = []
        positions: list[int] = []
        for req in batch.decodes:
            ids.append(req.output_ids[-1] if req.output_ids else req.input_ids[-1])
            positions.append(req.seq_len - 1)
        extend_rows = []
        for chunk in batch.extends:
            ids.extend(_token_slice(chunk.req, chunk.start, chunk.start + chunk.length))
            positions.extend(range(chunk.start, chunk.start + chunk.length))
            extend_rows.append((chunk.start, chunk.length, chunk.req.pages))
        meta = AttentionMetadata.build(
            self.pool.page_size,
            [r.pages for r in batch.decodes],
            [r.seq_len for r in batch.decodes],
            extend_rows,
            self.device,
            self.workspace,
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta,
            self.pool.layers,
        )
        self._record_kv_written()
        n_dec = len(batch.decodes)
        rows: list[int] = list(range(n_dec))
        sample_at: dict[str, int] = {}
        input_at: dict[str, tuple[int, int, int]] = {}
        row = n_dec
        for chunk in batch.extends:
            if chunk.logit_from is not None and chunk.logit_from < chunk.start + chunk.length:
                first = max(chunk.logit_from, chunk.start)
                input_at[chunk.req.rid] = (first, len(rows), chunk.start + chunk.length - first)
                rows.extend(range(row + first - chunk.start, row + chunk.length))
            if chunk.needs_sample:
                last = row + chunk.length - 1
                if chunk.req.rid in input_at:
                    sample_at[chunk.req.rid] = len(rows) - 1
                else:
                    sample_at[chunk.req.rid] = len(rows)
                    rows.append(last)
            row += chunk.length
        logits = self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
        return ForwardResult(
            decode_logits=logits[:n_dec] if n_dec else None,
            sample_logits={rid: logits[i] for rid, i in sample_at.items()},
            input_logits={rid: (first, logits[i : i + n]) for rid, (first, i, n) in input_at.items()},
        )

    def _record_kv_written(self) -> None:
        if self.device.type == "cuda":
            self.kv_written = torch.cuda.Event()
            self.kv_written.record()


def _token_slice(req: Req, start: int, end: int) -> list[int]:
    """``req.all_ids[start:end]`` without concatenating prompt and output first."""
    n = len(req.input_ids)
    if end <= n:
        return req.input_ids[start:end]
    return req.input_ids[start:] + req.output_ids[max(start - n, 0) : end - n]

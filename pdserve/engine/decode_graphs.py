"""Decode steps over static, padded input buffers, captured and replayed as CUDA graphs on a GPU.

A decode-only step of ``n`` rows runs at the smallest *bucket* batch size ``b >= n`` (1, 2, 4, 8,
then multiples of 8 up to ``max_bs``) and the narrowest block-table *width* (512, 1024, 2048 or
4096 tokens, capped by the context length) that holds its longest row: off the native CPU kernel,
attention gathers and attends the table's full width, so a batch of short rows must not pay for
4096 positions. Its inputs live in buffers allocated once: token ids, positions and an int32 block
table ``[max_bs, max width]``; everything else attention needs (context lengths, the KV slot of each
new token) is computed from them inside the step. Rows ``n..b`` are
padding: token 0 at position 0, every block-table entry the *scratch page*. The scratch page is one
page the engine reserves from the pool (``KVPool.alloc(1, reserved=True)``) when the buffers are
built and holds for its life, so by the pool's own ownership rules no request, cache or transfer can
ever hold it, and the pool counts it neither in use nor in the capacity requests can fill: padded
rows write their K/V there and nowhere else, and their outputs are sliced off.

On CUDA each (batch size, width) forward (model and LM head) is captured once as a CUDA graph at start and
replayed with the buffers refilled; capture failure logs the reason and the engine decodes eagerly.
Elsewhere (CPU tests) the same buffers run the same code eagerly, so everything except
capture and replay is exercised without a GPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.request import Req
from pdserve.models.attention import AttentionMetadata, StaticDecode
from pdserve.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

GRAPH_WIDTHS = (512, 1024, 2048, 4096)  # block-table widths in tokens; a step takes the narrowest that fits
GRAPH_MAX_CONTEXT = GRAPH_WIDTHS[-1]  # tokens a static decode row can attend; longer rows run eagerly


def batch_buckets(max_bs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8 below ``max_bs``, then ``max_bs``."""
    if max_bs < 1:
        raise ValueError(f"the largest decode graph batch size must be >= 1, got {max_bs}")
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs, 8))
    return [*sizes, max_bs]


class DecodeGraphs:
    """Static decode buffers for the padded batch sizes ``batch_buckets(max_bs)`` and the widths
    :data:`GRAPH_WIDTHS`; with ``capture`` (CUDA only) one CUDA graph per batch size and width,
    captured here."""

    def __init__(self, model: LlamaForCausalLM, pool: KVPool, device: torch.device, max_bs: int,
                 context_length: int, capture: bool) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.buckets = batch_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        self.page_size = pool.page_size
        self.width = pool.pages_for(min(context_length, GRAPH_MAX_CONTEXT))
        self.widths = sorted({min(pool.pages_for(tokens), self.width) for tokens in GRAPH_WIDTHS})  # in pages
        self.scratch_page = pool.alloc(1, reserved=True)[0]  # the engine's for its life: no request can own it
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.block_table = torch.full((self.max_bs, self.width), self.scratch_page, dtype=torch.int32, device=device)
        self.rows = torch.arange(self.max_bs, dtype=torch.int32, device=device)
        self._dirty = [0] * self.max_bs  # per block-table row: leading columns that may hold a request's pages
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (bs, width) ->
        self.runs: Counter[tuple[int, int]] = Counter()  # (rows, padded batch size) -> steps
        self.width_runs: Counter[int] = Counter()  # block-table width (pages) -> steps
        self.declined = 0  # decode-only steps too large or too long for the buffers (run eagerly)
        if capture:
            self._capture_all()

    def can_run(self, decodes: Sequence[Req]) -> bool:
        """Whether this decode-only batch fits the buffers (else the runner steps it eagerly)."""
        limit = self.width * self.page_size
        if 0 < len(decodes) <= self.max_bs and all(r.seq_len <= limit for r in decodes):
            return True
        self.declined += 1
        return False

    def forward(self, decodes: Sequence[Req]) -> torch.Tensor:
        """Logits ``[len(decodes), vocab]`` of the next token of every row; on CUDA a view of the
        graph's output buffer, valid until the next step."""
        n = len(decodes)
        bs = next(b for b in self.buckets if b >= n)
        width = self._fill(decodes, bs)
        self.runs[(n, bs)] += 1
        self.width_runs[width] += 1
        graph = self.graphs.get((bs, width))
        if graph is None:
            return self._run(bs, width)[:n]
        graph[0].replay()
        return graph[1][:n]

    def _fill(self, decodes: Sequence[Req], bs: int) -> int:
        """Write the step's rows into the buffers; returns the width (pages) the step runs at."""
        n, page_size, scratch = len(decodes), self.page_size, self.scratch_page
        ids = [0] * bs
        positions = [0] * bs
        used = [(r.seq_len + page_size - 1) // page_size for r in decodes] + [0] * (bs - n)
        # rewrite every column an earlier step left a page in: unused entries always name the scratch page
        columns = max(max(used), *self._dirty[:bs])
        table: list[int] = []
        for i, req in enumerate(decodes):
            ids[i] = req.output_ids[-1] if req.output_ids else req.input_ids[-1]
            positions[i] = req.seq_len - 1
            table += req.pages[: used[i]]
            table += [scratch] * (columns - used[i])
        table += [scratch] * (columns * (bs - n))
        self._dirty[:bs] = used
        self.input_ids[:bs].copy_(torch.tensor(ids, dtype=torch.long))
        self.positions[:bs].copy_(torch.tensor(positions, dtype=torch.long))
        self.block_table[:bs, :columns].copy_(torch.tensor(table, dtype=torch.int32).view(bs, columns))
        return next(w for w in self.widths if w >= max(used))

    def _run(self, bs: int, width: int) -> torch.Tensor:
        """The step of one batch size and width, from the buffers alone (the region a CUDA graph captures)."""
        positions = self.positions[:bs]
        table = self.block_table[:bs, :width]
        slot_pages = table.gather(1, (positions // self.page_size).unsqueeze(1)).squeeze(1).long()
        slot_offsets = positions % self.page_size
        k_slots = slot_pages * (2 * self.page_size) + slot_offsets
        meta = AttentionMetadata(
            page_size=self.page_size, slot_pages=slot_pages, slot_offsets=slot_offsets, k_slots=k_slots,
            v_slots=k_slots + self.page_size, num_decode=bs, decode_pages=[], decode_kv_lens=[], extends=[],
            workspace=None, device=self.device,
            static=StaticDecode(table, self.rows[:bs], (positions + 1).to(torch.int32), self.page_size),
        )
        hidden = self.model(self.input_ids[:bs], positions, meta, self.pool.layers)
        return self.model.compute_logits(hidden)

    def _capture_all(self) -> None:
        """One CUDA graph per batch size and width, largest first, sharing one memory pool (buffers
        hold padding, so warm-up and capture write only the scratch page). Any failure: no graphs,
        eager decode."""
        bs, width = self.max_bs, self.width
        try:
            mempool = torch.cuda.graph_pool_handle()
            for width in reversed(self.widths):
                for bs in reversed(self.buckets):
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        self._run(bs, width)  # warm-up: lazy initialisation and allocations outside the capture
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=mempool):
                        out = self._run(bs, width)
                    self.graphs[(bs, width)] = (graph, out)
        except Exception as exc:  # any capture failure: decode still works, eagerly
            self.graphs.clear()
            log.warning("CUDA graph capture failed at decode batch size %d, width %d tokens (%s: %s); decode runs "
                        "without CUDA graphs", bs, width * self.page_size, type(exc).__name__, exc)
            return
        log.info("captured CUDA graphs for decode batch sizes %s x widths %s tokens", self.buckets,
                 [w * self.page_size for w in self.widths])

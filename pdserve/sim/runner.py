"""The sim model runner: same interface as :class:`pdserve.engine.model_runner.ModelRunner`, but
``forward`` asks a cost model how long the step takes and waits that long; no tensors are built.

Tokens come from :meth:`SimRunner.sample` (the scheduler's sampler in sim mode): a cheap hash of
(rid, position) into the vocabulary, never an end-of-sequence id, so outputs are deterministic and
every request runs to ``max_new_tokens`` unless a stop condition matches. Logprobs are reported as
0.0 (the simulated model is certain).

Timing: a step starts when the previous one ended if the Python work between them fits in the
modelled per-step overhead (it is part of that overhead), else now; the rank then sleeps until
``start + duration * time_scale``. :attr:`SimRunner.clock` keeps modelled vs real time for drift.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.request import Req, TokenLogprobs
from pdserve.sim.cost_model import CostModel, StepShape
from pdserve.sim.faults import FaultPlan

ABSORB_S = 0.002  # Python time between steps up to this (scaled) counts as the modelled step overhead


class _NoLogits:
    """What ``ForwardResult`` carries instead of logits in sim mode (the sampler ignores it)."""

    def __getitem__(self, key: object) -> _NoLogits:
        return self


NO_LOGITS = _NoLogits()


@dataclass
class SimClock:
    steps: int = 0
    modelled_s: float = 0.0  # sum of step durations (scaled)
    late_s: float = 0.0  # sum of how far past its deadline each step ended
    late_steps: int = 0  # steps that ended more than 1 ms late


class SimRunner:
    """Forward = wait out the cost model's step time. Not thread-safe: one per rank."""

    def __init__(
        self, cost: CostModel, pool: KVPool, vocab_size: int, eos_token_ids: Sequence[int],
        time_scale: float = 1.0, faults: FaultPlan | None = None, rank: int = 0,
    ) -> None:
        import torch

        self.cost = cost
        self.pool = pool
        self.device = torch.device("cpu")  # for per-request torch.Generator seeds only
        self.vocab_size = vocab_size
        self.banned = set(eos_token_ids)
        self.time_scale = time_scale
        self.faults = faults or FaultPlan()
        self.slowdown = self.faults.rank_slowdown(rank)
        self.clock = SimClock()
        self._last_end = 0.0
        self.sleep = time.sleep

    def wait_kv_written(self) -> None:
        """Nothing to wait for: simulated steps write no KV (P/D calls this before shipping pages)."""

    def forward(self, batch):
        from pdserve.engine.model_runner import ForwardResult

        shape = StepShape(
            [r.seq_len for r in batch.decodes], [(c.start, c.length) for c in batch.extends]
        )
        seconds = self.cost.step_seconds(shape) * self.time_scale * self.slowdown
        now = time.monotonic()
        start = self._last_end if 0 <= now - self._last_end < ABSORB_S * self.time_scale else now
        deadline = start + seconds
        if deadline > now:
            self.sleep(deadline - now)
        end = time.monotonic()
        late = end - deadline
        self.clock.steps += 1
        self.clock.modelled_s += seconds
        if late > 0:
            self.clock.late_s += late
            self.clock.late_steps += late > 1e-3
        self._last_end = max(deadline, end)
        samples = {c.req.rid: NO_LOGITS for c in batch.extends if c.needs_sample}
        return ForwardResult(decode_logits=NO_LOGITS if batch.decodes else None, sample_logits=samples,
                             input_logits={})

    def token(self, rid: str, position: int) -> int:
        value = (zlib.crc32(rid.encode()) * 2654435761 + position * 40503) & 0xFFFFFFFF
        token = value % self.vocab_size
        while token in self.banned:
            token = (token + 1) % self.vocab_size
        return token

    def sample(self, logits: object, reqs: Sequence[Req], eos_ids: Sequence[int]):
        """The scheduler's sampler in sim mode: one deterministic token per request."""
        tokens = [self.token(r.rid, r.seq_len) for r in reqs]
        infos: list[TokenLogprobs | None] = [
            TokenLogprobs([t], [0.0], [[(t, 0.0)]] if r.top_logprobs_num else None) if r.return_logprob else None
            for r, t in zip(reqs, tokens)
        ]
        return tokens, infos

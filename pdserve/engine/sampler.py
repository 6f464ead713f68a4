"""Token sampling for one batch: penalties, grammar masks, temperature, top-k, top-p, min-p, seeds.

Logprobs reported to users are those of the model's raw distribution (log-softmax of the
logits before temperature and filtering), as transformers' ``output_scores`` with greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.grammar import apply_grammar_masks
from pdserve.engine.request import Req, TokenLogprobs

NON_FINITE = -1  # the token of a row whose sampling distribution was not finite


def new_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def apply_penalties(logits: torch.Tensor, reqs: Sequence[Req], eos_ids: Sequence[int]) -> None:
    """In place: frequency/presence/repetition penalties on output tokens, and the
    ``min_new_tokens`` ban on end-of-sequence tokens."""
    for row, req in enumerate(reqs):
        params = req.params
        if len(req.output_ids) < params.min_new_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
            if banned:
                logits[row, banned] = float("-inf")
        if params.has_penalties and req.output_ids:
            ids, counts = torch.tensor(req.output_ids, device=logits.device).unique(return_counts=True)
            values = logits[row, ids]
            if params.repetition_penalty != 1:
                values = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
            values = values - params.frequency_penalty * counts - params.presence_penalty
            logits[row, ids] = values


def _filtered_probs(logits: torch.Tensor, reqs: Sequence[Req]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, batched over rows."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in reqs], device=device).clamp_min(1e-5)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in reqs], device=device)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=device)
    min_p = torch.tensor([r.params.min_p for r in reqs], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    cumulative = sorted_probs.cumsum(dim=-1)
    drop = (ranks >= top_k[:, None]) | ((cumulative - sorted_probs) > top_p[:, None])
    drop |= sorted_probs < (min_p[:, None] * sorted_probs[:, :1])
    drop[:, 0] = False  # always keep the most likely token
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(
    logits: torch.Tensor, reqs: Sequence[Req], eos_ids: Sequence[int]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of ``logits`` [B, V] (float32). Returns the tokens and, for rows whose
    request asked for logprobs, the chosen token's logprob and its top alternatives. A row whose
    logits or probabilities are not finite gets :data:`NON_FINITE` instead of a token; the other
    rows are sampled as usual."""
    raw_logprobs = None
    if any(r.return_logprob for r in reqs):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    changes = any(r.params.has_penalties or r.params.min_new_tokens or r.grammar is not None for r in reqs)
    logits = logits.clone() if changes else logits
    apply_penalties(logits, reqs, eos_ids)
    apply_grammar_masks(logits, reqs)
    tokens = logits.argmax(dim=-1)
    bad = (logits.isnan() | (logits == float("inf"))).any(dim=-1) | (logits == float("-inf")).all(dim=-1)
    random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if random_rows:
        probs = _filtered_probs(logits[random_rows], [reqs[i] for i in random_rows])
        bad[random_rows] |= ~(probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0))
        bad_rows = bad.tolist()
        for k, row in enumerate(random_rows):
            if not bad_rows[row]:
                tokens[row] = torch.multinomial(probs[k], 1, generator=reqs[row].generator)[0]
    tokens[bad] = NON_FINITE
    token_list = tokens.tolist()
    infos: list[TokenLogprobs | None] = [None] * len(reqs)
    if raw_logprobs is not None:
        for row, req in enumerate(reqs):
            if req.return_logprob and token_list[row] != NON_FINITE:
                infos[row] = token_logprobs(raw_logprobs[row : row + 1], [token_list[row]], req.top_logprobs_num)
    return token_list, infos


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top_k: int) -> TokenLogprobs:
    """Logprob of ``token_ids[i]`` under row ``i`` of ``logprobs`` [N, V], plus each row's top-k."""
    index = torch.tensor(token_ids, device=logprobs.device)[:, None]
    values = logprobs.gather(-1, index)[:, 0].tolist()
    top = None
    if top_k > 0:
        top_values, top_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        top = [list(zip(ids, vals)) for ids, vals in zip(top_ids.tolist(), top_values.tolist())]
    return TokenLogprobs(ids=list(token_ids), values=values, top=top)

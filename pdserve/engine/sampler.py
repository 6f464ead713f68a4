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


TOP_P_CANDIDATES = 1024  # top-p rows look for their nucleus among this many most likely tokens first


class PenaltyCounts:
    """How often each token occurs in a request's output, updated from the tokens added since the
    last step (kept on ``Req.penalty_counts``)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.seen = 0

    def update(self, output_ids: list[int]) -> None:
        if self.seen > len(output_ids):  # the output was cut short: count again
            self.counts.clear()
            self.seen = 0
        for token in output_ids[self.seen :]:
            self.counts[token] = self.counts.get(token, 0) + 1
        self.seen = len(output_ids)


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
            if req.penalty_counts is None:
                req.penalty_counts = PenaltyCounts()
            req.penalty_counts.update(req.output_ids)
            table = req.penalty_counts.counts
            ids = torch.tensor(list(table), device=logits.device)
            counts = torch.tensor(list(table.values()), dtype=logits.dtype, device=logits.device)
            values = logits[row, ids]
            if params.repetition_penalty != 1:
                values = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
            values = values - params.frequency_penalty * counts - params.presence_penalty
            logits[row, ids] = values


def _sample_random(logits: torch.Tensor, reqs: Sequence[Req]) -> list[int]:
    """One token per row after temperature, top-k, top-p and min-p, drawn with each request's
    generator. No full-vocabulary sort: truncated rows choose among the ``topk`` candidates, and a
    top-p row sorts the whole vocabulary only when its nucleus is not inside the first
    ``TOP_P_CANDIDATES`` tokens."""
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([r.params.temperature for r in reqs], device=device).clamp_min(1e-5)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    if any(r.params.min_p > 0 for r in reqs):
        min_p = torch.tensor([r.params.min_p for r in reqs], device=device)
        top = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < min_p[:, None] * top, 0.0)
    tokens: list[int] = [0] * len(reqs)
    valid = (probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
    wanted = [_candidates(r.params, vocab) if ok else 0 for r, ok in zip(reqs, valid)]
    for row, ok in enumerate(valid):
        if not ok:
            tokens[row] = NON_FINITE
    truncated = [i for i, k in enumerate(wanted) if 0 < k < vocab]
    draws: list[tuple[int, torch.Tensor]] = []  # (row, drawn token as a one-element device tensor)
    if truncated:
        k_max = max(wanted[i] for i in truncated)
        cand_probs, cand_ids = probs[truncated].topk(k_max, dim=-1)
        top_k = torch.tensor([min(reqs[i].params.top_k, k_max) if reqs[i].params.top_k > 0 else k_max
                              for i in truncated], device=device)
        top_p = torch.tensor([reqs[i].params.top_p for i in truncated], device=device)
        cumulative = cand_probs.cumsum(dim=-1)
        drop = torch.arange(k_max, device=device)[None, :] >= top_k[:, None]
        drop |= (cumulative - cand_probs) > top_p[:, None]
        drop[:, 0] = False  # always keep the most likely token
        # a top-p row whose candidates hold less mass than top_p (and no top-k cut) needs them all
        no_top_k = torch.tensor([reqs[i].params.top_k <= 0 for i in truncated], device=device)
        short = (cumulative[:, -1] < top_p) & no_top_k
        cand_probs = cand_probs.masked_fill(drop, 0.0)
        is_short = short.tolist()
        # draws stay on the device until one read-back at the end (a sync per row costs on a GPU)
        for j, row in enumerate(truncated):
            if not is_short[j]:
                draws.append((row, cand_ids[j, torch.multinomial(cand_probs[j], 1, generator=reqs[row].generator)]))
        rest = [row for j, row in enumerate(truncated) if is_short[j]]
        if rest:
            full = _nucleus_by_sort(probs[rest], torch.tensor([reqs[i].params.top_p for i in rest], device=device))
            for j, row in enumerate(rest):
                draws.append((row, torch.multinomial(full[j], 1, generator=reqs[row].generator)))
    for row, k in enumerate(wanted):
        if k >= vocab:
            draws.append((row, torch.multinomial(probs[row], 1, generator=reqs[row].generator)))
    if draws:
        for (row, _), token in zip(draws, torch.cat([drawn.view(1) for _, drawn in draws]).tolist()):
            tokens[row] = token
    return tokens


def _candidates(params, vocab: int) -> int:
    """How many most likely tokens a row's top-k / top-p filter can keep at most (vocab: no cut)."""
    if params.top_k > 0:
        return min(params.top_k, vocab)
    if params.top_p < 1:
        return min(TOP_P_CANDIDATES, vocab)
    return vocab


def _nucleus_by_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p filter over the whole sorted vocabulary (rows whose nucleus is wide)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop = (cumulative - sorted_probs) > top_p[:, None]
    drop[:, 0] = False
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))


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
    token_list = torch.where(bad, NON_FINITE, tokens).tolist()  # one device sync for both
    bad_rows = [token == NON_FINITE for token in token_list]
    random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy and not bad_rows[i]]
    if random_rows:
        drawn = _sample_random(logits[random_rows], [reqs[i] for i in random_rows])
        for row, token in zip(random_rows, drawn):
            token_list[row] = token
    for row, is_bad in enumerate(bad_rows):
        if is_bad:
            token_list[row] = NON_FINITE
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

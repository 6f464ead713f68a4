"""The sort-free sampler keeps exactly the support the filters define, stays seeded, and penalty
counts kept across steps match counting the whole output again."""

from __future__ import annotations

import torch

from pdserve.engine.request import Req, SamplingParams
from pdserve.engine.sampler import TOP_P_CANDIDATES, apply_penalties, new_generator, sample


def _req(seed: int, **params) -> Req:
    req = Req(f"r{seed}", [0], SamplingParams(**params))
    req.generator = new_generator(seed, torch.device("cpu"))
    return req


def _draws(logits: torch.Tensor, params: dict, n: int = 300) -> set[int]:
    seen: set[int] = set()
    for seed in range(n):
        tokens, _ = sample(logits[None, :].clone(), [_req(seed, **params)], eos_ids=())
        seen.add(tokens[0])
    return seen


def test_top_k_top_p_min_p_support():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04] + [1e-6] * 3000))
    assert _draws(logits, dict(temperature=1.0, top_k=2)) == {0, 1}
    # nucleus 0.75: 0.4 + 0.3 < 0.75, so token 2 is the last one kept
    assert _draws(logits, dict(temperature=1.0, top_p=0.75)) == {0, 1, 2}
    assert _draws(logits, dict(temperature=1.0, min_p=0.4)) == {0, 1, 2}
    assert _draws(logits, dict(temperature=1.0, top_k=4, top_p=0.95)) == {0, 1, 2, 3}


def test_wide_nucleus_falls_back_to_the_whole_vocabulary():
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.zeros(vocab)  # uniform: the 0.9 nucleus is wider than the candidate set
    seen = _draws(logits, dict(temperature=1.0, top_p=0.9), n=200)
    assert max(seen) >= TOP_P_CANDIDATES  # tokens outside the first candidates are drawn
    # with an explicit top-k of the candidate count, the cut is top-k's
    seen_k = _draws(logits, dict(temperature=1.0, top_p=0.9, top_k=8), n=200)
    assert len(seen_k) <= 8


def test_seeded_rows_are_deterministic_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 500)
    params = dict(temperature=0.8, top_p=0.9, top_k=40)
    alone = [sample(logits[i : i + 1].clone(), [_req(i, **params)], ())[0][0] for i in range(3)]
    together, _ = sample(logits.clone(), [_req(i, **params) for i in range(3)], ())
    assert together == alone


def test_penalty_counts_follow_the_output():
    req = Req("x", [0], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    logits = torch.zeros(1, 6)
    for step_ids in ([1], [1, 1], [1, 1, 4]):
        req.output_ids = list(step_ids)
        out = logits.clone()
        apply_penalties(out, [req], eos_ids=())
        counts = torch.bincount(torch.tensor(step_ids), minlength=6).float()
        expected = -(0.5 * counts + 0.25 * (counts > 0).float())
        assert torch.allclose(out, expected[None, :])
    req.output_ids = [3]  # output replaced (shorter): counts start over
    out = logits.clone()
    apply_penalties(out, [req], eos_ids=())
    assert out[0, 3] == -0.75 and out[0, 1] == 0

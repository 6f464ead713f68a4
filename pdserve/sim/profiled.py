"""Profiled step-time model: a linear fit to step times measured on pdserve's real engine.

``pdserve bench profile`` times real engine steps of known shape and fits::

    step = c_step + c_req * requests + c_prefill * prefill_tokens + c_decode * decodes
           + c_ctx * decode_context_tokens + c_attn * prefill_attention_pairs

(non-negative least squares over the measured steps, from an engine timed alone or from the
``--step-trace`` of a served engine); the JSON file it writes is what ``--simulate profile:FILE``
loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.sim.cost_model import CostModel, StepShape
from pdserve.sim.hardware import SimConfigError

FORMAT = "pdserve-step-profile/1"
TERMS = ("step", "req", "prefill", "decode", "ctx", "attn")


def features(step: StepShape) -> list[float]:
    pairs = sum(n * (start + (n + 1) / 2) for start, n in step.extends)
    return [1.0, float(step.num_requests), float(sum(n for _, n in step.extends)), float(len(step.decode_contexts)),
            float(sum(step.decode_contexts)), pairs]


def fit(samples: list[tuple[StepShape, float]]) -> dict[str, float]:
    """Non-negative least-squares coefficients of the relative error (a short step counts as much
    as a long one). The relative weights are 1/predicted, iterated from an unweighted fit, not
    1/measured: weighting by the measured times would favour the steps that happened to run fast
    and bias a noisy (served) trace low. Steps with a prefill chunk and pure decode steps weigh equally
    in total, so that the few prefill steps of a serving trace are not drowned by its decode steps."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([features(s) for s, _ in samples])
    y = np.array([t for _, t in samples])
    balance = np.ones(len(samples))
    prefill = np.array([bool(s.extends) for s, _ in samples])
    for group in (prefill, ~prefill):
        if group.any():
            balance[group] *= len(samples) / (2 * group.sum())
    w = balance / max(float(np.mean(y)), 1e-6)
    for _ in range(10):  # unweighted first, then iteratively reweighted by the previous prediction (converges in ~5)
        coef, _ = nnls(a * w[:, None], y * w)
        w = balance / np.maximum(a @ coef, 1e-6)
    return dict(zip(TERMS, (float(c) for c in coef)))


class ProfiledCost(CostModel):
    name = "profiled"

    def __init__(self, coef: dict[str, float], kv_capacity_tokens: int | None, source: str = "") -> None:
        self.coef = [coef[t] for t in TERMS]
        self.capacity = kv_capacity_tokens
        self.source = source

    @classmethod
    def load(cls, path: str) -> ProfiledCost:
        file = Path(path)
        try:
            data = json.loads(file.read_text())
        except OSError as e:
            raise SimConfigError(f"--simulate profile:{path}: cannot read the profile: {e.strerror}") from e
        except ValueError as e:
            raise SimConfigError(f"--simulate profile:{path}: not JSON ({e}); write one with `pdserve bench profile`") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SimConfigError(f"--simulate profile:{path}: not a step profile (expected \"format\": \"{FORMAT}\")")
        coef = data.get("coefficients")
        if not isinstance(coef, dict) or any(
            not isinstance(coef.get(t), (int, float)) or not 0 <= coef[t] < 10 for t in TERMS
        ):
            raise SimConfigError(f"--simulate profile:{path}: \"coefficients\" must map {', '.join(TERMS)} "
                                 "to seconds in [0, 10)")
        capacity = data.get("kv_capacity_tokens")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise SimConfigError(f"--simulate profile:{path}: kv_capacity_tokens must be a positive integer")
        return cls(coef, capacity, str(file))

    def step_seconds(self, step: StepShape) -> float:
        return sum(c * x for c, x in zip(self.coef, features(step)))

    def kv_capacity_tokens(self) -> int | None:
        return self.capacity

    def describe(self) -> dict:
        return {"name": self.name, "profile": self.source, "coefficients": dict(zip(TERMS, self.coef))}

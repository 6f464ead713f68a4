"""Offline API: ``pdserve.Engine(model_path=None, **options).generate(...)`` in the calling process."""

from __future__ import annotations

import time
import uuid
from dataclasses import fields
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.output_format import logprob_triples, merge_logprobs, top_logprob_triples, trim_stop
from pdserve.engine.request import Req, RequestError, SamplingParams, TokenLogprobs, sample_rid


class Engine:
    """Runs generation synchronously; returns SGLang-shaped dicts (``text``, ``output_ids``, ``meta_info``)."""

    def __init__(self, model_path: str | None = None, **options: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown Engine options {sorted(unknown)}; known: {sorted(known)}")
        self.core = EngineCore(EngineConfig(model_path=model_path, **options))
        self.tokenizer = self.core.tokenizer

    def generate(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate for one prompt or a batch; a batch (list input) or ``n`` > 1 in ``sampling_params``
        returns a list of dicts (prompt i, sample j at ``i * n + j``)."""
        if (prompt is None) == (input_ids is None):
            raise RequestError("exactly one of prompt and input_ids must be given")
        batched = isinstance(prompt, list) or (isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list))
        prompts = prompt if isinstance(prompt, list) else [prompt] if prompt is not None else None
        id_lists = (input_ids if batched else [input_ids]) if input_ids is not None else None
        n = len(prompts) if prompts is not None else len(id_lists)
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        rids = rid if isinstance(rid, list) else [rid] * n if rid is not None and n == 1 else [None] * n
        if len(params_list) != n or len(rids) != n:
            raise RequestError("sampling_params and rid lists must have one entry per prompt")
        reqs: list[Req] = []
        for i in range(n):
            if prompts is not None and not prompts[i]:
                raise RequestError("the prompt is empty: text must contain at least one character")
            ids = self.tokenizer.encode(prompts[i]) if prompts is not None else list(id_lists[i])
            reqs.append(
                Req(
                    rid=rids[i] or uuid.uuid4().hex,
                    input_ids=ids,
                    params=SamplingParams.from_dict(params_list[i]),
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs_num,
                )
            )
        for req in reqs:
            self.core.validate(req)
        results = self._run(reqs, return_text_in_logprobs)
        return results if batched or len(results) > 1 else results[0]

    def _run(self, reqs: list[Req], text_in_logprobs: bool) -> list[dict[str, Any]]:
        start = time.perf_counter()
        # one entry per sample: a request with n > 1 also answers for its samples' rids
        samples = [(req, sample_rid(req.rid, i) if i else req.rid) for req in reqs for i in range(req.params.n)]
        state: dict[str, dict[str, Any]] = {
            rid: {"ids": [], "out_lp": None, "in_lp": None, "ttft": None, "reason": None} for _, rid in samples
        }
        try:
            for req in reqs:
                self.core.add_request(req)
            pending = set(state)
            while pending:
                for out in self.core.step():
                    if out.rid not in state:
                        continue
                    s = state[out.rid]
                    s["ids"].extend(out.new_token_ids)
                    s["out_lp"] = merge_logprobs(s["out_lp"], out.output_logprobs)
                    s["in_lp"] = merge_logprobs(s["in_lp"], out.input_logprobs)
                    if s["ttft"] is None and out.new_token_ids:
                        s["ttft"] = time.perf_counter() - start
                    if out.finished:
                        s["reason"] = out.finish_reason
                        s["cached"] = out.cached_tokens
                        pending.discard(out.rid)
        finally:
            for _, rid in samples:
                self.core.abort(rid)
            self.core.step()  # drain abort notices of anything left unfinished
            self.core.check_idle()
        detok = (lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)) if text_in_logprobs else None
        latency = time.perf_counter() - start
        results = []
        for req, rid in samples:
            s = state[rid]
            text = self.tokenizer.decode(s["ids"], skip_special_tokens=req.params.skip_special_tokens)
            meta: dict[str, Any] = {
                "id": rid,
                "finish_reason": s["reason"],
                "prompt_tokens": len(req.input_ids),
                "completion_tokens": len(s["ids"]),
                "cached_tokens": s.get("cached", 0),
                "ttft": s["ttft"],
                "e2e_latency": latency,
            }
            if req.return_logprob:
                meta.update(_logprob_fields(s["in_lp"], s["out_lp"], detok))
            results.append(
                {
                    "text": trim_stop(text, s["reason"], req.params.no_stop_trim),
                    "output_ids": s["ids"],
                    "meta_info": meta,
                }
            )
        return results

    def shutdown(self) -> None:
        """Release the model and KV pool."""
        self.core = None  # type: ignore[assignment]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _logprob_fields(in_lp: TokenLogprobs | None, out_lp: TokenLogprobs | None, detok) -> dict[str, Any]:
    return {
        "input_token_logprobs": logprob_triples(in_lp, detok),
        "output_token_logprobs": logprob_triples(out_lp, detok),
        "input_top_logprobs": top_logprob_triples(in_lp, detok),
        "output_top_logprobs": top_logprob_triples(out_lp, detok),
    }

"""Continuous-batching scheduler with chunked prefill.

Each :meth:`Scheduler.step` builds one batch: every decoding request contributes one token, and
prefill chunks fill the remaining ``chunked_prefill_size`` token budget. A request gets the KV
pages for its whole prompt when admitted; decode grows it a page at a time, and when the pool runs
dry the most recently admitted request is retracted (pages freed, re-queued for recompute).

With a prefix cache (:class:`RadixCache`), the scheduler calls it at three points: admission
(:meth:`Scheduler._match_prefix`: the request takes references to the cached pages of its
longest cached prefix and computes from the first uncached token), after each computed chunk
and when a request lets go of its pages (:meth:`Scheduler._cache_computed`: full computed pages
enter the tree), and, through the pool, on demand: an allocation that finds too few free pages
evicts unreferenced cached pages before anything is retracted (``KVPool.can_alloc`` counts them).

Two entry/exit points exist for P/D disaggregation:
- ``Req.stop_after_prefill``: after the first output token the request is *held* with its KV
  pages until :meth:`release` (the prefill server ships the pages, then releases them).
- :meth:`add_prefilled_request` / :meth:`activate_prefilled`: the decode server allocates pages
  for a prompt whose KV another server fills, then continues decoding from the given first token.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence

import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model_runner import ExtendChunk, ForwardBatch, ModelRunner
from pdserve.engine.output_format import merge_logprobs
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Req, ReqState, StepOutput, TokenLogprobs
from pdserve.engine.sampler import new_generator, sample, token_logprobs


class Scheduler:
    """Owns request queues and KV page assignment for one engine."""

    def __init__(
        self,
        runner: ModelRunner,
        pool: KVPool,
        eos_token_ids: Sequence[int],
        decode_tail: Callable[[list[int]], str],
        chunked_prefill_size: int,
        max_running_requests: int,
        context_length: int,
        seed: int = 0,
        cache: RadixCache | None = None,
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode_tail = decode_tail
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.context_length = context_length
        self.cache = cache
        self.prompt_tokens_total = 0  # prompt tokens admitted (first admission of each request)
        self.cached_tokens_total = 0  # of those, read from the prefix cache instead of computed
        self.prefill_tokens_computed = 0  # tokens run through prefill chunks (recomputation included)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.awaiting_kv: dict[str, Req] = {}  # P/D decode: pages allocated, KV being filled remotely
        self.pending_alloc: deque[Req] = deque()  # P/D decode: waiting for pages
        self.held: dict[str, Req] = {}  # P/D prefill: first token produced, KV held for transfer
        self._outputs: list[StepOutput] = []
        self._arrivals = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed)
        self.on_prefill_progress: Callable[[Req, int], None] | None = None  # (req, tokens with KV ready)
        self.on_pages_allocated: Callable[[Req], None] | None = None

    # ------------------------------------------------------------------ queues
    def add_request(self, req: Req) -> None:
        self._init_request(req)
        self.waiting.append(req)

    def add_prefilled_request(self, req: Req) -> None:
        """P/D decode: reserve pages for ``req``'s prompt; ``on_pages_allocated`` fires once they are."""
        req.prefilled_externally = True
        self._init_request(req)
        self.pending_alloc.append(req)
        self._allocate_pending()

    def activate_prefilled(
        self, rid: str, first_token: int, logprobs: TokenLogprobs | None = None, cached_tokens: int = 0
    ) -> None:
        """P/D decode: the prompt's KV is in place; continue decoding after ``first_token``."""
        req = self.awaiting_kv.pop(rid)
        req.num_computed = len(req.input_ids)
        req.cached_tokens = cached_tokens
        req.state = ReqState.DECODING
        self.running.append(req)
        self._emit_token(req, first_token, logprobs, input_logprobs=None)

    def release(self, rid: str) -> None:
        """P/D prefill: the held KV has been shipped; free its pages."""
        req = self.held.pop(rid, None)
        if req is not None:
            self._free(req)

    def abort(self, rid: str, message: str = "aborted", status_code: int | None = None) -> bool:
        """Stop ``rid`` wherever it is and free its pages; its abort output comes with the next step.

        ``status_code`` (as SGLang's abort reasons carry) tells the HTTP layer which error to answer
        when the request ends before producing any token."""
        req = self._find(rid)
        if req is None:
            return False
        self._remove(req)
        self._free(req)
        req.state = ReqState.FINISHED
        req.finish_reason = {"type": "abort", "message": message}
        if status_code is not None:
            req.finish_reason["status_code"] = status_code
        self._outputs.append(
            StepOutput(rid, [], finished=True, finish_reason=req.finish_reason, prompt_tokens=len(req.input_ids))
        )
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._outputs or self.pending_alloc)

    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.awaiting_kv) + len(self.pending_alloc) + len(self.held)

    def num_tokens(self) -> int:
        live = itertools.chain(self.running, self.awaiting_kv.values(), self.held.values())
        return sum(r.seq_len for r in live)

    # ------------------------------------------------------------------ step
    def step(self) -> list[StepOutput]:
        self._allocate_pending()
        batch = ForwardBatch(decodes=self._schedule_decodes())
        self._schedule_prefills(batch)
        if batch:
            result = self.runner.forward(batch)
            self._process(batch, result)
        outputs, self._outputs = self._outputs, []
        return outputs

    def _schedule_decodes(self) -> list[Req]:
        decodes = sorted((r for r in self.running if r.state == ReqState.DECODING), key=lambda r: r.arrival_order)
        scheduled: list[Req] = []
        for req in decodes:
            if req.state != ReqState.DECODING:  # retracted while making room for an earlier request
                continue
            need = self.pool.pages_for(req.seq_len) - len(req.pages)
            while not self.pool.can_alloc(need):
                victim = max(self.running, key=lambda r: r.arrival_order)
                self._retract(victim)
                if victim is req:
                    break
            if req.state != ReqState.DECODING:
                continue
            if need > 0:
                req.pages.extend(self.pool.alloc(need))
            scheduled.append(req)
        return scheduled

    def _schedule_prefills(self, batch: ForwardBatch) -> None:
        budget = self.chunked_prefill_size
        for req in sorted(self.running, key=lambda r: r.arrival_order):
            if req.state == ReqState.PREFILLING and budget > 0:
                budget -= self._add_chunk(batch, req, budget)
        headroom = len(batch.decodes)
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting[0]
            self._match_prefix(req)
            need = self.pool.pages_for(req.fill_target) - len(req.pages)
            if not self.pool.can_alloc(need + headroom):
                self._free(req, cache=False)
                req.num_computed = 0
                break
            self.waiting.popleft()
            self._count_admission(req)
            req.pages.extend(self.pool.alloc(need))
            req.state = ReqState.PREFILLING
            self.running.append(req)
            budget -= self._add_chunk(batch, req, budget)

    def _add_chunk(self, batch: ForwardBatch, req: Req, budget: int) -> int:
        length = min(budget, req.fill_target - req.num_computed)
        chunk = ExtendChunk(req, req.num_computed, length)
        completes = req.num_computed + length == req.fill_target
        if not req.output_ids:
            if req.return_logprob:
                chunk.logit_from = max(req.logprob_start_len, 1) - 1
            chunk.needs_sample = completes and req.params.max_new_tokens > 0
        batch.extends.append(chunk)
        return length

    # ------------------------------------------------------------------ results
    def _process(self, batch: ForwardBatch, result) -> None:
        if batch.decodes:
            tokens, infos = sample(result.decode_logits, batch.decodes, self.eos_token_ids)
            for req, token, info in zip(batch.decodes, tokens, infos):
                req.num_computed += 1
                self._emit_token(req, token, info, input_logprobs=None)
        for chunk in batch.extends:
            req = chunk.req
            req.num_computed += chunk.length
            self.prefill_tokens_computed += chunk.length
            self._cache_computed(req)
            if req.rid in result.input_logits:
                self._accumulate_input_logprobs(req, *result.input_logits[req.rid])
            if req.num_computed < req.fill_target:
                if self.on_prefill_progress is not None:
                    self.on_prefill_progress(req, req.num_computed)
                continue
            if req.output_ids:  # a retracted request finished recomputing its KV
                req.state = ReqState.DECODING
                continue
            input_lp = self._finish_input_logprobs(req)
            if req.params.max_new_tokens == 0:
                self._finish(req, {"type": "length", "length": 0}, [], None, input_lp)
                continue
            logits = result.sample_logits[req.rid][None, :]
            tokens, infos = sample(logits, [req], self.eos_token_ids)
            req.state = ReqState.DECODING
            self._emit_token(req, tokens[0], infos[0], input_lp)

    def _emit_token(
        self, req: Req, token: int, info: TokenLogprobs | None, input_logprobs: TokenLogprobs | None
    ) -> None:
        req.output_ids.append(token)
        reason = self._finish_reason(req, token)
        if req.stop_after_prefill and reason is None:
            reason = {"type": "length", "length": 1}
        if reason is not None:
            self._finish(req, reason, [token], info, input_logprobs)
            return
        self._outputs.append(
            StepOutput(
                req.rid,
                [token],
                output_logprobs=info,
                input_logprobs=input_logprobs,
                prompt_tokens=len(req.input_ids),
                cached_tokens=req.cached_tokens,
            )
        )

    def _finish_reason(self, req: Req, token: int) -> dict | None:
        params = req.params
        n = len(req.output_ids)
        if n >= params.max_new_tokens:
            return {"type": "length", "length": params.max_new_tokens}
        if req.seq_len >= self.context_length:
            return {"type": "length", "length": n}
        if n >= params.min_new_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return {"type": "stop", "matched": token}
            if token in params.stop_token_ids:
                return {"type": "stop", "matched": token}
            if params.stop:
                longest = max(len(s) for s in params.stop)
                tail = self.decode_tail(req.output_ids[-(4 * longest + 4) :])
                for stop in params.stop:
                    if stop in tail:
                        return {"type": "stop", "matched": stop}
        return None

    def _finish(
        self,
        req: Req,
        reason: dict,
        tokens: list[int],
        info: TokenLogprobs | None,
        input_logprobs: TokenLogprobs | None,
    ) -> None:
        req.finish_reason = reason
        self.running.remove(req)
        if req.stop_after_prefill:
            req.state = ReqState.PREFILL_DONE
            self.held[req.rid] = req
        else:
            req.state = ReqState.FINISHED
            self._free(req)
        self._outputs.append(
            StepOutput(
                req.rid,
                tokens,
                finished=True,
                finish_reason=reason,
                output_logprobs=info,
                input_logprobs=input_logprobs,
                prompt_tokens=len(req.input_ids),
                cached_tokens=req.cached_tokens,
            )
        )

    # ------------------------------------------------------------------ logprobs
    def _accumulate_input_logprobs(self, req: Req, first: int, logits: torch.Tensor) -> None:
        """Logits at position q predict token q+1: keep those for prompt tokens from logprob_start_len."""
        start = max(req.logprob_start_len, 1)
        positions = [q for q in range(first, first + logits.shape[0]) if start <= q + 1 < len(req.input_ids)]
        if not positions:
            return
        rows = torch.tensor([q - first for q in positions], device=logits.device)
        part = token_logprobs(
            torch.log_softmax(logits[rows], dim=-1), [req.input_ids[q + 1] for q in positions], req.top_logprobs_num
        )
        req.input_logprobs = merge_logprobs(req.input_logprobs, part)

    def _finish_input_logprobs(self, req: Req) -> TokenLogprobs | None:
        if not req.return_logprob:
            return None
        part = req.input_logprobs or TokenLogprobs(top=[] if req.top_logprobs_num else None)
        if req.logprob_start_len == 0:  # the first prompt token has no prediction
            part.ids.insert(0, req.input_ids[0])
            part.values.insert(0, None)
            if part.top is not None:
                part.top.insert(0, [])
        req.input_logprobs = None
        return part

    # ------------------------------------------------------------------ internals
    def _init_request(self, req: Req) -> None:
        req.arrival_order = next(self._arrivals)
        req.state = ReqState.WAITING
        if not req.params.greedy:
            seed = req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            req.generator = new_generator(seed, self.runner.device)

    def _allocate_pending(self) -> None:
        while self.pending_alloc:
            req = self.pending_alloc[0]
            prefix = self._match_remote_prefix(req)
            need = self.pool.pages_for(len(req.input_ids)) - len(prefix)
            if not self.pool.can_alloc(need):
                self.pool.unref(prefix)
                return
            self.pending_alloc.popleft()
            req.pages = prefix + self.pool.alloc(need)
            req.decode_cached_tokens = len(prefix) * self.pool.page_size
            req.state = ReqState.WAITING_KV
            self.awaiting_kv[req.rid] = req
            if self.on_pages_allocated is not None:
                self.on_pages_allocated(req)

    def _retract(self, req: Req) -> None:
        """Free ``req``'s KV and put it at the front of the queue to be recomputed later."""
        self.running.remove(req)
        self._free(req)
        req.num_computed = 0
        req.num_retractions += 1
        req.state = ReqState.WAITING
        self.waiting.appendleft(req)

    def _free(self, req: Req, cache: bool = True) -> None:
        """Drop the request's references to its pages (a transfer or cache may still hold them);
        with ``cache``, its computed full pages enter the prefix cache first."""
        if req.pages:
            if cache:
                self._cache_computed(req)
            self.pool.unref(req.pages)
            req.pages = []

    # ------------------------------------------------------------------ prefix cache
    def _match_prefix(self, req: Req) -> None:
        """Admission: give a request without pages references to its longest cached prefix; it
        computes from the first uncached token. At least one token is always left to compute (its
        logits sample the next token), and input logprobs need their positions computed."""
        if self.cache is None or req.pages:
            return
        limit = req.fill_target - 1
        if req.return_logprob and not req.output_ids:
            limit = min(limit, max(req.logprob_start_len, 1) - 1)
        pages = self.cache.match(req.all_ids, limit)
        if pages:
            self.pool.ref(pages)
            req.pages = pages
        req.num_computed = len(pages) * self.pool.page_size

    def _match_remote_prefix(self, req: Req) -> list[int]:
        """P/D decode: referenced pages of the prompt's cached prefix, so only the rest is received
        (the last prompt page always comes from prefill)."""
        if self.cache is None:
            return []
        pages = self.cache.match(req.input_ids, len(req.input_ids) - 1)
        self.pool.ref(pages)
        return pages

    def _count_admission(self, req: Req) -> None:
        if not req.output_ids and req.num_retractions == 0:
            req.cached_tokens = req.num_computed
            self.prompt_tokens_total += len(req.input_ids)
            self.cached_tokens_total += req.num_computed

    def _cache_computed(self, req: Req) -> None:
        if self.cache is not None and req.num_computed >= self.pool.page_size:
            self.cache.insert(req.all_ids[: req.num_computed], req.pages)

    def _find(self, rid: str) -> Req | None:
        for req in itertools.chain(self.running, self.waiting, self.pending_alloc):
            if req.rid == rid:
                return req
        return self.awaiting_kv.get(rid) or self.held.get(rid)

    def _remove(self, req: Req) -> None:
        for queue in (self.running, self.waiting, self.pending_alloc):
            if req in queue:
                queue.remove(req)
        self.awaiting_kv.pop(req.rid, None)
        self.held.pop(req.rid, None)

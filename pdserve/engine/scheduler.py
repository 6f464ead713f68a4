"""Continuous-batching scheduler with chunked prefill: the loop and the queues.

Each :meth:`Scheduler.step` builds one batch: every decoding request contributes one token, and
prefill chunks fill the remaining ``chunked_prefill_size`` token budget. Its vocabulary is its
resources (:mod:`pdserve.engine.resources`): a request runs only while it holds a slot of the
table sized by ``max_running_requests``, and one :class:`Admission` per round decides every path
that makes a request runnable (colocated prefill, P/D page pre-allocation; sample forks take a
slot too). A request gets the KV pages for its whole prompt when admitted; decode grows it a page
at a time, and when the pool runs dry a running request is retracted: its :class:`Attempt` (pages,
slot, progress, input logprobs) is dropped and it is re-queued at the front to be recomputed by a
fresh one, keeping its identity and output.

Admission is fair to requests already started: a new request (or a P/D decode request asking for
pages) is admitted only if the pool keeps ``reserved_decode_tokens`` of decode headroom for every
running request, and not while a retracted request (one that already has output) waits: those are
re-admitted first, so a request that has its first token cannot starve behind new arrivals. The
wait after a first token is bounded by :class:`StallPolicy` (priority, then a hard timeout; both
counted in ``num_preemptions`` and ``num_stall_timeouts``).

A request's id and its samples' ids are reserved on arrival (:class:`RequestIds`) and freed when
each ends, so no two live requests share an id. :meth:`check_integrity` checks slots, pages, ids
and queues against each other; tests call it after every step, workers at idle.

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
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from pdserve.engine.grammar import advance_grammar
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model_runner import ExtendChunk, ForwardBatch, ModelRunner
from pdserve.engine.output_format import merge_logprobs
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Attempt, Req, ReqState, StepOutput, TokenLogprobs, sample_rid
from pdserve.engine.request_ids import RequestIds
from pdserve.engine.resources import Admission, IntegrityError, SlotTable
from pdserve.engine.sampler import NON_FINITE, new_generator, sample, token_logprobs
from pdserve.engine.stall_policy import MAX_PRIORITY_PREEMPTIONS, StallPolicy

logger = logging.getLogger("pdserve.engine.scheduler")

__all__ = ["MAX_PRIORITY_PREEMPTIONS", "Scheduler"]

MAX_HISTORY = 32  # state changes kept per request for integrity reports
RECENT_REQUESTS = 8  # ended requests whose history an idle integrity report shows
IDLE_CHECK_INTERVAL_S = 10.0  # least time between two integrity checks at idle


class Scheduler:
    """The loop and the queues of one engine; slots, admission and the stall bound are its resources."""

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
        reserved_decode_tokens: int = 0,
        sampler: Callable = sample,
        cache: RadixCache | None = None,
        stall_priority_s: float = 5.0,
        stall_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.sample = sampler  # the sim runner's sampler reads no logits
        self.pool = pool
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode_tail = decode_tail
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.context_length = context_length
        self.reserved_decode_tokens = reserved_decode_tokens
        self.cache = cache
        self.slots = SlotTable(max_running_requests)
        self.ids = RequestIds()
        self.stall = StallPolicy(stall_priority_s, stall_timeout_s)
        self.clock = clock  # tests drive a fake one
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
        self.num_steps = 0
        self.num_retractions = 0
        self.num_preemptions = 0  # retractions made for a request that had waited longer (priority)
        self.num_stall_timeouts = 0  # requests failed for waiting too long after their first token
        self._stalled_at: tuple[int, ...] | None = None  # state when a step last found nothing to do
        self._recent: deque[Req] = deque(maxlen=RECENT_REQUESTS)  # ended requests, for integrity reports
        self.integrity_violation: str | None = None  # the first one found at idle (logged once)
        self._idle_checked_at = float("-inf")

    # ------------------------------------------------------------------ queues
    def add_request(self, req: Req) -> None:
        """Queue ``req``; its id and its samples' ids must not be live (``IdInUse`` otherwise)."""
        self._arrive(req)
        self.waiting.append(req)

    def add_prefilled_request(self, req: Req) -> None:
        """P/D decode: reserve pages for ``req``'s prompt; ``on_pages_allocated`` fires once they are."""
        req.prefilled_externally = True
        self._arrive(req)
        self.pending_alloc.append(req)
        self._allocate_pending(self._admission())

    def activate_prefilled(
        self, rid: str, first_token: int, logprobs: TokenLogprobs | None = None, cached_tokens: int = 0,
        input_logprobs: TokenLogprobs | None = None,
    ) -> None:
        """P/D decode: the prompt's KV is in place; continue decoding after ``first_token`` (in the
        slot its page pre-allocation took; the first output carries prefill's ``input_logprobs``)."""
        req = self.awaiting_kv.pop(rid)
        req.num_computed = len(req.input_ids)
        req.cached_tokens = cached_tokens
        self._set_state(req, ReqState.DECODING)
        self.running.append(req)
        self._fork_samples(req)
        self._emit_token(req, first_token, logprobs, input_logprobs=input_logprobs)

    def drop_prefilled(self, rid: str) -> Req:
        """P/D decode: ``rid``'s prefill produced no token (``max_new_tokens`` = 0): it ends here,
        its pages and slot freed."""
        req = self.awaiting_kv.pop(rid)
        self._end_attempt(req, cache=False)
        self._set_state(req, ReqState.FINISHED)
        self._forget(req, [rid, *self._unborn_samples(req)])
        return req

    def release(self, rid: str) -> None:
        """P/D prefill: the held KV has been shipped; free its pages."""
        req = self.held.pop(rid, None)
        if req is not None:
            self._end_attempt(req)
            self._forget(req, [rid])

    def abort(self, rid: str, message: str = "aborted", status_code: int | None = None,
              param: str | None = None) -> bool:
        """Stop ``rid`` wherever it is and free its pages; its abort output comes with the next step.

        ``status_code`` (as SGLang's abort reasons carry) tells the HTTP layer which error to answer
        when the request ends before producing any token; ``param``, the request field it names."""
        req = self._find(rid)
        if req is None:
            return False
        self._remove(req)
        self._end_attempt(req)
        self._set_state(req, ReqState.FINISHED, f"abort: {message}")
        req.finish_reason = {"type": "abort", "message": message}
        if status_code is not None:
            req.finish_reason["status_code"] = status_code
        if param is not None:
            req.finish_reason["param"] = param
        ended = [rid, *self._unborn_samples(req)]
        self._forget(req, ended)
        for out_rid in ended:
            self._outputs.append(
                StepOutput(out_rid, [], finished=True, finish_reason=req.finish_reason,
                           prompt_tokens=len(req.input_ids))
            )
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._outputs or self.pending_alloc)

    def runnable(self) -> bool:
        """Whether a step could do anything: there is work, and the last step did not find it all
        blocked (waiting for pages) in the very state the scheduler is still in."""
        if not self.has_work():
            return False
        return self._stalled_at != self._state() or self.stall.deadline_passed(self.waiting, self.clock())

    def _state(self) -> tuple[int, ...]:
        return (self.pool.num_free, self.pool.num_evictable, self.slots.num_free, len(self.waiting),
                len(self.pending_alloc), len(self.running), len(self._outputs))

    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.awaiting_kv) + len(self.pending_alloc) + len(self.held)

    def num_tokens(self) -> int:
        live = itertools.chain(self.running, self.awaiting_kv.values(), self.held.values())
        return sum(r.seq_len for r in live)

    # ------------------------------------------------------------------ step
    def step(self) -> list[StepOutput]:
        """One batch. An exception while building, running or reading it fails the requests of
        that batch (all running ones if it failed before the batch existed) with a named error and
        frees their pages; the engine goes on serving the others."""
        self.num_steps += 1
        batch: ForwardBatch | None = None
        before = self._state()
        try:
            now = self.clock()
            self._enforce_stall_timeout(now)
            self._prioritize_stalled(now)  # before anything is scheduled: it may retract running requests
            batch = ForwardBatch(decodes=self._schedule_decodes())
            admission = self._admission(budget=self.chunked_prefill_size)
            self._schedule_prefills(batch, admission)
            self._allocate_pending(admission)
            if batch:
                result = self.runner.forward(batch)
                self._process(batch, result)
        except Exception as e:
            logger.exception("engine step failed")
            victims = [*batch.decodes, *(c.req for c in batch.extends)] if batch is not None else list(self.running)
            for req in victims:
                self._fail_request(req, f"internal error in the engine step serving this request: {_describe(e)}", 500)
        outputs, self._outputs = self._outputs, []
        stalled = not outputs and not batch and self._state() == before
        self._stalled_at = before if stalled else None
        return outputs

    def _fail_request(self, req: Req, message: str, status_code: int) -> None:
        logger.warning("request %s failed: %s", req.rid, message)
        self.abort(req.rid, message, status_code=status_code)

    def _non_finite(self, req: Req) -> None:
        p = req.params
        self._fail_request(
            req,
            f"sampling produced non-finite probabilities for request {req.rid} (temperature={p.temperature:g}, "
            f"top_p={p.top_p:g}, top_k={p.top_k}, min_p={p.min_p:g}, repetition_penalty={p.repetition_penalty:g}, "
            f"frequency_penalty={p.frequency_penalty:g}, presence_penalty={p.presence_penalty:g})",
            400,
        )

    def _schedule_decodes(self) -> list[Req]:
        # most protected first: a retraction victim is never a request already scheduled in this loop
        order = self.stall.retraction_order(self.clock())
        decodes = sorted((r for r in self.running if r.state == ReqState.DECODING), key=order, reverse=True)
        scheduled: list[Req] = []
        for req in decodes:
            if req.state != ReqState.DECODING:  # retracted while making room for a more protected request
                continue
            need = self.pool.pages_for(req.seq_len) - len(req.pages)
            while not self.pool.can_alloc(need):
                victim = min(self.running, key=order)
                self._retract(victim)
                if victim is req:
                    break
            if req.state != ReqState.DECODING:
                continue
            if need > 0:
                req.pages.extend(self.pool.alloc(need))
            scheduled.append(req)
        return scheduled

    def _admission(self, budget: int = 0) -> Admission:
        """This round's admission: free slots and pages, ``budget`` prefill tokens, and the decode
        reserve of everything that runs or whose KV is arriving."""
        return Admission(self.pool, self.slots, self._decode_reserve(), bool(self.running or self.awaiting_kv), budget)

    def _schedule_prefills(self, batch: ForwardBatch, admission: Admission) -> None:
        for req in sorted(self.running, key=lambda r: r.arrival_order):
            if req.state == ReqState.PREFILLING and admission.budget > 0:
                admission.budget -= self._add_chunk(batch, req, admission.budget)
        now = self.clock()
        while self.waiting and admission.budget > 0 and self.slots.num_free:
            req = self.waiting[0]
            self._match_prefix(req)
            need = self.pool.pages_for(req.fill_target) - len(req.pages)
            own = self._reserve_pages(req, req.fill_target + 1)
            if not admission.fits(need, own, urgent=self.stall.has_priority(req, now)):
                self._end_attempt(req, cache=False)
                break
            self.waiting.popleft()
            req.priority_tried = False
            self._count_admission(req)
            req.pages.extend(admission.admit(req, need, own))
            self._set_state(req, ReqState.PREFILLING)
            self.running.append(req)
            admission.budget -= self._add_chunk(batch, req, admission.budget)

    # ------------------------------------------------------------------ bounded wait after a first token
    def _prioritize_stalled(self, now: float) -> None:
        """Put the stalled request the policy names most urgent at the head of the queue; if its
        pages or a slot are missing, retract the running requests the policy offers for it, and
        only if that makes it fit."""
        req = self.stall.most_urgent(self.waiting, now)
        if req is None:
            return
        self.waiting.remove(req)
        self.waiting.appendleft(req)
        need = self.pool.pages_for(req.fill_target) - len(req.pages)

        def growth(reqs: list[Req]) -> int:  # pages this step's decodes of ``reqs`` will take
            return sum(1 for r in reqs if r.state == ReqState.DECODING and self.pool.pages_for(r.seq_len) > len(r.pages))

        def fits() -> bool:
            return self.pool.can_alloc(need + growth(self.running)) and self.slots.num_free > 0

        if fits():
            return
        victims = self.stall.victims(req, self.running, now)
        staying = [r for r in self.running if r not in victims]
        reclaimable = self.pool.num_free + (self.pool.reclaimer.reclaimable() if self.pool.reclaimer else 0)
        if not victims or reclaimable + self.pool.releasable([v.pages for v in victims]) < need + growth(staying):
            return  # retracting every candidate would not make it fit: wait for running requests to finish
        for victim in victims:
            if fits():
                break
            victim.num_preempted += 1
            self.num_preemptions += 1
            logger.info("retracting %s (waited %.1f s) for %s, which has waited %.1f s after its first token",
                        victim.rid, self.stall.waited(victim, now), req.rid, self.stall.waited(req, now))
            self._retract(victim)
        self.waiting.remove(req)
        self.waiting.appendleft(req)

    def _enforce_stall_timeout(self, now: float) -> None:
        for req in self.stall.expired(self.waiting, now):
            self.num_stall_timeouts += 1
            self._fail_request(
                req, f"request {req.rid} was retracted under KV pressure after {len(req.output_ids)} output tokens "
                f"and could not run again within {self.stall.timeout_s:g} s (--stall-timeout; waited "
                f"{now - req.stalled_since:.1f} s, {self.stall.waited(req, now):.1f} s in all)", 503)

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
            tokens, infos = self.sample(result.decode_logits, batch.decodes, self.eos_token_ids)
            for req, token, info in zip(batch.decodes, tokens, infos):
                if token == NON_FINITE:
                    self._non_finite(req)
                    continue
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
            if req.output_ids:  # a retracted request finished recomputing its KV: it decodes again
                self._set_state(req, ReqState.DECODING)
                if req.stalled_since is not None:
                    req.stalled_s += self.clock() - req.stalled_since
                    req.stalled_since = None
                continue
            self._fork_samples(req)
            input_lp = self._finish_input_logprobs(req)
            if req.params.max_new_tokens == 0:
                self._finish(req, {"type": "length", "length": 0}, [], None, input_lp)
                continue
            logits = result.sample_logits[req.rid][None, :]
            tokens, infos = self.sample(logits, [req], self.eos_token_ids)
            if tokens[0] == NON_FINITE:
                self._non_finite(req)
                continue
            self._set_state(req, ReqState.DECODING)
            self._emit_token(req, tokens[0], infos[0], input_lp)

    def _emit_token(
        self, req: Req, token: int, info: TokenLogprobs | None, input_logprobs: TokenLogprobs | None
    ) -> None:
        req.output_ids.append(token)
        reason = advance_grammar(req, token)
        if reason is None or reason["type"] == "stop":
            reason = self._finish_reason(req, token) or reason
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
        self.slots.release(req)  # held KV (P/D prefill) is no longer running: its pages stay, its slot goes
        if req.stop_after_prefill:
            self._set_state(req, ReqState.PREFILL_DONE)
            self.held[req.rid] = req
        else:
            self._end_attempt(req)
            self._set_state(req, ReqState.FINISHED, f"finish: {reason['type']}")
            self._forget(req, [req.rid])
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
        req.attempt.input_logprobs = merge_logprobs(req.attempt.input_logprobs, part)

    def _finish_input_logprobs(self, req: Req) -> TokenLogprobs | None:
        if not req.return_logprob:
            return None
        part = req.attempt.input_logprobs or TokenLogprobs(top=[] if req.top_logprobs_num else None)
        if req.logprob_start_len == 0:  # the first prompt token has no prediction
            part.ids.insert(0, req.input_ids[0])
            part.values.insert(0, None)
            if part.top is not None:
                part.top.insert(0, [])
        req.attempt.input_logprobs = None
        return part

    # ------------------------------------------------------------------ parallel sampling (n > 1)
    def _fork_samples(self, req: Req) -> None:
        """``req``'s prompt KV is complete: start its samples 1..n-1 (rids :func:`sample_rid`).

        Each sample shares the prompt's KV (:meth:`_copy_prompt_kv`) but for the last prompt token, which it recomputes
        (one token) to sample its own first token with its own seed (``seed + i``). A sample that
        finds no free slot or pages is queued to prefill on its own. The P/D prefill side never
        forks: its decode server does, after the KV arrived. The samples' ids were reserved with
        ``req``'s on arrival."""
        n = req.params.n
        if n <= 1 or req.stop_after_prefill:
            return
        req.params = replace(req.params, n=1)
        for i in range(1, n):
            seed = None if req.params.seed is None else req.params.seed + i
            child = Req(
                rid=sample_rid(req.rid, i),
                input_ids=req.input_ids,
                params=replace(req.params, seed=seed, stop=list(req.params.stop),
                               stop_token_ids=list(req.params.stop_token_ids)),
                return_logprob=req.return_logprob,
                top_logprobs_num=req.top_logprobs_num,
                logprob_start_len=len(req.input_ids) - 1,
                grammar=None if req.grammar is None else req.grammar.deep_copy(),
            )
            self._init_request(child)
            child.cached_tokens = req.cached_tokens
            if self.slots.num_free and self._copy_prompt_kv(req, child):
                self.slots.acquire(child)
                self._set_state(child, ReqState.PREFILLING, f"forked from {req.rid}")
                self.running.append(child)
            else:
                child.history.append(f"forked from {req.rid}, queued")
                self.waiting.append(child)

    def _copy_prompt_kv(self, parent: Req, child: Req) -> bool:
        """Give ``child`` ``parent``'s prompt KV (all but the last token counted as computed): the
        full pages before the one holding the last prompt token are shared (one more reference
        each; nobody writes them again), and that page, which the sample rewrites from the last
        prompt token on, is copied into a page of the child's own."""
        shared = (len(parent.input_ids) - 1) // self.pool.page_size
        need = self.pool.pages_for(len(parent.input_ids))
        if not self.pool.can_alloc(need - shared + 1):  # keep one page of decode headroom
            return False
        own = self.pool.alloc(need - shared)
        src = torch.tensor(parent.pages[shared:need], device=self.pool.device)
        dst = torch.tensor(own, device=self.pool.device)
        for layer in self.pool.layers:
            layer[dst] = layer[src]
        self.pool.ref(parent.pages[:shared])
        child.pages = parent.pages[:shared] + own
        child.num_computed = len(parent.input_ids) - 1
        return True

    def _unborn_samples(self, req: Req) -> list[str]:
        """The rids of ``req``'s samples 1..n-1 when it ends before forking them."""
        if req.params.n <= 1 or req.stop_after_prefill:
            return []
        return [sample_rid(req.rid, i) for i in range(1, req.params.n)]

    # ------------------------------------------------------------------ internals
    def _init_request(self, req: Req) -> None:
        req.arrival_order = next(self._arrivals)
        req.state = ReqState.WAITING
        if not req.params.greedy:
            seed = req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            req.generator = new_generator(seed, self.runner.device)

    def _decode_reserve(self) -> int:
        """Pages kept free for the next ``reserved_decode_tokens`` of every running request (and of
        every P/D request whose KV is arriving), so admitting more does not force retractions."""
        reqs = itertools.chain(self.running, self.awaiting_kv.values())
        return sum(self._reserve_pages(r, r.seq_len) for r in reqs)

    def _reserve_pages(self, req: Req, seq_len: int) -> int:
        remaining = max(req.params.max_new_tokens - len(req.output_ids), 0)
        tokens = seq_len + min(self.reserved_decode_tokens, remaining)
        return max(self.pool.pages_for(tokens) - max(len(req.pages), self.pool.pages_for(seq_len)), 0)

    def _allocate_pending(self, admission: Admission) -> None:
        """P/D decode: a slot and pages for requests whose KV comes from prefill, in arrival order,
        after the retracted requests waiting to be recomputed and with the running requests' decode
        reserve."""
        if any(r.output_ids for r in self.waiting):
            return
        while self.pending_alloc and self.slots.num_free:
            req = self.pending_alloc[0]
            prefix = self._match_remote_prefix(req)
            need = self.pool.pages_for(len(req.input_ids)) - len(prefix)
            own = self._reserve_pages(req, len(req.input_ids) + 1)
            if not admission.fits(need, own):
                self.pool.unref(prefix)
                return
            self.pending_alloc.popleft()
            req.pages = prefix + admission.admit(req, need, own)
            req.decode_cached_tokens = len(prefix) * self.pool.page_size
            self._set_state(req, ReqState.WAITING_KV)
            self.awaiting_kv[req.rid] = req
            if self.on_pages_allocated is not None:
                try:
                    self.on_pages_allocated(req)
                except Exception as e:  # fail this request, not the step's batch
                    logger.exception("pages-allocated hook failed for %s", req.rid)
                    self._fail_request(req, f"internal error after allocating its KV pages: {_describe(e)}", 500)

    def _retract(self, req: Req) -> None:
        """Drop ``req``'s attempt (pages, slot, progress, input logprobs) and put it at the front of
        the queue to be recomputed later by a fresh one."""
        self.running.remove(req)
        self._end_attempt(req)
        req.num_retractions += 1
        self.num_retractions += 1
        self._set_state(req, ReqState.WAITING, "retracted")
        if req.output_ids and req.stalled_since is None:
            req.stalled_since = self.clock()  # its wait runs until it decodes again
        self.waiting.appendleft(req)

    def _end_attempt(self, req: Req, cache: bool = True) -> None:
        """Drop ``req``'s attempt: its page references (with ``cache``, computed full pages enter
        the prefix cache first), its slot, its progress; the next attempt starts afresh."""
        self._free(req, cache)
        self.slots.release(req)
        req.attempt = Attempt()

    def _free(self, req: Req, cache: bool = True) -> None:
        """Drop the request's references to its pages (a transfer or cache may still hold them);
        with ``cache``, its computed full pages enter the prefix cache first."""
        if req.pages:
            if cache:
                self._cache_computed(req)
            self.pool.unref(req.pages)
            req.pages = []

    def _arrive(self, req: Req) -> None:
        self.ids.reserve(req.rid, req.num_samples)
        self._init_request(req)
        req.history.append(f"step {self.num_steps}: arrived")

    def _forget(self, req: Req, ids: list[str]) -> None:
        """``req`` has ended: free the ids it answered for."""
        for name in ids:
            self.ids.release(name)
        self._recent.append(req)

    def _set_state(self, req: Req, state: ReqState, note: str = "") -> None:
        req.state = state
        req.history.append(f"step {self.num_steps}: {state.value}" + (f" ({note})" if note else ""))
        if len(req.history) > MAX_HISTORY:
            del req.history[: len(req.history) - MAX_HISTORY]

    # ------------------------------------------------------------------ integrity
    def check_integrity(self) -> None:
        """Raise :class:`IntegrityError` unless slots, pages, ids and queues agree: every request in
        exactly one queue in that queue's state, exactly the running and KV-receiving ones holding a
        slot, queued ones holding no pages, each request's pages referenced at least once per
        holder, every live id owned by a live request, and the pool's (and cache's) own books."""
        queues = {
            ReqState.WAITING: list(self.waiting), ReqState.WAITING_KV: list(self.awaiting_kv.values()),
            ReqState.PREFILL_DONE: list(self.held.values()),
        }
        pending = list(self.pending_alloc)
        running = list(self.running)
        live = [*running, *pending, *itertools.chain.from_iterable(queues.values())]
        seen: dict[str, Req] = {}
        for req in live:
            if req.rid in seen:
                raise IntegrityError(f"request {req.rid} is queued twice{_history(req)}")
            seen[req.rid] = req
            if req.rid not in self.ids:
                raise IntegrityError(f"live request {req.rid} holds no id{_history(req)}")
        for name in self.ids:
            owner = self.ids.owner(name)
            if name not in seen and owner not in seen:
                raise IntegrityError(f"id {name} is reserved for {owner}, which is not live")
        for state, reqs in queues.items():
            for req in reqs:
                if req.state != state:
                    raise IntegrityError(f"request {req.rid} is {req.state.value} in the {state.value} queue{_history(req)}")
        for req in running:
            if req.state not in (ReqState.PREFILLING, ReqState.DECODING):
                raise IntegrityError(f"request {req.rid} runs in state {req.state.value}{_history(req)}")
        for req in pending:
            if req.state != ReqState.WAITING:
                raise IntegrityError(f"request {req.rid} awaits pages in state {req.state.value}{_history(req)}")
        for req in [*self.waiting, *pending]:
            if req.pages or req.attempt.slot is not None or req.num_computed:
                raise IntegrityError(f"queued request {req.rid} holds pages {req.pages}, slot {req.attempt.slot}, "
                                     f"{req.num_computed} computed tokens{_history(req)}")
        self.slots.check([*running, *self.awaiting_kv.values()])
        holders: Counter[int] = Counter()
        for req in live:
            if req.num_computed > len(req.pages) * self.pool.page_size:
                raise IntegrityError(f"request {req.rid} counts {req.num_computed} computed tokens in "
                                     f"{len(req.pages)} pages{_history(req)}")
            logprobs = req.attempt.input_logprobs
            if logprobs is not None and len(logprobs.ids) > req.num_computed:
                raise IntegrityError(f"request {req.rid} holds {len(logprobs.ids)} input logprobs for "
                                     f"{req.num_computed} computed tokens{_history(req)}")
            holders.update(req.pages)
        for page, count in holders.items():
            if self.pool.refcount(page) < count:
                raise IntegrityError(f"page {page} has {self.pool.refcount(page)} references for {count} requests "
                                     "holding it")
        self.pool.check_integrity()
        if self.cache is not None:
            self.cache.check_integrity()

    def check_idle(self) -> bool:
        """The integrity check production runs when the engine has just become idle (as
        mini-sglang does), at most every :data:`IDLE_CHECK_INTERVAL_S` (the pool walk costs about
        0.35 s per million pages): the first violation is logged once, with the history of the
        requests that ended last. Returns False once a violation was found."""
        now = self.clock()
        if self.integrity_violation is not None:
            return False
        if self.num_requests() or now - self._idle_checked_at < IDLE_CHECK_INTERVAL_S:
            return True
        self._idle_checked_at = now
        try:
            self.check_integrity()
        except (IntegrityError, AssertionError, RuntimeError) as e:
            if self.integrity_violation is None:
                self.integrity_violation = str(e)
                recent = "; ".join(f"{r.rid}: {' / '.join(r.history)}" for r in self._recent)
                logger.error("scheduler integrity violated at idle: %s (recent requests: %s)", e, recent or "none")
            return False
        return True

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


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _history(req: Req) -> str:
    return f" (history: {' / '.join(req.history)})" if req.history else ""

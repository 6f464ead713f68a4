"""The front's request pipeline, shared by the native and OpenAI routes.

:class:`GenerationService` checks a tokenized prompt against the limits the workers reported at
startup (so bad requests get a 400 before any byte of a stream), picks a DP rank and submits.
Each submitted request becomes a :class:`Generation`, which consumes the worker's outputs:
incremental detokenization, stop-string trimming (and holding back a possible stop-string prefix
while streaming), logprob accumulation and timing. The API modules only format its state.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.engine.grammar import MAX_GRAMMAR_CHARS, GrammarError, grammar_field
from pdserve.engine.output_format import merge_logprobs, trim_stop
from pdserve.engine.request import SamplingParams, StepOutput, TokenLogprobs
from pdserve.engine.validation import FieldError, RequestLimits
from pdserve.server import messages as msg
from pdserve.server.controller import DPController, RequestHandle
from pdserve.server.errors import ServerError, bad_request
from pdserve.server.request_code import (
    RequestCodeCrashed,
    RequestCodePool,
    RequestCodeRunner,
    RequestCodeTimeout,
)

T = TypeVar("T")

MAX_CHARS_PER_TOKEN = 32  # a text prompt longer than context_length * this cannot fit: refused before tokenizing
MAX_BATCH = 1024  # prompts in one request
OFFLOAD_THREADS = 2  # tokenization and chat templates run here, never on the event loop
GRAMMAR_DEADLINE_S = 5.0  # a request's grammar (or its tools' schemas) must compile within this
GRAMMAR_VERDICTS = 1024  # grammars whose verdict the front remembers (LRU)
GRAMMAR_CHILDREN = 3  # grammar checks run at once, each in its own child: one slow grammar holds up no other
REQUEST_TEMPLATE_DEADLINE_S = 2.0  # a chat template a request supplies must render within this


@dataclass
class GenRequest:
    """One prompt, tokenized, with everything the engine and the front need to serve it."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens_given: bool = True  # False: the default may be shrunk to fit the context
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    dp_rank: int | None = None  # pinned by the client
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    prefill_dp_rank: int | None = None
    detach_room: bool = False  # vLLM's P/D protocol (server/kv_transfer.py)
    prefill_instance: str | None = None
    prefill_room_known: bool = False
    kv_transfer_leg: Any = None  # its parsed kv_transfer_params (a PrefillLeg or DecodeLeg)
    prompt_field: str = "input_ids"  # names used in error messages
    max_tokens_field: str = "max_new_tokens"
    grammar_field: str | None = None  # the client's name for the grammar (response_format, guided_json ...)
    health_probe: bool = False  # the server's own /health_generate probe: computed on the rank it names
    local_prefill: bool = False  # decode mode, no KV source, allowed by the operator's flag: the prompt is computed here


# A decode server never computes a prompt it was meant to receive: what a request must name instead
NO_KV_SOURCE = (
    "this decode server receives each prompt's KV cache from a prefill server, and the request names no KV "
    "source: give bootstrap_room with bootstrap_host and bootstrap_port (and optionally disagg_prefill_dp_rank), "
    "as a P/D router does (the server was not started with --disaggregation-decode-allow-local-prefill)"
)


def kv_source(req: GenRequest) -> str | None:
    """Where a decode-mode request's prompt KV comes from (a short description), or None when it names no
    source. The one place that decides it: every KV source a decode server accepts (a bootstrap room today;
    vLLM's ``kv_transfer_params`` once decode reads them) is recognised here, so the refusal of a request
    with none stays in one check (:meth:`GenerationService.check`)."""
    if req.bootstrap_room is not None:
        return f"bootstrap_room {req.bootstrap_room}"
    return None


class GenerationService:
    """Validates, dispatches and submits requests; creates the tokenizer-side state of each."""

    def __init__(self, controller: DPController, tokenizer: Any) -> None:
        self.controller = controller
        self.tokenizer = tokenizer
        info = controller.info
        self.context_length = info.context_length
        self.max_total_tokens = info.max_total_tokens
        self.vocab_size = info.vocab_size
        self.limits = RequestLimits(self.context_length, self.max_total_tokens, self.vocab_size,
                                    max_n=controller.config.max_n)
        self._token_text: dict[int, str] = {}
        self.max_prompt_chars = self.context_length * MAX_CHARS_PER_TOKEN
        self._offload = ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="pdserve-tokenize")
        self.request_code = RequestCodeRunner()  # a request's own chat template: a child process of its own
        self._grammar_code: RequestCodePool | None = None  # grammars and tool schemas: children of their own
        self._verdicts: OrderedDict[tuple[str, str], str] = OrderedDict()  # (kind, sha256) -> "" or the refusal

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run per-request CPU work (tokenizing, chat templates) off the event loop, so one large
        request cannot stall other clients' streams or ``/health``."""
        return await asyncio.get_running_loop().run_in_executor(self._offload, fn, *args)

    def close(self) -> None:
        self.request_code.close()
        if self._grammar_code is not None:
            self._grammar_code.close()

    @property
    def request_template_limits(self) -> tuple[float, int]:
        """Deadline (s) and output cap (characters: what could still fit the context) of a
        request's own chat template."""
        return REQUEST_TEMPLATE_DEADLINE_S, self.max_prompt_chars

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Token ids of ``text``; 400 naming ``field`` before tokenizing when it cannot fit the context."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(
                f"{field} has {len(text)} characters; with a context length of {self.context_length} tokens at "
                f"most {self.max_prompt_chars} are accepted",
                field,
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def tokens_text(self, ids: list[int]) -> str:
        return "".join(self.token_text(t) for t in ids)

    # ------------------------------------------------------------------ checks
    def check(self, req: GenRequest) -> None:
        """The engine's own checks (the one validator, with the limits the workers reported), done
        here first so errors arrive before a stream starts; then what only the front knows (ranks,
        bootstrap addresses)."""
        try:
            self.limits.check(req.input_ids, req.params, req.top_logprobs_num, req.logprob_start_len,
                              req.prompt_field, req.max_tokens_field, fit_max_new_tokens=not req.max_new_tokens_given)
        except FieldError as e:
            raise bad_request(str(e), e.field) from None
        if req.dp_rank is not None and not 0 <= req.dp_rank < self.controller.dp_size:
            raise bad_request(
                f"data_parallel_rank must be in [0, {self.controller.dp_size - 1}], got {req.dp_rank}",
                "data_parallel_rank",
            )
        if req.bootstrap_port is not None and not 0 < req.bootstrap_port < 65536:
            raise bad_request(f"bootstrap_port must be in [1, 65535], got {req.bootstrap_port}", "bootstrap_port")
        if self.controller.config.disagg.mode == "decode":
            self._check_kv_source(req)
        if self.controller.config.disagg.mode == "decode" and req.bootstrap_room is not None:
            if not req.bootstrap_host:
                raise bad_request("bootstrap_host is required with bootstrap_room on a decode server", "bootstrap_host")
            disagg = self.controller.config.disagg
            if not disagg.bootstrap_allowed(req.bootstrap_host):
                raise bad_request(
                    f"bootstrap_host {req.bootstrap_host[:256]!r} is not an allowed bootstrap address "
                    f"(--disaggregation-allowed-bootstrap: {', '.join(disagg.allowed_networks())})",
                    "bootstrap_host",
                )
            if req.prefill_dp_rank is not None and req.prefill_dp_rank < 0:
                raise bad_request(
                    f"disagg_prefill_dp_rank must be >= 0, got {req.prefill_dp_rank}", "disagg_prefill_dp_rank"
                )

    def _check_kv_source(self, req: GenRequest) -> None:
        """A decode-mode request names where its KV comes from (:func:`kv_source`), else it is refused with 400;
        or, with ``--disaggregation-decode-allow-local-prefill``, marked to be computed here (counted and shown)."""
        if req.health_probe or kv_source(req) is not None:
            return
        if req.prefill_dp_rank is not None:
            raise bad_request(
                f"disagg_prefill_dp_rank {req.prefill_dp_rank} names a prefill rank but no bootstrap_room: a decode "
                "server fetches a prompt's KV by its room", "bootstrap_room",
            )
        if not self.controller.config.disagg.decode_allow_local_prefill:
            raise bad_request(NO_KV_SOURCE, "bootstrap_room")
        req.local_prefill = True

    async def check_grammars(self, reqs: Sequence[GenRequest]) -> None:
        """Check each request's grammar in the grammar child (``server/grammar_check.py``): 400
        naming the field if it is over MAX_GRAMMAR_CHARS, does not compile, takes longer than
        GRAMMAR_DEADLINE_S or crashes the compiler. Never on the front's own threads."""
        for req in reqs:
            try:
                found = grammar_field(req.params)
            except GrammarError as e:
                field = req.grammar_field or f"sampling_params.{e.field}"
                raise bad_request(f"{field}: {e.detail}", field) from None
            if found is None:
                continue
            kind, text = found
            field = req.grammar_field or f"sampling_params.{kind}"
            if len(text) > MAX_GRAMMAR_CHARS:
                raise bad_request(f"{field}: the {kind} has {len(text)} characters; at most {MAX_GRAMMAR_CHARS} "
                                  "are accepted", field)
            from pdserve.server.grammar_check import check_grammar

            job = functools.partial(self._grammar_runner().run, GRAMMAR_DEADLINE_S, check_grammar, kind, text)
            refusal = await self._verdict(kind, text, "the grammar", job)
            if refusal:
                raise bad_request(f"{field}: {refusal}", field)

    async def check_tool_schemas(self, schemas: Sequence[Any]) -> None:
        """Check tools' ``function.parameters`` schemas in the grammar child: 400 naming ``tools``
        for the first that is no usable JSON Schema, or when they do not compile in time."""
        if not schemas:
            return
        from pdserve.server.grammar_check import check_schemas

        async def first_bad() -> str:
            found = await self._grammar_runner().run(GRAMMAR_DEADLINE_S, check_schemas, list(schemas))
            return "" if found is None else f"tools[{found[0]}].function.parameters is not a valid JSON Schema: " \
                                            f"{found[1]}"

        text = json.dumps(list(schemas), sort_keys=True)
        refusal = await self._verdict("tools", text, "the tools' schemas", first_bad)
        if refusal:
            raise bad_request(refusal, "tools")

    async def _verdict(self, kind: str, text: str, what: str, job: Callable[[], Any]) -> str:
        """The remembered verdict on ``text`` ("" or why it is refused), else ``await job()`` (a
        check in the grammar child) and remember it; a deadline or a crash is a verdict too."""
        key = (kind, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
            return verdict
        try:
            verdict = await job()
        except RequestCodeTimeout:
            verdict = f"{what} did not compile within {GRAMMAR_DEADLINE_S:g} s"
        except RequestCodeCrashed:
            verdict = f"{what} crashed the grammar compiler (too deeply nested?)"
        self._verdicts[key] = verdict
        while len(self._verdicts) > GRAMMAR_VERDICTS:
            self._verdicts.popitem(last=False)
        return verdict

    def _grammar_runner(self) -> RequestCodePool:
        """The grammar children (each killed at its job's deadline, no grace: a compile cannot stop
        itself), started on first use."""
        if self._grammar_code is None:
            from pdserve.server.grammar_check import start

            tok = self.tokenizer
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            self._grammar_code = RequestCodePool(GRAMMAR_CHILDREN, grace_s=0.0, initializer=start,
                                                 initargs=(tok.to_json(), self.vocab_size, eos))
        return self._grammar_code

    # ------------------------------------------------------------------ submit
    def start(self, req: GenRequest) -> list[Generation]:
        """Submit one request: its generation, or one per sample when ``n`` > 1 (a P/D prefill
        server computes the prompt once for all samples and answers for the first only)."""
        self.check(req)
        rank = self.controller.pick_rank(req.dp_rank, req.bootstrap_room)
        if req.local_prefill and self.controller.metrics is not None:
            self.controller.metrics.decode_local_prefills.labels(self.controller.metrics.model_name).inc()
        message = msg.GenerateReq(
            rid=req.rid,
            input_ids=req.input_ids,
            sampling_params=req.params,
            dp_rank=rank,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            logprob_start_len=req.logprob_start_len,
            bootstrap_host=req.bootstrap_host,
            bootstrap_port=req.bootstrap_port,
            bootstrap_room=req.bootstrap_room,
            prefill_dp_rank=req.prefill_dp_rank,
            detach_room=req.detach_room,
            prefill_instance=req.prefill_instance,
            prefill_room_known=req.prefill_room_known,
        )
        if self.controller.config.disagg.mode == "prefill":
            return [Generation(self, req, self.controller.submit(message))]
        return [Generation(self, req, handle) for handle in self.controller.submit_samples(message)]

    def start_all(self, reqs: Sequence[GenRequest]) -> list[Generation]:
        """Check every item first, then submit; a failure submits nothing (or releases what was).
        The result holds each request's samples in order (prompt i, sample j at ``i * n + j``)."""
        for req in reqs:
            self.check(req)
        gens: list[Generation] = []
        try:
            for req in reqs:
                gens.extend(self.start(req))
        except BaseException:
            close_all(gens)
            raise
        batch = batch_rid([req.rid for req in reqs])
        if batch is not None:
            self.controller.group_batch(batch, [gen.handle for gen in gens])
        return gens


def batch_rid(rids: Sequence[str]) -> str | None:
    """The rid of a batch request whose items are named ``rid-0``, ``rid-1`` ... (as the routes name
    them), or None when ``rids`` is no such batch."""
    if len(rids) < 2 or not rids[0].endswith("-0"):
        return None
    base = rids[0][:-2]
    return base if all(rid == f"{base}-{i}" for i, rid in enumerate(rids)) else None


class Generation:
    """One submitted request seen from the front: cumulative output text, ids, logprobs, timing."""

    def __init__(self, service: GenerationService, req: GenRequest, handle: RequestHandle) -> None:
        from pdserve.models.tokenizer import IncrementalDetokenizer

        self.service = service
        self.req = req
        self.handle = handle
        self.detok = IncrementalDetokenizer(service.tokenizer, req.input_ids, req.params.skip_special_tokens)
        self.output_ids: list[int] = []
        self.text = ""  # text released to the client so far
        self.finished = False
        self.finish_reason: dict[str, Any] | None = None
        self.cached_tokens = 0
        self.input_logprobs: TokenLogprobs | None = None
        self.output_logprobs: TokenLogprobs | None = None
        self.finished_at: float | None = None

    @property
    def rid(self) -> str:
        return self.handle.rid

    @property
    def is_first_sample(self) -> bool:
        """Sample 0 of its prompt (usage counts each prompt once, whatever ``n``)."""
        return self.handle.rid == self.req.rid

    @property
    def dp_rank(self) -> int:
        return self.handle.rank

    @property
    def prompt_tokens(self) -> int:
        return len(self.req.input_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_output_logprobs(self) -> int:
        return 0 if self.output_logprobs is None else len(self.output_logprobs.ids)

    @property
    def ttft(self) -> float | None:
        first = self.handle.first_token_at
        return None if first is None else first - self.handle.arrival

    @property
    def e2e_latency(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return end - self.handle.arrival

    async def advance(self) -> str:
        """Wait for the next output that brings tokens or the finish; return the newly released text."""
        if self.finished:
            return ""
        while True:
            item = await self.handle.queue.get()
            if isinstance(item, ServerError):
                self.finished = True
                self.finished_at = time.perf_counter()
                raise item
            reason = item.finish_reason or {}
            if item.finished and not item.new_token_ids and not self.output_ids and reason.get("status_code"):
                self.finished = True
                self.finished_at = time.perf_counter()
                param = reason.get("param")
                raise ServerError(int(reason["status_code"]), str(reason.get("message", "request failed")),
                                  param if isinstance(param, str) else None, retryable=reason.get("retryable"))
            delta = self._apply(item)
            if item.new_token_ids or item.finished:
                return delta

    def close(self) -> None:
        """Idempotent: abort the request at its worker unless it already finished."""
        if not self.finished:
            self.finished = True
            self.service.controller.release(self.handle)

    def _apply(self, out: StepOutput) -> str:
        self.input_logprobs = merge_logprobs(self.input_logprobs, out.input_logprobs)
        self.output_logprobs = merge_logprobs(self.output_logprobs, out.output_logprobs)
        if out.cached_tokens:
            self.cached_tokens = out.cached_tokens
        ids = list(out.new_token_ids)
        self.output_ids.extend(ids)
        params = self.req.params
        if not out.finished:
            if ids:
                self.detok.step(ids)
            full = self.detok.text
            release = len(full) - _stop_prefix_len(full, params.stop)
            return self._release(full[:max(release, len(self.text))])
        self.finished = True
        self.finished_at = time.perf_counter()
        self.finish_reason = out.finish_reason
        matched = (out.finish_reason or {}).get("matched")
        if isinstance(matched, int) and not isinstance(matched, bool) and not params.no_stop_trim and ids:
            ids = ids[:-1]  # the stop token itself is not part of the text
        if ids:
            self.detok.step(ids)
        self.detok.flush()
        return self._release(trim_stop(self.detok.text, out.finish_reason, params.no_stop_trim))

    def _release(self, text: str) -> str:
        if len(text) <= len(self.text):
            return ""
        delta = text[len(self.text):]
        self.text = text
        return delta


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


# ---------------------------------------------------------------------- several generations at once


def close_all(gens: Sequence[Generation]) -> None:
    for gen in gens:
        gen.close()


async def _gather_cancelling(coros: list) -> list:
    """Like ``asyncio.gather`` but cancels the others when one fails or the caller is cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def run_to_end(gens: Sequence[Generation]) -> None:
    """Drive every generation to its finish (non-streaming responses)."""

    async def one(gen: Generation) -> None:
        while not gen.finished:
            await gen.advance()

    await _gather_cancelling([one(g) for g in gens])


async def first_outputs(gens: Sequence[Generation]) -> list[str]:
    """The first released text of each generation; errors (e.g. rejections) surface here."""
    if len(gens) == 1:
        return [await gens[0].advance()]
    return await _gather_cancelling([g.advance() for g in gens])


async def interleave(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, str]]:
    """``(index, delta)`` for every further output of any unfinished generation, as it arrives."""
    if len(gens) == 1:
        gen = gens[0]
        while not gen.finished:
            delta = await gen.advance()
            yield 0, delta
        return
    pending: dict[asyncio.Task, int] = {
        asyncio.ensure_future(g.advance()): i for i, g in enumerate(gens) if not g.finished
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                yield index, task.result()
                if not gens[index].finished:
                    pending[asyncio.ensure_future(gens[index].advance())] = index
    finally:
        for task in pending:
            task.cancel()

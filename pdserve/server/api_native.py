"""SGLang's native routes: ``/generate`` plus the health, info, load and admin endpoints.

Response shapes follow SGLang: ``{"text", "output_ids", "meta_info"}`` per prompt (a list for a
batch), streamed as SSE chunks carrying the cumulative text and ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pdserve import __version__
from pdserve.engine.output_format import logprob_triples, top_logprob_triples
from pdserve.engine.request import RequestError, SamplingParams
from pdserve.request_bodies import (
    DetokenizeBody,
    GenerateBody,
    TokenizeBody,
    openapi_request_body,
    request_schema,
    struct_schema,
)
from pdserve.server.access import log_access, rank_headers
from pdserve.server.api_common import (
    SSE_DONE,
    SSEResponse,
    check_room,
    per_item,
    pinned_rank,
    read_json,
    sse,
    unless_disconnected,
)
from pdserve.server.errors import ServerError, bad_request
from pdserve.server.fields import check_fields
from pdserve.server.generation import (
    MAX_BATCH,
    Generation,
    GenRequest,
    close_all,
    first_outputs,
    interleave,
    run_to_end,
)
from pdserve.server.kv_event_feed import MAX_WAIT_S
from pdserve.server.state import ServerState

HEALTH_GENERATE_TIMEOUT_S = 60.0

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _prompts(body: GenerateBody) -> tuple[list[str | list[int]], bool]:
    """The prompts of the request and whether it is a batch."""
    if body.text is not None and body.input_ids is not None:
        raise bad_request("give either text or input_ids, not both", "text")
    if body.text is not None:
        texts = body.text if isinstance(body.text, list) else [body.text]
        if not texts:
            raise bad_request("text is an empty list", "text")
        if not all(texts):
            raise bad_request("text is empty: the prompt must contain at least one character", "text")
        return list(texts), isinstance(body.text, list)
    if body.input_ids is not None:
        ids = body.input_ids
        if not ids:
            raise bad_request("input_ids is empty: the prompt must have at least one token", "input_ids")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return [list(ids)], False
        if all(isinstance(row, list) for row in ids):
            for i, row in enumerate(ids):
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
                    raise bad_request(f"input_ids[{i}] must be a list of integers", "input_ids")
            return [list(row) for row in ids], True
        raise bad_request("input_ids must be a list of integers or a list of such lists", "input_ids")
    raise bad_request("missing prompt: give text or input_ids", "text")


def build_requests(state: ServerState, request: Request, body: GenerateBody) -> tuple[list[GenRequest], bool]:
    """One :class:`GenRequest` per prompt, and whether the body is a batch."""
    service = state.require_service()
    prompts, batch = _prompts(body)
    n = len(prompts)
    if n > MAX_BATCH:
        raise bad_request(f"a batch may hold at most {MAX_BATCH} prompts, got {n}", "text" if body.text else "input_ids")
    rank = pinned_rank(request, body, state.config.dp_size)
    rids = per_item(body.rid, n, "rid", batch)
    if batch and isinstance(body.rid, str):
        rids = [f"{body.rid}-{i}" for i in range(n)]
    params_list = per_item(body.sampling_params, n, "sampling_params", batch)
    return_logprob = per_item(body.return_logprob, n, "return_logprob", batch)
    start_len = per_item(body.logprob_start_len, n, "logprob_start_len", batch)
    top_num = per_item(body.top_logprobs_num, n, "top_logprobs_num", batch)
    hosts = per_item(body.bootstrap_host, n, "bootstrap_host", batch)
    ports = per_item(body.bootstrap_port, n, "bootstrap_port", batch)
    rooms = [check_room(r) for r in per_item(body.bootstrap_room, n, "bootstrap_room", batch)]
    prefill_rank = body.disagg_prefill_dp_rank if body.disagg_prefill_dp_rank is not None else (
        body.prefill_data_parallel_rank
    )
    reqs = []
    base = uuid.uuid4().hex
    for i, prompt in enumerate(prompts):
        raw = params_list[i]
        try:
            params = SamplingParams.from_dict(raw)
        except RequestError as e:
            text = str(e)
            raise bad_request(text if text.startswith("unsupported field") else f"sampling_params: {text}",
                              "sampling_params") from None
        ids = service.encode(prompt, field="text") if isinstance(prompt, str) else prompt
        reqs.append(
            GenRequest(
                rid=rids[i] if rids[i] is not None else (base if n == 1 else f"{base}-{i}"),
                input_ids=ids,
                params=params,
                max_new_tokens_given=isinstance(raw, dict) and raw.get("max_new_tokens") is not None,
                return_logprob=bool(return_logprob[i]),
                top_logprobs_num=top_num[i],
                logprob_start_len=start_len[i],
                return_text_in_logprobs=body.return_text_in_logprobs,
                dp_rank=rank,
                bootstrap_host=hosts[i],
                bootstrap_port=ports[i],
                bootstrap_room=rooms[i],
                prefill_dp_rank=prefill_rank,
                prompt_field="text" if isinstance(prompt, str) else "input_ids",
            )
        )
    return reqs, batch


def response_item(gen: Generation, index: int | None = None) -> dict[str, Any]:
    """SGLang's per-prompt result (cumulative so far)."""
    meta: dict[str, Any] = {
        "id": gen.rid,
        "finish_reason": gen.finish_reason,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "cached_tokens": gen.cached_tokens,
        "e2e_latency": gen.e2e_latency,
        "ttft": gen.ttft,
        "dp_rank": gen.dp_rank,
    }
    disagg = gen.handle.disagg_meta
    if disagg is not None:
        meta.update({k: v for k, v in msgspec.structs.asdict(disagg).items() if v is not None})
    req = gen.req
    if req.local_prefill:
        meta["local_prefill"] = True  # a decode server computed this prompt itself (no KV source; operator's flag)
    if req.return_logprob:
        detok = gen.service.tokens_text if req.return_text_in_logprobs else None
        meta["input_token_logprobs"] = logprob_triples(gen.input_logprobs, detok)
        meta["output_token_logprobs"] = logprob_triples(gen.output_logprobs, detok)
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = top_logprob_triples(gen.input_logprobs, detok)
            meta["output_top_logprobs"] = top_logprob_triples(gen.output_logprobs, detok)
    item: dict[str, Any] = {"text": gen.text, "output_ids": list(gen.output_ids), "meta_info": meta}
    if index is not None:
        item["index"] = index
    return item


@router.post("/generate", openapi_extra=openapi_request_body(request_schema("generate")))
async def generate(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, GenerateBody, state.config.max_request_bytes)
    check_fields("generate", request.state.json_body)
    request.state.no_logs = bool(getattr(body, "no_logs", False))
    reqs, batch = await state.require_service().offload(build_requests, state, request, body)
    await state.require_service().check_grammars(reqs)
    gens = state.require_service().start_all(reqs)
    if not body.stream:
        try:
            await unless_disconnected(request, run_to_end(gens))
        finally:
            close_all(gens)
        results = [response_item(g) for g in gens]
        mode = state.config.disaggregation_mode
        log_access(request, gens, mode)
        return JSONResponse(results if batch or len(gens) > 1 else results[0], headers=rank_headers(gens, mode))
    try:
        await unless_disconnected(request, first_outputs(gens))
    except BaseException:
        close_all(gens)
        raise

    indexed = batch or len(gens) > 1  # a batch, or SGLang's batch-of-n form (sampling_params.n)

    async def chunks():
        for i, gen in enumerate(gens):
            yield sse(response_item(gen, i if indexed else None))
        try:
            async with aclosing(interleave(gens)) as updates:
                async for i, _delta in updates:
                    yield sse(response_item(gens[i], i if indexed else None))
        except ServerError as e:
            yield sse(e.native_body())
        yield SSE_DONE

    mode = state.config.disaggregation_mode

    def on_close() -> None:
        close_all(gens)
        log_access(request, gens, mode)

    response = SSEResponse(chunks(), on_close)
    response.headers.update(rank_headers(gens, mode))
    return response


@router.get("/health")
async def health(request: Request) -> Response:
    state = _state(request)
    ranks = state.controller.rank_states()
    if state.healthy:
        return JSONResponse({"status": "ok", "dp_ranks": ranks})
    return JSONResponse({"error": {"message": state.unhealthy_reason(), "code": 503}, "dp_ranks": ranks},
                        status_code=503)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    state = _state(request)
    if not state.healthy:
        return JSONResponse({"error": {"message": state.unhealthy_reason(), "code": 503}}, status_code=503)
    ok = await state.probe_generate(HEALTH_GENERATE_TIMEOUT_S)
    if ok is not None:
        return JSONResponse({"error": {"message": ok, "code": 503}}, status_code=503)
    return Response(status_code=200)


def _server_info(state: ServerState) -> dict[str, Any]:
    info = state.require_info()
    cfg = state.config
    engine = cfg.engine
    return {
        "model_path": info.model_path,
        "tokenizer_path": info.model_path,
        "served_model_name": state.served_model_name,
        "dp_size": cfg.dp_size,
        "tp_size": 1,
        "pp_size": 1,
        "disaggregation_mode": cfg.disaggregation_mode,
        "disaggregation_transfer_backend": cfg.disagg.transfer_backend,
        "disaggregation_bootstrap_port": (
            state.controller.bootstrap.port if state.controller.bootstrap is not None else cfg.disagg.bootstrap_port
        ),
        "page_size": info.page_size,
        "max_total_tokens": info.max_total_tokens,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "chunked_prefill_size": engine.chunked_prefill_size,
        "max_running_requests": engine.max_running_requests,
        "load_balance_method": cfg.load_balance_method,
        "host": cfg.host,
        "port": cfg.port,
        "dtype": info.compute_path.get("dtype", engine.dtype),
        "device": info.compute_path.get("device", engine.device),
        "compute_path": info.compute_path,
        "random_seed": engine.random_seed,
        "is_embedding": False,
        "version": __version__,
    }


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request) -> Response:
    return JSONResponse(_server_info(_state(request)))


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(request: Request) -> Response:
    state = _state(request)
    info = state.require_info()
    return JSONResponse(
        {
            "model_path": info.model_path,
            "tokenizer_path": info.model_path,
            "served_model_name": state.served_model_name,
            "is_generation": True,
            "context_length": info.context_length,
        }
    )


@router.post("/tokenize", openapi_extra=openapi_request_body(struct_schema(TokenizeBody)))
@router.post("/v1/tokenize", openapi_extra=openapi_request_body(struct_schema(TokenizeBody)))
async def tokenize(request: Request) -> Response:
    """vLLM's shape: ``{"tokens", "count", "max_model_len"}`` for ``prompt`` (or ``text``)."""
    state = _state(request)
    body = await read_json(request, TokenizeBody, state.config.max_request_bytes)
    text = body.prompt if body.prompt is not None else body.text
    if text is None:
        raise bad_request("prompt is required", "prompt")
    service = state.require_service()
    ids = await asyncio.to_thread(service.encode, text, body.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": service.context_length})


@router.post("/detokenize", openapi_extra=openapi_request_body(struct_schema(DetokenizeBody)))
@router.post("/v1/detokenize", openapi_extra=openapi_request_body(struct_schema(DetokenizeBody)))
async def detokenize(request: Request) -> Response:
    """``{"prompt": text}`` for ``tokens`` (ids checked against the vocabulary)."""
    state = _state(request)
    body = await read_json(request, DetokenizeBody, state.config.max_request_bytes)
    service = state.require_service()
    for i, tok in enumerate(body.tokens):
        if not 0 <= tok < service.vocab_size:
            raise bad_request(f"tokens[{i}] = {tok} is outside the vocabulary [0, {service.vocab_size})", "tokens")
    text = await asyncio.to_thread(service.tokenizer.decode, body.tokens, body.skip_special_tokens)
    return JSONResponse({"prompt": text})


@router.get("/version")
async def version() -> Response:
    return JSONResponse({"version": __version__})


@router.get("/get_load")
async def get_load(request: Request) -> Response:
    return JSONResponse(_state(request).controller.loads())


KV_EVENTS_QUERY = {"parameters": [
    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}},
    {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}},
]}


@router.get("/kv_events", openapi_extra=KV_EVENTS_QUERY)
async def kv_events(request: Request) -> Response:
    """Prefix-cache events of every rank after ``after`` (long poll up to ``timeout`` s; see
    :mod:`pdserve.server.kv_event_feed`)."""
    feed = _state(request).controller.kv_events
    after = _query_number(request, "after", 0, int, 0, 2**63 - 1)
    timeout = _query_number(request, "timeout", 0.0, float, 0.0, MAX_WAIT_S)
    batches, lost = await feed.poll(after, timeout)
    body = {"last_seq": feed.last_seq, "lost": lost, "batches": msgspec.to_builtins(batches)}
    return JSONResponse(body)


def _query_number(request: Request, name: str, default, kind, low, high):
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise bad_request(f"{name} must be a number in [{low}, {high}], got {raw[:40]!r}", name) from None
    if not low <= value <= high:  # NaN fails too
        raise bad_request(f"{name} must be in [{low}, {high}], got {raw[:40]!r}", name)
    return value


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    state = _state(request)
    state.require_service()
    refusal = await state.controller.flush_cache()
    if refusal is None:
        return PlainTextResponse("Cache flushed.\n")
    return PlainTextResponse(f"Cache not flushed: {refusal}.\n", status_code=400)


class AbortBody(msgspec.Struct, kw_only=True):
    rid: str | None = None
    abort_all: bool = False


@router.post("/abort_request", openapi_extra=openapi_request_body(struct_schema(AbortBody)))
async def abort_request(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, AbortBody, state.config.max_request_bytes)
    controller = state.controller
    if body.abort_all:
        return JSONResponse({"aborted": controller.abort_all()})
    if body.rid is None:
        raise bad_request("rid is required (or abort_all: true)", "rid")
    # the request with this rid, else the items of the batch request with this rid; the rid is free at once
    # (a router's retry reuses the client's): the worker finishes the aborted internal ids on its own
    aborted = controller.abort(body.rid)
    return JSONResponse({"aborted": int(bool(aborted))})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = _state(request).metrics
    return Response(m.render(), media_type=m.content_type)

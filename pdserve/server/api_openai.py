"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Request bodies are msgspec Structs (``pdserve/request_bodies.py``); which keys are accepted is decided by ``fields.py``; errors
use OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Streaming sends one chunk per
engine output and, when asked through ``stream_options.include_usage``, a final chunk with
empty ``choices`` and the usage (with vLLM's ``continuous_usage_stats`` also the usage so far on
every chunk); without ``stream_options`` the usage rides on the last chunk.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, suppress
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.request import RequestError, SamplingParams, TokenLogprobs
from pdserve.engine.validation import MAX_TOP_LOGPROBS
from pdserve.request_bodies import ChatBody, CommonBody, CompletionBody, openapi_request_body, request_schema
from pdserve.server import kv_transfer
from pdserve.server.access import log_access, rank_headers, sample_meta, served_ranks
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
    GenerationService,
    GenRequest,
    close_all,
    first_outputs,
    interleave,
    run_to_end,
)
from pdserve.server.state import ServerState
from pdserve.server.structured import Constraint, openai_constraint
from pdserve.server.tool_parsers import PARSERS, ToolCall, ToolParser, ToolPlan, parse_forced, plan_tools

MAX_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI's logprobs / top_logprobs: the engine's one limit

router = APIRouter(prefix="/v1")


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_names():
        raise ServerError(
            404,
            f"the model {model!r} does not exist; this server serves {state.served_model_name!r}",
            "model",
            "model_not_found",
        )


def _sampling(
    body: CommonBody, max_tokens: int | None, max_tokens_field: str, constraint: Constraint | None = None
) -> tuple[SamplingParams, bool]:
    """SamplingParams from the OpenAI fields (and the structured-output constraint), and whether
    the client chose the token budget."""
    if max_tokens is not None and max_tokens < 0:
        raise bad_request(f"{max_tokens_field} must be >= 0, got {max_tokens}", max_tokens_field)
    if body.min_tokens is not None and body.min_tokens < 0:
        raise bad_request(f"min_tokens must be >= 0, got {body.min_tokens}", "min_tokens")
    raw = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "no_stop_trim": body.no_stop_trim,
        "n": body.n,
    }
    if constraint is not None:
        raw[constraint.kind] = constraint.text
    try:
        params = SamplingParams.from_dict(raw)
    except RequestError as e:
        text = str(e)
        param = next((k for k in raw if text.startswith(k)), None)
        raise bad_request(text.replace("max_new_tokens", max_tokens_field), param) from None
    return params, max_tokens is not None


def _requests(
    state: ServerState,
    request: Request,
    body: CommonBody,
    prompts: list[list[int]],
    params: SamplingParams,
    given: bool,
    prefix: str,
    prompt_field: str,
    max_tokens_field: str,
    top_logprobs: int | None,
    constraint: Constraint | None = None,
) -> list[GenRequest]:
    prompts = [_truncated(body, ids, state.require_service().context_length, params.max_new_tokens if given else 0)
               for ids in prompts]
    n = len(prompts)
    batch = n > 1
    rank = pinned_rank(request, body, state.config.dp_size)
    rids = per_item(body.rid, n, "rid", batch)
    if batch and isinstance(body.rid, str):
        rids = [f"{body.rid}-{i}" for i in range(n)]
    hosts = per_item(body.bootstrap_host, n, "bootstrap_host", batch)
    ports = per_item(body.bootstrap_port, n, "bootstrap_port", batch)
    rooms = [check_room(r) for r in per_item(body.bootstrap_room, n, "bootstrap_room", batch)]
    prefill_rank = body.disagg_prefill_dp_rank if body.disagg_prefill_dp_rank is not None else (
        body.prefill_data_parallel_rank
    )
    # ---- vLLM's P/D protocol: kv_transfer_params names the room (and for decode where its KV is)
    leg = _kv_transfer_leg(state, body, prompts)
    instance = None
    if isinstance(leg, kv_transfer.PrefillLeg):
        rooms = [leg.room]
    elif isinstance(leg, kv_transfer.DecodeLeg):
        hosts, ports, rooms, prefill_rank, instance = [leg.host], [leg.port], [leg.room], leg.prefill_rank, leg.instance
    # ---- end of vLLM's P/D protocol
    base = f"{prefix}-{uuid.uuid4().hex}"
    return [
        GenRequest(
            rid=rids[i] if rids[i] is not None else (base if n == 1 else f"{base}-{i}"),
            input_ids=ids,
            params=_copy_params(params),
            max_new_tokens_given=given,
            return_logprob=top_logprobs is not None,
            top_logprobs_num=top_logprobs or 0,
            dp_rank=rank,
            bootstrap_host=hosts[i],
            bootstrap_port=ports[i],
            bootstrap_room=rooms[i],
            prefill_dp_rank=prefill_rank,
            detach_room=isinstance(leg, kv_transfer.PrefillLeg),
            prefill_instance=instance,
            prefill_room_known=isinstance(leg, kv_transfer.DecodeLeg) and leg.room_known,
            kv_transfer_leg=leg,
            prompt_field=prompt_field,
            max_tokens_field=max_tokens_field,
            grammar_field=constraint.field if constraint is not None else None,
        )
        for i, ids in enumerate(prompts)
    ]


def _truncated(body: CommonBody, ids: list[int], context_length: int, max_output_tokens: int) -> list[int]:
    """The prompt as vLLM's ``truncate_prompt_tokens`` cuts it: the last k tokens (``truncation_side``
    "right": the first k); -1 keeps as many as fit the context with the output budget. A k above that
    budget, 0 or below -1 is a 400 naming the field (as vLLM refuses it), never a silent cut."""
    side = body.truncation_side
    if side not in (None, "left", "right"):
        raise bad_request(f"truncation_side must be 'left' or 'right', got {str(side)[:40]!r}", "truncation_side")
    k = body.truncate_prompt_tokens
    if k is None:
        return ids
    budget = max(0, context_length - (max_output_tokens or 0))
    if k == -1:
        k = budget
    elif k < 1:
        raise bad_request(f"truncate_prompt_tokens must be -1 or >= 1, got {k}", "truncate_prompt_tokens")
    elif k > budget:
        raise bad_request(
            f"truncate_prompt_tokens {k} exceeds the prompt budget of {budget} tokens (context length "
            f"{context_length} minus {max_output_tokens} output tokens)", "truncate_prompt_tokens",
        )
    if len(ids) <= k:
        return ids
    return ids[:k] if side == "right" else ids[len(ids) - k:]

def _kv_transfer_leg(state: ServerState, body: CommonBody, prompts: list[list[int]]) -> Any:
    """The vLLM P/D leg ``body.kv_transfer_params`` asks for (None without it); 400 naming the field when
    it cannot be served here or collides with SGLang's room fields."""
    if body.kv_transfer_params is None:
        return None
    disagg = state.config.disagg
    leg = kv_transfer.parse(body.kv_transfer_params, disagg.mode, disagg.bootstrap_allowed,
                            state.controller.info.page_size, len(prompts[0]) if prompts else 0)
    if leg is None:
        return None
    for name in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        if getattr(body, name) is not None:
            raise bad_request(f"{name} and {kv_transfer.FIELD} both name the KV's room: send one", name)
    if len(prompts) != 1:
        raise bad_request(f"{kv_transfer.FIELD} names one room: send one prompt, not {len(prompts)}",
                          kv_transfer.FIELD)
    if isinstance(leg, kv_transfer.DecodeLeg):
        for name in ("disagg_prefill_dp_rank", "prefill_data_parallel_rank"):
            value = getattr(body, name)
            if value is not None and value != leg.prefill_rank:
                raise bad_request(f"{name} {value} disagrees with {kv_transfer.FIELD}.remote_engine_id (prefill DP "
                                  f"rank {leg.prefill_rank})", name)
    if isinstance(leg, kv_transfer.PrefillLeg) and body.stream:
        raise bad_request(f"{kv_transfer.FIELD}.do_remote_decode needs stream: false (the answer carries the "
                          "params decode needs)", "stream")
    return leg


def _kv_transfer_answer(state: ServerState, request: Request, gens: list[Generation]) -> dict[str, Any]:
    """``{"kv_transfer_params": ...}`` for a vLLM P/D prefill answer (empty for any other)."""
    gen = gens[0]
    leg = gen.req.kv_transfer_leg
    bootstrap = state.controller.bootstrap
    if not isinstance(leg, kv_transfer.PrefillLeg) or bootstrap is None or gen.finish_reason is None:
        return {}
    host = request.url.hostname or state.config.host
    return {kv_transfer.FIELD: kv_transfer.prefill_answer(leg, bootstrap.instance_id, gen.dp_rank, host,
                                                          bootstrap.port, gen.rid)}


def _copy_params(params: SamplingParams) -> SamplingParams:
    """Each prompt gets its own params (the front may shrink a default max_new_tokens per prompt)."""
    return replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))


def _finish(gen: Generation) -> str | None:
    reason = gen.finish_reason
    return None if reason is None else reason.get("type")


def _matched(gen: Generation) -> Any:
    return None if gen.finish_reason is None else gen.finish_reason.get("matched")


def _usage(gens: list[Generation]) -> dict[str, Any]:
    """OpenAI usage. ``cached_tokens``: per prompt, the leading tokens whose KV came from a prefix
    cache; on a P/D decode server that is the larger of prefill's reuse (not computed) and decode's
    own (not transferred), each also given as ``prefill_cached_tokens`` / ``decode_cached_tokens``."""
    firsts = [g for g in gens if g.is_first_sample]
    prompt = sum(g.prompt_tokens for g in firsts)
    completion = sum(g.completion_tokens for g in gens)
    details: dict[str, int] = {"cached_tokens": sum(g.cached_tokens for g in firsts)}
    decode_cached = [_decode_cached_tokens(g) for g in firsts]
    if any(d is not None for d in decode_cached):
        details = {
            "cached_tokens": sum(max(g.cached_tokens, d or 0) for g, d in zip(firsts, decode_cached)),
            "prefill_cached_tokens": details["cached_tokens"],
            "decode_cached_tokens": sum(d or 0 for d in decode_cached),
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def _decode_cached_tokens(gen: Generation) -> int | None:
    """Leading prompt tokens a P/D decode rank reused from its own cache (None off decode)."""
    meta = gen.handle.disagg_meta
    return None if meta is None else meta.decode_cached_tokens


def _usage_mode(body: CommonBody) -> str:
    """'separate' (OpenAI include_usage), 'continuous' (vLLM's include_usage with continuous_usage_stats:
    the usage so far on every chunk too), 'last' (no stream_options: on the final chunk) or 'none'."""
    options = body.stream_options
    if options is None:
        return "last"
    if not options.include_usage:
        return "none"  # vLLM: continuous_usage_stats alone adds nothing
    return "continuous" if options.continuous_usage_stats else "separate"


def _chunk_usage(usage_mode: str, gens: Sequence[Generation]) -> dict[str, Any] | None:
    """The usage a streamed chunk carries, if any."""
    if usage_mode == "continuous" or (usage_mode == "last" and all(g.finished for g in gens)):
        return _usage(list(gens))
    return None


# ---------------------------------------------------------------------- logprob formatting


def _completion_logprobs(gen: Generation, start: int, end: int, text_offset: int) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` for output tokens [start, end)."""
    service = gen.service
    out = gen.output_logprobs or TokenLogprobs()
    ids = out.ids[start:end]
    tokens = [service.token_text(t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(text_offset)
        text_offset += len(tok)
    top = None
    if gen.req.top_logprobs_num > 0:
        top = [
            {service.token_text(t): v for t, v in row} for row in (out.top or [])[start:end]
        ]
    return {"tokens": tokens, "token_logprobs": out.values[start:end], "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(gen: Generation, start: int, end: int) -> dict[str, Any]:
    service = gen.service
    out = gen.output_logprobs or TokenLogprobs()
    top = out.top or []
    content = []
    for i in range(start, min(end, len(out.ids))):
        text = service.token_text(out.ids[i])
        row = top[i] if i < len(top) else None
        content.append(
            {
                "token": text,
                "logprob": out.values[i],
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": service.token_text(t), "logprob": v, "bytes": list(service.token_text(t).encode())}
                    for t, v in (row or [])
                ],
            }
        )
    return {"content": content, "refusal": None}


# ---------------------------------------------------------------------- /v1/completions


def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    service = state.require_service()
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str) and prompt:
        return [service.encode(prompt)]
    if isinstance(prompt, list) and len(prompt) > MAX_BATCH and not all(isinstance(t, int) for t in prompt):
        raise bad_request(f"a batch may hold at most {MAX_BATCH} prompts, got {len(prompt)}", "prompt")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) and p for p in prompt):
            return [service.encode(p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise bad_request(
        "prompt must be a non-empty string, list of strings, list of token ids or list of token-id lists", "prompt"
    )


@router.post("/completions", openapi_extra=openapi_request_body(request_schema("completions")))
async def completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, CompletionBody, state.config.max_request_bytes)
    check_fields("completions", request.state.json_body)
    request.state.no_logs = bool(body.no_logs)
    state.require_service()
    _check_model(state, body.model)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.best_of not in (None, 1, body.n or 1):
        raise bad_request(f"best_of must be 1 or equal to n, got {body.best_of}", "best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {body.logprobs}", "logprobs")
    constraint = openai_constraint(body)
    params, given = _sampling(body, body.max_tokens, "max_tokens", constraint)
    prompts = await state.require_service().offload(_completion_prompts, state, body.prompt)
    reqs = _requests(state, request, body, prompts, params, given, "cmpl", "prompt", "max_tokens", body.logprobs,
                     constraint)
    await state.require_service().check_grammars(reqs)
    gens = state.require_service().start_all(reqs)
    cid = reqs[0].rid if len(reqs) == 1 else f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = body.model or state.served_model_name
    want_logprobs = body.logprobs is not None

    if not body.stream:
        try:
            await unless_disconnected(request, run_to_end(gens))
        finally:
            close_all(gens)
        choices = [
            {
                "index": i,
                "text": g.text,
                "logprobs": _completion_logprobs(g, 0, g.num_output_logprobs, 0) if want_logprobs else None,
                "finish_reason": _finish(g),
                "matched_stop": _matched(g),
                "meta_info": sample_meta(g, state.config.disaggregation_mode),
            }
            for i, g in enumerate(gens)
        ]
        log_access(request, gens, state.config.disaggregation_mode)
        return JSONResponse(
            {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
             "usage": _usage(gens), **served_ranks(gens[0], state.config.disaggregation_mode),
             **_kv_transfer_answer(state, request, gens)},
            headers=rank_headers(gens, state.config.disaggregation_mode),
        )

    try:
        firsts = await unless_disconnected(request, first_outputs(gens))
    except BaseException:
        close_all(gens)
        raise
    usage_mode = _usage_mode(body)
    sent_tokens = [0] * len(gens)
    sent_chars = [0] * len(gens)

    def chunk(i: int, delta: str) -> bytes | None:
        gen = gens[i]
        logprobs = None
        if want_logprobs:
            end = gen.num_output_logprobs
            logprobs = _completion_logprobs(gen, sent_tokens[i], end, sent_chars[i])
            sent_tokens[i] = end
        sent_chars[i] += len(delta)
        if not delta and not gen.finished and not (logprobs and logprobs["tokens"]):
            return None
        data: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": delta, "logprobs": logprobs, "finish_reason": _finish(gen),
                         "matched_stop": _matched(gen)}],
        }
        if gen.finished:
            data["choices"][0]["meta_info"] = sample_meta(gen, state.config.disaggregation_mode)
        usage = _chunk_usage(usage_mode, gens)
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    head = {"id": cid, "object": "text_completion", "created": created, "model": model}
    return _sse(request, state, gens, _stream_chunks(gens, firsts, chunk, head, usage_mode))


async def _stream_chunks(
    gens: Sequence[Generation],
    firsts: list[str],
    chunk: Callable[[int, str], bytes | None],
    head: dict[str, Any],
    usage_mode: str,
) -> AsyncIterator[bytes]:
    """SSE body shared by completions and chat: each generation's first text, then every further
    delta as it arrives, an error chunk if one fails, the separate usage chunk, and ``[DONE]``."""
    try:
        for i, delta in enumerate(firsts):
            out = chunk(i, delta)
            if out is not None:
                yield out
        async with aclosing(interleave(gens)) as updates:
            async for i, delta in updates:
                out = chunk(i, delta)
                if out is not None:
                    yield out
    except ServerError as e:
        yield sse(e.openai_body())
    else:
        if usage_mode in ("separate", "continuous"):
            yield sse({**head, "choices": [], "usage": _usage(list(gens))})
    yield SSE_DONE


# ---------------------------------------------------------------------- /v1/chat/completions


def _chat_messages(raw: list[Any] | None) -> list[dict[str, Any]]:
    """Validate messages and flatten text parts into plain strings for the chat template."""
    if raw is None:
        raise bad_request("messages is required", "messages")
    if not raw:
        raise bad_request("messages must contain at least one message", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a non-empty string", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        item = {**m, "role": role, "content": content}
        if isinstance(m.get("tool_calls"), list):
            item["tool_calls"] = [_call_for_template(c) for c in m["tool_calls"]]
        out.append(item)
    return out


TEMPLATE_FIELD = "chat_template_kwargs.chat_template"


async def _chat_prompt_ids(state: ServerState, messages: list[dict[str, Any]], body: ChatBody) -> list[int]:
    """The chat template applied to ``messages``, tokenized, off the event loop. A template the
    request supplies itself is code: refused (400 naming the field and the flag) unless the server
    runs with ``--trust-request-chat-template``, then rendered in a child process of its own within
    a deadline and an output cap (``server/request_code.py``)."""
    from pdserve.models.tokenizer import is_inline_template

    service = state.require_service()
    kwargs = dict(body.chat_template_kwargs or {})
    template = kwargs.pop("chat_template", None)
    if not is_inline_template(template, getattr(service.tokenizer, "chat_templates", {})):
        return await service.offload(_render_and_encode, service, messages, body)
    if not state.config.trust_request_chat_template:
        raise bad_request(f"{TEMPLATE_FIELD}: this server does not run chat templates supplied by a request "
                          "(start it with --trust-request-chat-template to allow them)", TEMPLATE_FIELD)
    prompt = await _render_request_template(service, template, messages, body, kwargs)
    return await service.offload(service.encode, prompt, False, "messages")


async def _render_request_template(service: GenerationService, template: str, messages: list[dict[str, Any]],
                                   body: ChatBody, kwargs: dict[str, Any]) -> str:
    from pdserve.models.tokenizer import TemplateLimitError, render_request_template
    from pdserve.server.request_code import RequestCodeTimeout

    deadline_s, max_chars = service.request_template_limits
    try:
        variables = service.tokenizer.chat_template_variables(messages, True, body.tools or None, **kwargs)
        return await service.request_code.run(deadline_s, render_request_template, template, variables,
                                              deadline_s, max_chars)
    except (TemplateLimitError, RequestCodeTimeout) as e:
        raise bad_request(f"{TEMPLATE_FIELD}: {e}", TEMPLATE_FIELD) from None
    except Exception as e:
        raise bad_request(f"cannot apply the chat template to messages: {e}", "messages") from None


def _render_and_encode(service: GenerationService, messages: list[dict[str, Any]], body: ChatBody) -> list[int]:
    try:
        prompt = service.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=body.tools or None, **(body.chat_template_kwargs or {})
        )
    except Exception as e:
        raise bad_request(f"cannot apply the chat template to messages: {e}", "messages") from None
    return service.encode(prompt, add_special_tokens=False, field="messages")


def _call_for_template(call: Any) -> Any:
    """An assistant message's tool call with its JSON ``arguments`` text as an object, which is what
    chat templates (written for transformers) render."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        with suppress(ValueError):
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


@router.post("/chat/completions", openapi_extra=openapi_request_body(request_schema("chat")))
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, ChatBody, state.config.max_request_bytes)
    check_fields("chat", request.state.json_body)
    request.state.no_logs = bool(body.no_logs)
    service = state.require_service()
    _check_model(state, body.model)
    messages = _chat_messages(body.messages)
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs")
        if not body.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, state.config.tool_call_parser)
    await service.check_tool_schemas(plan.schemas)  # compiled in the grammar child, off the event loop
    constraint = openai_constraint(body)
    if plan.schema is not None:
        if constraint is not None:
            raise bad_request(f"{constraint.field} cannot be combined with tool_choice {plan.mode!r}", constraint.field)
        constraint = Constraint("tool_choice", "json_schema", plan.schema)
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params, given = _sampling(body, max_tokens, max_field, constraint)
    ids = await _chat_prompt_ids(state, messages, body)
    top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = _requests(state, request, body, [ids], params, given, "chatcmpl", "messages", max_field, top,
                     constraint)
    await service.check_grammars(reqs)
    gens = service.start_all(reqs)
    cid = gens[0].rid
    created = int(time.time())
    model = body.model or state.served_model_name
    parser_cls = PARSERS.get(state.config.tool_call_parser or "")

    if not body.stream:
        try:
            await unless_disconnected(request, run_to_end(gens))
        finally:
            close_all(gens)
        choices = []
        for i, gen in enumerate(gens):
            content: str | None = gen.text
            calls: list[ToolCall] = []
            if plan.mode in ("required", "named"):
                calls = parse_forced(plan, gen.text)
                content = None if calls else gen.text
            elif plan.mode == "auto" and parser_cls is not None:
                content, calls = parser_cls().parse(gen.text)
                content = content or None if calls else content
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": content,
                            "tool_calls": [c.openai() for c in calls] or None},
                "logprobs": _chat_logprobs(gen, 0, gen.num_output_logprobs) if body.logprobs else None,
                "finish_reason": _chat_finish(gen, calls),
                "matched_stop": _matched(gen),
                "meta_info": sample_meta(gen, state.config.disaggregation_mode),
            })
        log_access(request, gens, state.config.disaggregation_mode)
        return JSONResponse(
            {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
             "usage": _usage(gens), **served_ranks(gens[0], state.config.disaggregation_mode),
             **_kv_transfer_answer(state, request, gens)},
            headers=rank_headers(gens, state.config.disaggregation_mode),
        )

    try:
        firsts = await unless_disconnected(request, first_outputs(gens))
    except BaseException:
        close_all(gens)
        raise
    usage_mode = _usage_mode(body)
    streams = [_ChatStream(gen, plan, parser_cls) for gen in gens]

    def chunk(i: int, delta: str) -> bytes | None:
        gen = gens[i]
        part = streams[i]
        logprobs = None
        if body.logprobs:
            end = gen.num_output_logprobs
            logprobs = _chat_logprobs(gen, part.sent_tokens, end)
            part.sent_tokens = end
        message = part.delta(delta)
        if not message and not gen.finished and not (logprobs and logprobs["content"]):
            return None
        data: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": message, "logprobs": logprobs,
                         "finish_reason": _chat_finish(gen, part.calls) if gen.finished else None,
                         "matched_stop": _matched(gen)}],
        }
        if gen.finished:
            data["choices"][0]["meta_info"] = sample_meta(gen, state.config.disaggregation_mode)
        usage = _chunk_usage(usage_mode, gens)
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    return _sse(request, state, gens, _stream_chunks(gens, firsts, chunk, head, usage_mode))


def _sse(request: Request, state: ServerState, gens: list[Generation], body: AsyncIterator[bytes]) -> SSEResponse:
    """The streamed answer with the rank headers; on close: abort what runs, then the access log."""
    mode = state.config.disaggregation_mode

    def on_close() -> None:
        close_all(gens)
        log_access(request, gens, mode)

    response = SSEResponse(body, on_close)
    response.headers.update(rank_headers(gens, mode))
    return response


def _chat_finish(gen: Generation, calls: list[ToolCall]) -> str | None:
    reason = _finish(gen)
    return "tool_calls" if calls and reason == "stop" else reason


class _ChatStream:
    """The per-choice state of a streamed chat answer: role sent, tool calls found so far."""

    def __init__(self, gen: Generation, plan: ToolPlan, parser_cls: type[ToolParser] | None) -> None:
        self.gen = gen
        self.plan = plan
        self.parser = parser_cls() if plan.mode == "auto" and parser_cls is not None else None
        self.role_sent = False
        self.sent_tokens = 0
        self.calls: list[ToolCall] = []

    def delta(self, text: str) -> dict[str, Any]:
        """The ``delta`` of the next chunk: role first, then content or tool-call deltas."""
        message: dict[str, Any] = {}
        if not self.role_sent:
            message["role"] = "assistant"
            self.role_sent = True
        new_calls: list[ToolCall] = []
        if self.plan.mode in ("required", "named"):
            text = ""
            if self.gen.finished:
                new_calls = parse_forced(self.plan, self.gen.text)
                if not new_calls:
                    text = self.gen.text  # cut short: the partial output as content
        elif self.parser is not None:
            text, new_calls = self.parser.feed(self.gen.text, self.gen.finished)
        if text or "role" in message:
            message["content"] = text
        if new_calls:
            first = len(self.calls)
            self.calls.extend(new_calls)
            message["tool_calls"] = [c.openai(first + k) for k, c in enumerate(new_calls)]
        return message


# ---------------------------------------------------------------------- /v1/models


@router.get("/models")
async def models(request: Request) -> Response:
    state = _state(request)
    info = state.require_info()
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": state.served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "sglang",
                    "root": info.model_path,
                    "max_model_len": info.context_length,
                }
            ],
        }
    )

"""The JSON bodies of ``/generate``, ``/v1/completions`` and ``/v1/chat/completions``, defined once.

Their typed msgspec Structs (the server decodes into them, so type errors name the field), the
allow-list of every other top-level key (*honoured*, or accepted only at a value that means "off";
``server/fields.py`` enforces it with HTTP 400 ``unsupported field: <name>``; the README's API table
lists these sets), and the OpenAPI request schemas generated from both. Torch-free: the router
publishes the same schemas for the bodies it forwards.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import msgspec

# What the route handlers accept beyond the decoded type (they check it and answer 400 naming the
# field), stated for the published schemas: :func:`_documents` only documents, it does not validate.
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_TOKEN_ID_BATCH = {"type": "array", "minItems": 1, "items": _TOKEN_IDS}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CHAT_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {"role": {"type": "string", "minLength": 1},
                   "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}},
}


def _documents(schema: dict[str, Any]) -> msgspec.Meta:
    """Annotation adding ``schema`` to a field's published JSON schema (msgspec does not check it)."""
    return msgspec.Meta(extra_json_schema=schema)


Text = Annotated[str, _documents({"minLength": 1})]
TokenIds = Annotated[list[Any], _documents({"anyOf": [_TOKEN_IDS, _TOKEN_ID_BATCH]})]
Prompts = Annotated[list[Any], _documents(
    {"anyOf": [{"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}, _TOKEN_IDS,
               _TOKEN_ID_BATCH]})]
ChatMessages = Annotated[list[Any], _documents({"minItems": 1, "items": _CHAT_MESSAGE})]

_RANKS_AND_ROOMS = frozenset(
    {
        "rid",
        "data_parallel_rank",
        "routed_dp_rank",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "prefill_data_parallel_rank",
        "disagg_prefill_dp_rank",
    }
)

# No-op flags: accepted with any boolean (they only steer logging or metrics, which pdserve
# always does the same way), so a client's choice never changes the answer it expects.
_LOGGING_FLAGS = frozenset({"log_metrics", "no_logs"})

_STRUCTURED = frozenset(
    {"response_format", "regex", "ebnf", "json_schema", "guided_json", "guided_regex", "guided_choice",
     "guided_grammar", "structured_outputs"}
)

_OPENAI_SAMPLING = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stream_options",
        "stream_options.include_usage", "stream_options.continuous_usage_stats",
        "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "min_tokens", "ignore_eos", "skip_special_tokens", "no_stop_trim", "user",
    }
)

# ---- vLLM's P/D protocol (server/kv_transfer.py): honoured on both OpenAI routes
_VLLM_PD = frozenset({"kv_transfer_params"})
# ---- end of vLLM's P/D protocol

_NULL: tuple[Any, ...] = (None,)
_FALSE: tuple[Any, ...] = (None, False)
_EMPTY_LIST: tuple[Any, ...] = (None, [])
_EMPTY_MAP: tuple[Any, ...] = (None, {})
_ANY_BOOL: tuple[Any, ...] = (None, True, False)  # a true no-op in pdserve, whichever value


class FieldTable(msgspec.Struct, frozen=True):
    """One route's whole request surface, as read from ``sources``: the keys pdserve honours, and every
    other key with the values that mean "off" (its default, null, an empty list): accepted, since
    they ask for nothing. Any other value, or a key in neither set, is a 400 naming it. Dotted
    names (``stream_options.include_usage``) are keys of a nested object."""

    sources: tuple[str, ...]
    honoured: frozenset[str]
    off: dict[str, tuple[Any, ...]]


_SGLANG = "sgl-project/sglang 0.5.23 (PyPI wheel)"
_VLLM = "vllm-project/vllm main, Dec 2026"

# SGLang's OpenAI extensions that both OpenAI routes accept (sglang/srt/entrypoints/openai/protocol.py)
# and vLLM's sampling and extra parameters (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py)
# that pdserve does not implement.
_OPENAI_OFF: dict[str, tuple[Any, ...]] = {
    # SGLang
    "return_hidden_states": _FALSE,
    "return_routed_experts": _FALSE,
    "routed_experts_start_len": (None, 0),
    "return_cached_tokens_details": _FALSE,
    "return_spec_tokens_details": _FALSE,
    "stop_regex": _EMPTY_LIST,
    "lora_path": _NULL,
    "session_id": _NULL,
    "session_params": _NULL,
    "custom_params": _NULL,
    "custom_logit_processor": _NULL,
    "watermark": _NULL,
    "images_config": _NULL,
    "mm_processor_kwargs": _NULL,
    "extra_key": (None, ""),
    "cache_salt": _NULL,
    "priority": (None, 0),
    "custom_labels": _EMPTY_MAP,
    "logit_bias": _EMPTY_MAP,
    # vLLM
    "use_beam_search": _FALSE,
    "watermarking": _FALSE,
    "length_penalty": (None, 1.0),  # beam search only
    "include_stop_str_in_output": _FALSE,
    "spaces_between_special_tokens": (None, True),
    "allowed_token_ids": _NULL,
    "prompt_logprobs": _NULL,
    "logprob_token_ids": _NULL,
    "bad_words": _EMPTY_LIST,
    "request_id": _NULL,
    "return_tokens_as_token_ids": _FALSE,
    "return_token_ids": _FALSE,
    "routed_experts_prompt_start": (None, 0),
    # vLLM ignores these two on its generation routes (render routes only), whichever value
    "return_token_offsets": _ANY_BOOL,
    "return_mm_kwargs": _ANY_BOOL,
    "ec_transfer_params": _NULL,
    "vllm_xargs": _EMPTY_MAP,
    "repetition_detection": _NULL,
    "thinking_token_budget": (None, -1),  # -1: unlimited, vLLM's "unset"
    "stream_interval": (None, 1),  # pdserve streams every token
}

GENERATE = FieldTable(
    sources=(f"{_SGLANG}: sglang/srt/managers/io_struct.py GenerateReqInput",),
    honoured=frozenset(
        {"text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len",
         "top_logprobs_num", "return_text_in_logprobs", "model"}
    )
    | _RANKS_AND_ROOMS
    | _LOGGING_FLAGS,
    off={
        "session_id": _NULL,
        "input_embeds": _NULL,
        "image_data": _EMPTY_LIST,
        "video_data": _EMPTY_LIST,
        "audio_data": _EMPTY_LIST,
        "mm_hashes": _NULL,
        "mm_content_hashes": _NULL,
        "use_audio_in_video": _FALSE,
        "video_config": _NULL,
        "watermark": _NULL,
        "token_ids_logprob": _EMPTY_LIST,
        "return_sampling_mask": _FALSE,
        "sampling_logprobs_mode": _NULL,
        "return_flat_raw_top_logprobs": _FALSE,
        "return_flat_raw_output_top_logprobs": _FALSE,
        "return_flat_raw_top_logprobs_b64": _FALSE,
        "return_hidden_states": _FALSE,
        "return_routed_experts": _FALSE,
        "routed_experts_start_len": (None, 0),
        "return_indexer_topk": _FALSE,
        "modalities": _EMPTY_LIST,
        "session_params": _NULL,
        "lora_path": _NULL,
        "lora_id": _NULL,
        "custom_logit_processor": _NULL,
        "positional_embed_overrides": _NULL,
        "bootstrap_pair_key": _NULL,
        "decode_tp_size": _NULL,
        "kv_router_hint": _NULL,
        "routing_key": _NULL,
        "conversation_id": _NULL,
        "http_worker_ipc": _NULL,
        "background": _FALSE,
        "require_reasoning": _FALSE,
        "max_thinking_tokens": _NULL,
        "priority": (None, 0),
        "extra_key": (None, ""),
        "custom_labels": _EMPTY_MAP,
        "return_bytes": _FALSE,
        "return_entropy": _FALSE,
        "return_prompt_token_ids": _FALSE,
        "external_trace_header": _NULL,
        "received_time": _NULL,
        "need_wait_for_mm_inputs": _FALSE,
        "num_items_assigned": _NULL,
        "encoder_urls": _NULL,
        "max_dynamic_patch": _NULL,
        "min_dynamic_patch": _NULL,
        "image_max_dynamic_patch": _NULL,
        "video_max_dynamic_patch": _NULL,
        "images_config": _NULL,
        "mm_processor_kwargs": _NULL,
        "multi_item_delimiter_indices": _NULL,
        "token_indices_to_pool": _NULL,
        "cache_salt": (None, ""),
        "kv_hints": _NULL,
        "stream_options": _NULL,  # not SGLang's: some OpenAI-minded clients send it as null
    },
)

# The keys of /generate's ``sampling_params`` (engine/request.py ``SamplingParams`` honours its own fields)
SAMPLING_PARAMS = FieldTable(
    sources=(f"{_SGLANG}: sglang/srt/sampling/sampling_params.py SamplingParams (API parameters)",),
    honoured=frozenset(
        {"max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
         "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
         "spaces_between_special_tokens", "no_stop_trim", "seed", "sampling_seed", "n", "json_schema", "regex",
         "ebnf"}
    ),
    off={
        "stop_regex": _EMPTY_LIST,
        "beam_width": (None, 1),  # 1: not a beam request
        "structural_tag": _NULL,
        "stream_interval": (None, 1),  # pdserve streams every token
        "logit_bias": _EMPTY_MAP,
        "custom_params": _NULL,
        "watermark": _NULL,
    },
)

COMPLETIONS = FieldTable(
    sources=(f"{_SGLANG}: sglang/srt/entrypoints/openai/protocol.py CompletionRequest",
             f"{_VLLM}: vllm/entrypoints/openai/completion/protocol.py CompletionRequest"),
    honoured=_OPENAI_SAMPLING | _RANKS_AND_ROOMS | _STRUCTURED | _LOGGING_FLAGS | _VLLM_PD
    | frozenset({"prompt", "logprobs", "best_of"}),
    off={
        **_OPENAI_OFF,
        "echo": _FALSE,
        "suffix": (None, ""),
        "add_special_tokens": (None, True),  # pdserve encodes completion prompts with special tokens
        "prompt_embeds": _NULL,
    },
)

CHAT = FieldTable(
    sources=(f"{_SGLANG}: sglang/srt/entrypoints/openai/protocol.py ChatCompletionRequest",
             f"{_VLLM}: vllm/entrypoints/openai/chat_completion/protocol.py ChatCompletionRequest",
             "OpenAI chat completions API (functions, audio, prediction, store, ...)"),
    honoured=_OPENAI_SAMPLING | _RANKS_AND_ROOMS | _STRUCTURED | _LOGGING_FLAGS | _VLLM_PD
    | frozenset(
        {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
         "parallel_tool_calls", "chat_template_kwargs"}
    ),
    off={
        **_OPENAI_OFF,
        "continue_final_message": _FALSE,
        "echo": _FALSE,
        "add_generation_prompt": (None, True),  # pdserve always adds it
        "add_special_tokens": _FALSE,  # the chat template adds them
        "documents": _NULL,
        "chat_template": _NULL,
        "media_io_kwargs": _NULL,
        "return_prompt_text": _FALSE,
        "return_prompt_token_ids": _FALSE,
        "return_meta_info": _FALSE,
        "return_input_ids_in_sglext": _FALSE,
        "return_output_ids_in_sglext": _FALSE,
        "return_sampling_mask": _FALSE,
        "sampling_logprobs_mode": _NULL,
        "return_flat_raw_output_top_logprobs": _FALSE,
        # SGLang defaults this one to true; it only shapes flat raw logprobs, which are never returned
        "return_flat_raw_top_logprobs_b64": _ANY_BOOL,
        "thinking": _NULL,
        "max_dynamic_patch": _NULL,
        "min_dynamic_patch": _NULL,
        "use_audio_in_video": _FALSE,
        "video_config": _NULL,
        "input_ids": _NULL,
        # no reasoning parser: there is no reasoning text to separate, stream or include, either way
        "separate_reasoning": _ANY_BOOL,
        "stream_reasoning": _ANY_BOOL,
        "include_reasoning": _ANY_BOOL,
        "reasoning_effort": _NULL,
        "functions": _NULL,
        "function_call": _NULL,
        "audio": _NULL,
        "modalities": (None, ["text"]),
        "prediction": _NULL,
        "store": _FALSE,
        "metadata": _NULL,
        "service_tier": (None, "auto", "default"),
        "web_search_options": _NULL,
    },
)

# ---- issue 23a: fields SMG 1.13, vllm-router 0.1.17 and vLLM's OpenAI server send (decided one by one) ----
# SMG forwards what the client gave (its typed structs drop defaults); vllm-router re-serializes its own
# structs; vLLM (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py, Dec 2026) defines them.
# Honoured: ``truncate_prompt_tokens`` (vLLM's: keep the last k prompt tokens, -1 the most that fit with the
# output budget) and ``truncation_side`` ("left", the default, or "right": keep the first k).
_VLLM_TRUNCATION = frozenset({"truncate_prompt_tokens", "truncation_side"})
# Off only: vLLM's repetition detector (0: off) and logits processors (none).
_VLLM_23A_OFF: dict[str, tuple[Any, ...]] = {
    "logits_processors": _NULL,
    "max_repetition_pattern_size": (None, 0),
    "min_repetition_pattern_size": (None, 0),
    "repetition_min_count": (None, 0),
}
COMPLETIONS = msgspec.structs.replace(
    COMPLETIONS, honoured=COMPLETIONS.honoured | _VLLM_TRUNCATION,
    # vLLM's completions have no reasoning at all (its pydantic model ignores the key); vllm-router and
    # SMG forward it from clients that set it for both routes: with no reasoning parser it changes nothing
    off={**COMPLETIONS.off, **_VLLM_23A_OFF, "include_reasoning": _ANY_BOOL},
)
CHAT = msgspec.structs.replace(CHAT, honoured=CHAT.honoured | _VLLM_TRUNCATION, off={**CHAT.off, **_VLLM_23A_OFF})
# ---- end of issue 23a's block ----

TABLES: dict[str, FieldTable] = {"generate": GENERATE, "completions": COMPLETIONS, "chat": CHAT}
HONOURED: dict[str, frozenset[str]] = {route: table.honoured for route, table in TABLES.items()}
# field -> the values that mean "off" (accepted and, having no effect, honoured trivially)
OFF_VALUES: dict[str, dict[str, tuple[Any, ...]]] = {route: table.off for route, table in TABLES.items()}


def is_off(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of the ``allowed`` "off" values (``0`` is not ``False``, nor ``1`` ``True``)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def check_sampling_key(key: str, value: Any) -> bool:
    """Whether a ``sampling_params`` key pdserve does not honour is at an "off" value (then it asks for nothing)."""
    allowed = SAMPLING_PARAMS.off.get(key)
    return allowed is not None and is_off(value, allowed)


class PDRoutingFields(msgspec.Struct, kw_only=True):
    """What every generation body may carry to place a request: its decode rank (or the server's rank),
    and for a P/D half the bootstrap room and the prefill rank holding its KV (SGLang's names)."""

    data_parallel_rank: Any = None
    routed_dp_rank: Any = None
    bootstrap_host: str | list[str | None] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: Any = None
    prefill_data_parallel_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None


class GenerateBody(PDRoutingFields, kw_only=True):
    """The JSON body of ``POST /generate``; ``fields.py`` decides which other keys are accepted."""

    text: Text | list[Text] | None = None
    input_ids: TokenIds | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    model: str | None = None
    log_metrics: bool | None = None
    no_logs: bool = False


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CommonBody(PDRoutingFields, kw_only=True):
    """Fields shared by completions and chat (OpenAI names plus SGLang's extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the last k prompt tokens (-1: as many as fit)
    truncation_side: str | None = None  # vLLM's: "left" (default) drops the first tokens, "right" the last
    rid: str | list[str] | None = None
    user: str | None = None
    log_metrics: bool | None = None
    no_logs: bool | None = None
    # structured output (server/structured.py)
    response_format: Any = None
    json_schema: Any = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: Any = None
    guided_grammar: str | None = None
    structured_outputs: Any = None
    # ---- vLLM's P/D protocol (server/kv_transfer.py checks every key and value)
    kv_transfer_params: Any = None
    # ---- end of vLLM's P/D protocol


class CompletionBody(CommonBody, kw_only=True):
    prompt: Text | Prompts | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class ChatBody(CommonBody, kw_only=True):
    messages: ChatMessages | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeBody(msgspec.Struct, kw_only=True):
    """``POST /tokenize`` (vLLM's shape; SGLang's ``text`` too)."""

    prompt: str | None = None
    text: str | None = None
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeBody(msgspec.Struct, kw_only=True):
    """``POST /detokenize``."""

    tokens: list[int]
    skip_special_tokens: bool = False
    model: str | None = None


BODIES: dict[str, type[msgspec.Struct]] = {"generate": GenerateBody, "completions": CompletionBody, "chat": ChatBody}
ROUTE_PATHS = {"/generate": "generate", "/v1/completions": "completions", "/v1/chat/completions": "chat"}
PROMPT_FIELDS = {"generate": ("text", "input_ids"), "completions": ("prompt",), "chat": ("messages",)}  # one required


def struct_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """``struct``'s JSON schema with every ``$ref`` inlined (OpenAPI operations cannot carry ``$defs``) and no
    null defaults."""
    (schema,), defs = msgspec.json.schema_components([struct], ref_template="{name}")

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(copy.deepcopy(defs[node["$ref"]]))
            # a null default says nothing (and FastAPI drops it, so the published schemas would differ)
            return {key: inline(value) for key, value in node.items() if not (key == "default" and value is None)}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def request_schema(route: str, replaced: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON schema of a ``route`` body (``generate``, ``completions`` or ``chat``): the Struct's
    fields, each off-only key as an ``enum`` of its "off" values, no other key, and a prompt field
    (:data:`PROMPT_FIELDS`) that is not null. ``replaced``: fields a proxy (the router) sets itself,
    whatever the client sent (any value)."""
    struct = BODIES[route]
    schema = struct_schema(struct)
    properties = schema["properties"]
    for name, values in OFF_VALUES[route].items():
        parent, _, child = name.partition(".")
        decodable = {"enum": [v for v in values if _decodes(struct, parent, child, v)]}
        if not child:
            properties[name] = decodable
            continue
        for option in properties[parent].get("anyOf", [properties[parent]]):
            if option.get("type") == "object":
                option["properties"][child] = decodable
                option["additionalProperties"] = False
    nested = {name.partition(".")[0] for name in HONOURED[route] if "." in name}
    for parent in nested:  # a nested object of honoured keys takes no other key
        for option in properties[parent].get("anyOf", [properties[parent]]):
            if option.get("type") == "object":
                option["additionalProperties"] = False
    missing = {name for name in HONOURED[route] if "." not in name} - properties.keys()
    if missing:  # every honoured key is a typed field
        raise TypeError(f"honoured on {route} but not in {struct.__name__}: {sorted(missing)}")
    for name in replaced:
        properties[name] = {"description": "set by the router: any value sent is replaced"}
    schema["additionalProperties"] = False
    schema["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                       for name in PROMPT_FIELDS[route]]
    return schema


def _decodes(struct: type[msgspec.Struct], parent: str, child: str, value: Any) -> bool:
    """Whether ``struct`` accepts ``value`` as ``parent`` (or ``parent.child``)."""
    try:
        msgspec.convert({parent: {child: value} if child else value}, struct)
    except msgspec.ValidationError:
        return False
    return True


def openapi_request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI operation's ``requestBody`` (a required JSON object of ``schema``); for FastAPI's
    ``openapi_extra`` or a hand-built operation."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

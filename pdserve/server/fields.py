"""The request fields each route accepts: one allow-list, so nothing is silently ignored.

Every top-level key of a ``/generate``, ``/v1/completions`` or ``/v1/chat/completions`` body is
either *honoured* (listed in ``HONOURED``), or *accepted when off*: a feature pdserve does not
implement, whose value means "off" (the defaults sglang-router 0.3.2, the ``openai`` SDK and the
vLLM/SGLang benchmark clients send). Anything else, and any other value of an off-only field, is
answered with HTTP 400 ``unsupported field: <name>``. The README's API table lists these sets.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.server.errors import bad_request

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
        "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "min_tokens", "ignore_eos", "skip_special_tokens", "no_stop_trim", "user",
    }
)

HONOURED: dict[str, frozenset[str]] = {
    "generate": frozenset(
        {"text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len",
         "top_logprobs_num", "return_text_in_logprobs", "model"}
    )
    | _RANKS_AND_ROOMS
    | _LOGGING_FLAGS,
    "completions": _OPENAI_SAMPLING | _RANKS_AND_ROOMS | _STRUCTURED | _LOGGING_FLAGS
    | frozenset({"prompt", "logprobs", "best_of"}),
    "chat": _OPENAI_SAMPLING | _RANKS_AND_ROOMS | _STRUCTURED | _LOGGING_FLAGS
    | frozenset(
        {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
         "parallel_tool_calls", "chat_template_kwargs"}
    ),
}

_NULL: tuple[Any, ...] = (None,)
_FALSE: tuple[Any, ...] = (None, False)

# field -> the values that mean "off" (accepted and, having no effect, honoured trivially)
OFF_VALUES: dict[str, dict[str, tuple[Any, ...]]] = {
    "generate": {
        "return_hidden_states": _FALSE,
        "background": _FALSE,
        "return_bytes": _FALSE,
        "return_entropy": _FALSE,
        "lora_path": _NULL,
        "image_data": _NULL,
        "audio_data": _NULL,
        "video_data": _NULL,
        "custom_logit_processor": _NULL,
        "session_params": _NULL,
        "input_embeds": _NULL,
        "stream_options": _NULL,
    },
    "completions": {
        "return_hidden_states": _FALSE,
        "echo": _FALSE,
        "suffix": (None, ""),
        "logit_bias": (None, {}),
        "lora_path": _NULL,
        "stream_options.continuous_usage_stats": _FALSE,
    },
    "chat": {
        "return_hidden_states": _FALSE,
        "continue_final_message": _FALSE,
        # no reasoning parser: there is no reasoning text to separate or stream, either way
        "separate_reasoning": (None, True, False),
        "stream_reasoning": (None, True, False),
        "reasoning_effort": _NULL,
        "logit_bias": (None, {}),
        "lora_path": _NULL,
        "functions": _NULL,
        "function_call": _NULL,
        "audio": _NULL,
        "modalities": (None, ["text"]),
        "prediction": _NULL,
        "store": _FALSE,
        "metadata": _NULL,
        "service_tier": (None, "auto", "default"),
        "web_search_options": _NULL,
        "stream_options.continuous_usage_stats": _FALSE,
    },
}

_Top = dict[str, msgspec.Raw]


def check_fields(route: str, body: bytes) -> None:
    """400 ``unsupported field: NAME`` for any key of ``body`` that ``route`` neither honours nor
    accepts at its "off" value. ``body`` is the raw JSON object (values are decoded only for
    off-only fields)."""
    try:
        top = msgspec.json.decode(body, type=_Top)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # the typed decode that follows reports the malformed body
    honoured = HONOURED[route]
    off = OFF_VALUES[route]
    for key, raw in top.items():
        if key in honoured and key != "stream_options":
            continue
        if key == "stream_options":
            _check_stream_options(route, raw, off)
            continue
        allowed = off.get(key)
        if allowed is None or _decode(raw) not in allowed:
            what = "is not supported" if allowed is None else f"is only accepted with a value in {list(allowed)}"
            raise bad_request(f"unsupported field: {key} ({key} {what} on this route)", key)


def _check_stream_options(route: str, raw: msgspec.Raw, off: dict[str, tuple[Any, ...]]) -> None:
    if "stream_options" in off:  # /generate: only null
        if _decode(raw) is not None:
            raise bad_request("unsupported field: stream_options (not supported on /generate)", "stream_options")
        return
    value = _decode(raw)
    if not isinstance(value, dict):
        return  # the typed decode reports the wrong type
    for key, item in value.items():
        name = f"stream_options.{key}"
        if key == "include_usage":
            continue
        allowed = off.get(name)
        if allowed is None or item not in allowed:
            raise bad_request(f"unsupported field: {name}", name)


def _decode(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return msgspec.UNSET

"""What policies need from a request body: a prefix key and token estimates, read without
tokenizing; :mod:`pdserve.router.prompt_tokens` adds the exact token ids where it can."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

CHARS_PER_TOKEN = 4
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class RequestInfo:
    """``key``: the prompt as text or token ids (prefix affinity); token counts for load accounting;
    ``token_ids``: the text prompt as the servers will tokenize it, by the tokenizer at
    ``tokenizer_path`` (None when the router did not tokenize it)."""

    key: str | tuple[int, ...]
    prompt_tokens: int
    max_new_tokens: int
    batch_size: int | None  # None: a single prompt
    token_ids: tuple[int, ...] | None = None
    tokenizer_path: str | None = None

    def token_ids_for(self, model_path: object) -> tuple[int, ...] | None:
        """The prompt's token ids as a server loading ``model_path`` sees them, if known."""
        if isinstance(self.key, tuple):
            return self.key
        if self.token_ids is not None and model_path == self.tokenizer_path:
            return self.token_ids
        return None

    def with_tokens(self, token_ids: tuple[int, ...], tokenizer_path: str) -> RequestInfo:
        """This info with the prompt's token ids (and the exact prompt length for load accounting)."""
        prompt_tokens = self.prompt_tokens if self.batch_size is not None else max(1, len(token_ids))
        return replace(self, token_ids=token_ids, tokenizer_path=tokenizer_path, prompt_tokens=prompt_tokens)

    @property
    def decode_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


def _text_of(value: Any) -> str:
    """Text content of a chat message's ``content`` (a string or a list of parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt(path: str, body: dict[str, Any]) -> tuple[Any, bool]:
    """The prompt field and whether it holds a batch."""
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "", False
        return "".join(
            f"{m.get('role', '')}:{_text_of(m.get('content'))}\n" for m in messages if isinstance(m, dict)
        ), False
    if path == "/v1/completions":
        prompt = body.get("prompt")
    else:
        prompt = body.get("text")
        if prompt is None:
            prompt = body.get("input_ids")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt, True
    return prompt, False


def _key_and_tokens(prompt: Any) -> tuple[str | tuple[int, ...], int]:
    if isinstance(prompt, str):
        return prompt, len(prompt) // CHARS_PER_TOKEN + 1
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return tuple(prompt), max(1, len(prompt))
    return "", 1


def _max_new_tokens(path: str, body: dict[str, Any]) -> int:
    if path == "/generate":
        params = body.get("sampling_params")
        value = params.get("max_new_tokens") if isinstance(params, dict) else None
    else:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and value >= 0 else DEFAULT_MAX_NEW_TOKENS


def request_info(path: str, body: dict[str, Any]) -> RequestInfo:
    """Routing facts of a ``/generate``, ``/v1/completions`` or ``/v1/chat/completions`` body."""
    prompt, batch = _prompt(path, body)
    max_new = _max_new_tokens(path, body)
    if not batch:
        key, tokens = _key_and_tokens(prompt)
        return RequestInfo(key, tokens, max_new, None)
    parts = [_key_and_tokens(p) for p in prompt]
    return RequestInfo(parts[0][0], sum(t for _, t in parts), max_new * len(parts), len(parts))

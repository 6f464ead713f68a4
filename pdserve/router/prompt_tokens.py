"""Token ids of text prompts, for the cache-based policies: the router tokenizes as the servers do.

The tokenizer is the one at the servers' ``model_path`` (their ``/server_info``; an absolute local
folder with ``tokenizer.json``), loaded with :class:`pdserve.models.tokenizer.Tokenizer` (the HF
``tokenizers`` library and jinja2; no torch), once per path, off the event loop. Like the servers:
``text`` (``/generate``) and ``prompt`` (``/v1/completions``) are encoded with special tokens;
chat ``messages`` are rendered with the checkpoint's chat template (generation prompt on, the
body's ``tools`` and ``chat_template_kwargs`` passed) and encoded without. The chat rendering is a
close approximation of the server's: message contents are flattened the same way, but tool-call
arguments in the history are passed as sent. A prompt that cannot be tokenized (no tokenizer at
that path, a template error, a batch) keeps ``token_ids=None`` and the policies fall back to
character blocks; a wrong guess only costs affinity, never correctness.

At most :data:`MAX_TOKENIZED_CHARS` leading characters are tokenized (enough for any prefix worth
matching); the last :data:`CUT_TOKENS` tokens of a cut text are dropped, as a word cut in two can
tokenize differently. Long prompts are tokenized in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.request_info import RequestInfo

logger = logging.getLogger("pdserve.router")

MAX_TOKENIZED_CHARS = 1 << 18
CUT_TOKENS = 32
INLINE_CHARS = 4096  # shorter prompts are tokenized on the event loop (cheaper than a thread hop)


def _chat_messages(raw: Any) -> list[dict[str, Any]] | None:
    """The messages as the server renders them (contents flattened to text), or None if malformed."""
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
                return None
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            return None
        out.append({**m, "content": content})
    return out


def prompt_text(tokenizer: Tokenizer, route: str, body: dict[str, Any]) -> tuple[str, bool] | None:
    """The text the server will tokenize for this body and whether it adds special tokens; None
    when the body holds no single text prompt."""
    if route == "/v1/chat/completions":
        messages = _chat_messages(body.get("messages"))
        if messages is None:
            return None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        kwargs = body.get("chat_template_kwargs")
        kwargs = {k: v for k, v in kwargs.items() if isinstance(k, str)} if isinstance(kwargs, dict) else {}
        kwargs.pop("messages", None)
        kwargs.pop("add_generation_prompt", None)
        kwargs.pop("tools", None)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None,
                                             **kwargs), False
    prompt = body.get("prompt") if route == "/v1/completions" else body.get("text")
    return (prompt, True) if isinstance(prompt, str) else None


def encode_prefix(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> tuple[int, ...]:
    """Token ids of ``text``'s first :data:`MAX_TOKENIZED_CHARS` characters (a cut text loses its
    last :data:`CUT_TOKENS` tokens)."""
    if len(text) <= MAX_TOKENIZED_CHARS:
        return tuple(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    ids = tokenizer.encode(text[:MAX_TOKENIZED_CHARS], add_special_tokens=add_special_tokens)
    return tuple(ids[:-CUT_TOKENS])


class PromptTokenizer:
    """Tokenizers by model path, loaded on first use; :meth:`annotate` adds token ids to a request."""

    def __init__(self) -> None:
        self.tokenizers: dict[str, Tokenizer | None] = {}  # None: could not be loaded (logged once)
        self._loading: dict[str, asyncio.Task[Tokenizer | None]] = {}

    async def get(self, path: str) -> Tokenizer | None:
        if path in self.tokenizers:
            return self.tokenizers[path]
        task = self._loading.get(path)
        if task is None:
            task = self._loading[path] = asyncio.create_task(self._load(path))
        tokenizer = await asyncio.shield(task)
        self._loading.pop(path, None)
        return tokenizer

    async def _load(self, path: str) -> Tokenizer | None:
        try:
            tokenizer: Tokenizer | None = await asyncio.to_thread(Tokenizer, path)
        except Exception as e:
            logger.warning("cache-aware routing falls back to character blocks: no tokenizer at %s (%s)", path, e)
            tokenizer = None
        else:
            logger.info("cache-aware routing tokenizes prompts with the tokenizer at %s", path)
        self.tokenizers[path] = tokenizer
        return tokenizer

    async def annotate(self, route: str, body: dict[str, Any], info: RequestInfo,
                       model_path: str | None) -> RequestInfo:
        """``info`` with the prompt's token ids by the tokenizer at ``model_path``, when it can be had."""
        if model_path is None or info.batch_size is not None or isinstance(info.key, tuple):
            return info
        tokenizer = await self.get(model_path)
        if tokenizer is None:
            return info
        try:
            if len(info.key) <= INLINE_CHARS:
                ids = self._tokenize(tokenizer, route, body)
            else:
                ids = await asyncio.to_thread(self._tokenize, tokenizer, route, body)
        except Exception as e:  # a template that rejects these messages: the server will say why
            logger.debug("cannot tokenize a %s prompt for routing: %s", route, e)
            return info
        return info if ids is None else info.with_tokens(ids, model_path)

    @staticmethod
    def _tokenize(tokenizer: Tokenizer, route: str, body: dict[str, Any]) -> tuple[int, ...] | None:
        found = prompt_text(tokenizer, route, body)
        if found is None:
            return None
        text, special = found
        return encode_prefix(tokenizer, text, special)

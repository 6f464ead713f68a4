"""The one request validator: every route of the server and the offline engine check a request
against the same limits, defined here once.

:meth:`RequestLimits.check` runs :meth:`SamplingParams.validate` (each parameter finite and in its
range) and then the limits of the model and the KV pool (prompt tokens in the vocabulary and the
context, prompt plus ``max_new_tokens`` within the context and the pool, logprob fields, ``n``).
A :class:`FieldError` names the field in the client's own words (``prompt_field``,
``max_tokens_field``), so the front answers 400 naming it and the engine raises it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.request import RequestError, SamplingParams

MAX_TOP_LOGPROBS = 20  # top-k alternatives per position (top_logprobs_num, OpenAI's logprobs/top_logprobs)


class FieldError(RequestError):
    """A request value the server cannot honour; ``field`` names it as the client sent it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """What one DP rank can serve: its context, KV capacity and vocabulary; ``max_n`` (``--max-n``)
    where a server bounds parallel samples."""

    context_length: int
    max_total_tokens: int
    vocab_size: int
    max_n: int | None = None

    def check(self, input_ids: Sequence[int], params: SamplingParams, top_logprobs_num: int = 0,
              logprob_start_len: int = -1, prompt_field: str = "input_ids",
              max_tokens_field: str = "max_new_tokens", fit_max_new_tokens: bool = False) -> None:
        """Raise :class:`FieldError` for the first value that cannot be served. With
        ``fit_max_new_tokens`` (the client left ``max_new_tokens`` at its default), the default is
        first shrunk to what fits."""
        params.validate()
        n = len(input_ids)
        if n == 0:
            raise FieldError(f"{prompt_field} is empty: the prompt must have at least one token", prompt_field)
        for i, tok in enumerate(input_ids):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < self.vocab_size:
                where = f"input_ids[{i}]" if prompt_field == "input_ids" else f"{prompt_field} token {i}"
                raise FieldError(f"{where} = {tok!r} is outside the vocabulary [0, {self.vocab_size})", prompt_field)
        if n >= self.context_length:
            raise FieldError(f"the prompt has {n} tokens; the context length is {self.context_length}, so at most "
                             f"{self.context_length - 1} prompt tokens fit", prompt_field)
        if n > self.max_total_tokens:
            raise FieldError(f"the prompt has {n} tokens; the KV cache holds max_total_tokens={self.max_total_tokens}",
                             prompt_field)
        if self.max_n is not None and not 1 <= params.n <= self.max_n:
            raise FieldError(f"n must be in [1, {self.max_n}] (--max-n), got {params.n}", "n")
        limit = min(self.context_length, self.max_total_tokens)
        if fit_max_new_tokens:
            params.max_new_tokens = max(0, min(params.max_new_tokens, limit - n))
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
        if n + params.max_new_tokens > limit:
            which = "context length" if limit == self.context_length else "KV cache capacity (max_total_tokens)"
            raise FieldError(f"{max_tokens_field}={params.max_new_tokens} with a {n}-token prompt exceeds the {which} "
                             f"{limit}: {max_tokens_field} must be in [0, {limit - n}]", max_tokens_field)
        for tok in params.stop_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise FieldError(f"stop_token_ids entry {tok} is outside the vocabulary [0, {self.vocab_size})",
                                 "stop_token_ids")
        if not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise FieldError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs_num}",
                             "top_logprobs_num")
        if not -1 <= logprob_start_len < n:
            raise FieldError(f"logprob_start_len must be in [-1, {n - 1}], got {logprob_start_len}",
                             "logprob_start_len")

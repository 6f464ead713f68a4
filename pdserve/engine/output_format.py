"""SGLang-shaped output fields shared by the offline engine and the HTTP server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.engine.request import TokenLogprobs

Detok = Callable[[list[int]], str]


def logprob_triples(lp: TokenLogprobs | None, detok: Detok | None = None) -> list[list[Any]]:
    """``[[logprob, token_id, text|None], ...]`` as SGLang returns ``*_token_logprobs``."""
    if lp is None:
        return []
    return [[v, t, detok([t]) if detok else None] for v, t in zip(lp.values, lp.ids)]


def top_logprob_triples(lp: TokenLogprobs | None, detok: Detok | None = None) -> list[list[list[Any]]]:
    """Per position, the top alternatives as triples (SGLang's ``*_top_logprobs``)."""
    if lp is None or lp.top is None:
        return []
    return [[[v, t, detok([t]) if detok else None] for t, v in pos] for pos in lp.top]


def trim_stop(text: str, finish_reason: dict[str, Any] | None, no_stop_trim: bool = False) -> str:
    """Cut generated text at the stop string that ended it (unless ``no_stop_trim``)."""
    if no_stop_trim or not finish_reason or finish_reason.get("type") != "stop":
        return text
    matched = finish_reason.get("matched")
    if isinstance(matched, str):
        cut = text.find(matched)
        if cut >= 0:
            return text[:cut]
    return text


def merge_logprobs(into: TokenLogprobs | None, part: TokenLogprobs | None) -> TokenLogprobs | None:
    """Append ``part`` to ``into`` (either may be None); returns the accumulated value."""
    if part is None:
        return into
    if into is None:
        return TokenLogprobs(list(part.ids), list(part.values), list(part.top) if part.top is not None else None)
    into.ids.extend(part.ids)
    into.values.extend(part.values)
    if into.top is not None and part.top is not None:
        into.top.extend(part.top)
    return into

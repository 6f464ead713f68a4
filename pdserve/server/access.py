"""Which ranks served a request, as response headers and fields, and one access-log line per request.

Headers ``X-Prefill-DP-Rank`` / ``X-Decode-DP-Rank`` (a mixed server reports its rank as the decode
rank), the same values as SGLang-style extra fields of OpenAI responses (``prefill_dp_rank``,
``decode_dp_rank``, ``bootstrap_room``; every choice also carries its own sample's ``meta_info``:
ranks, room, KV transfer, cached tokens and timings), and a ``pdserve.access`` log line with the room, ranks,
token counts and timings once the request is done (``no_logs: true`` suppresses it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from fastapi import Request

from pdserve.http_common import DECODE_RANK_HEADER, PREFILL_RANK_HEADER
from pdserve.server.generation import Generation

logger = logging.getLogger("pdserve.access")


def served_ranks(gen: Generation, mode: str) -> dict[str, Any]:
    """``prefill_dp_rank``, ``decode_dp_rank`` and ``bootstrap_room`` of one generation (None when unknown)."""
    meta = gen.handle.disagg_meta
    prefill = meta.prefill_dp_rank if meta is not None else None
    decode = meta.decode_dp_rank if meta is not None else None
    if mode == "prefill":
        prefill = gen.dp_rank if prefill is None else prefill
    elif decode is None:
        decode = gen.dp_rank
    return {"prefill_dp_rank": prefill, "decode_dp_rank": decode, "bootstrap_room": gen.req.bootstrap_room}


def sample_meta(gen: Generation, mode: str) -> dict[str, Any]:
    """One sample's served-by fields for an OpenAI choice: ranks, room, the P/D transfer fields its
    worker reported, cached tokens and timings (each sample of ``n`` > 1 has its own)."""
    meta = served_ranks(gen, mode)
    disagg = gen.handle.disagg_meta
    if disagg is not None:
        meta.update({k: v for k, v in msgspec.structs.asdict(disagg).items() if v is not None})
    if gen.req.local_prefill:
        meta["local_prefill"] = True  # a decode server computed this prompt itself (no KV source; operator's flag)
    meta.update(cached_tokens=gen.cached_tokens, ttft=gen.ttft, e2e_latency=gen.e2e_latency)
    return meta


def rank_headers(gens: Sequence[Generation], mode: str) -> dict[str, str]:
    """Response headers naming the ranks that served the first generation."""
    if not gens:
        return {}
    ranks = served_ranks(gens[0], mode)
    headers = {}
    if ranks["prefill_dp_rank"] is not None:
        headers[PREFILL_RANK_HEADER] = str(ranks["prefill_dp_rank"])
    if ranks["decode_dp_rank"] is not None:
        headers[DECODE_RANK_HEADER] = str(ranks["decode_dp_rank"])
    return headers


def log_access(request: Request, gens: Sequence[Generation], mode: str, status: int = 200) -> None:
    """One line per request: route, status, rid, room, ranks, tokens, TTFT and latency."""
    if not gens or not logger.isEnabledFor(logging.INFO) or getattr(request.state, "no_logs", False):
        return
    first = gens[0]
    ranks = served_ranks(first, mode)
    ttft = first.ttft
    logger.info(
        "%s %s %d rid=%s room=%s prefill_rank=%s decode_rank=%s samples=%d prompt_tokens=%d "
        "completion_tokens=%d ttft_ms=%s e2e_ms=%.1f",
        request.method, request.url.path, status, first.rid, ranks["bootstrap_room"], ranks["prefill_dp_rank"],
        ranks["decode_dp_rank"], len(gens), first.prompt_tokens, sum(g.completion_tokens for g in gens),
        "-" if ttft is None else f"{ttft * 1000:.1f}", max(g.e2e_latency for g in gens) * 1000,
    )

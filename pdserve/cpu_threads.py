"""How many torch threads each worker process gets (torch-free: the router's launcher uses it too)."""

from __future__ import annotations

import os


def torch_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker when ``workers`` worker processes (a server's DP ranks, or every rank
    ``pdserve launch`` starts) share this machine: the cores but one, divided among them, at least one
    each. The front processes (HTTP, tokenizer, detokenizer) keep a core, as vLLM's CPU backend reserves
    one: an OpenMP team with a descheduled thread stalls every op at its barrier (docs/benchmarks.md
    result 15: 2 threads on 2 cores beside a busy core served 36x slower than 1)."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, (cores - 1) // max(1, workers))

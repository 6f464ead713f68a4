"""One engine instance (one DP rank): model, KV pool and scheduler, plus request validation."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.grammar import GrammarCompiler, grammar_field
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Req, SamplingParams, StepOutput
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.validation import RequestLimits
from pdserve.models.packed_linear import pack_linears

if TYPE_CHECKING:
    from pdserve.models.loader import LoadedModel

log = logging.getLogger(__name__)

CPU_KV_BUDGET_CAP = 8 << 30  # on CPU, mem_fraction_static applies to at most this many bytes


class EngineCore:
    """Model + KV pool + scheduler for one DP rank. Not thread-safe: drive it from one thread."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, rank: int = 0) -> None:
        config.validate()
        if config.simulate:
            self._init_simulated(config, rank)
            return
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if loaded is None:
            from pdserve.models.loader import load_model

            loaded = load_model(config.model_path, dtype=config.dtype, device=config.device)
        loaded.model.fuse_projections()
        pack_linears(loaded.model)  # oneDNN-packed weights on CPU (bf16 where native, fp32)
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.model_path
        self.model_config = loaded.config
        self.device = loaded.device
        self.context_length = min(config.context_length or loaded.context_length, loaded.context_length)
        self.vocab_size = loaded.config.vocab_size
        cfg = loaded.config
        kv_dtype = loaded.dtype
        bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(kv_dtype).bits // 8
        if config.max_total_tokens is not None:
            num_pages = config.max_total_tokens // config.page_size
        else:
            budget = _kv_budget_bytes(self.device) * config.mem_fraction_static / config.engines_per_device
            num_pages = int(budget) // (bytes_per_token * config.page_size)
        if num_pages < 1:
            raise ValueError("KV cache has no room for a single page; raise --max-total-tokens or --mem-fraction-static")
        self.kv_pool = KVPool(
            num_pages, config.page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype, self.device
        )
        self.runner = ModelRunner(loaded.model, self.kv_pool, self.device)
        if self.device.type == "cuda" and not config.disable_cuda_graph:
            self.runner.enable_decode_graphs(min(config.cuda_graph_max_bs, config.max_running_requests),
                                             self.context_length)
        self._grammars = None  # GrammarCompiler, built by the first constrained request
        self._grammars_lock = threading.Lock()
        self.prefix_cache = None if config.disable_radix_cache else RadixCache(self.kv_pool)
        self.scheduler = Scheduler(
            self.runner,
            self.kv_pool,
            loaded.eos_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
            config.chunked_prefill_size,
            config.max_running_requests,
            self.context_length,
            seed=config.random_seed,
            reserved_decode_tokens=config.num_reserved_decode_tokens,
            cache=self.prefix_cache,
            stall_priority_s=config.stall_priority_s,
            stall_timeout_s=config.stall_timeout_s,
        )
        self._trace_steps(config, rank)
        from pdserve.models.cpu_features import compute_path, describe

        self.compute_path = compute_path(self.device, kv_dtype)
        log.info("dp rank %d computes in %s", rank, describe(self.compute_path))

    def _init_simulated(self, config: EngineConfig, rank: int) -> None:
        """Sim mode (pdserve.sim): no weights; the runner waits out a cost model's step time."""
        from pdserve.sim.engine import SimModel

        sim = SimModel.build(config, rank)
        self.config = config
        self.loaded = None
        self.tokenizer = sim.tokenizer
        self.model_path = sim.model_path
        self.model_config = sim.shape
        self.device = sim.runner.device
        self.context_length = sim.context_length
        self.vocab_size = sim.shape.vocab_size
        self.kv_pool = sim.pool
        self.runner = sim.runner
        self.compute_path = {"dtype": str(sim.pool.dtype).removeprefix("torch."), "device": "simulated"}
        self._grammars = None
        self._grammars_lock = threading.Lock()
        self.prefix_cache = None if config.disable_radix_cache else RadixCache(self.kv_pool)
        self.scheduler = Scheduler(
            self.runner,
            self.kv_pool,
            sim.eos_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
            config.chunked_prefill_size,
            config.max_running_requests,
            self.context_length,
            seed=config.random_seed,
            sampler=sim.runner.sample,
            reserved_decode_tokens=config.num_reserved_decode_tokens,
            cache=self.prefix_cache,
            stall_priority_s=config.stall_priority_s,
            stall_timeout_s=config.stall_timeout_s,
        )
        self._trace_steps(config, rank)

    @property
    def max_total_tokens(self) -> int:
        """KV capacity in tokens: every page but those the engine reserves for itself (the decode
        graphs' scratch page)."""
        return self.kv_pool.capacity * self.kv_pool.page_size

    def _trace_steps(self, config: EngineConfig, rank: int) -> None:
        """``--step-trace``: record every forward's shape and timing (pdserve.engine.step_trace)."""
        self.step_trace = None
        if config.step_trace:
            from pdserve.engine.step_trace import StepTrace, trace_path

            self.step_trace = StepTrace(self.runner, trace_path(config.step_trace, rank), rank,
                                        self.max_total_tokens, config.page_size)

    # ------------------------------------------------------------------ validation
    @property
    def limits(self) -> RequestLimits:
        """What this rank can serve: the one validator's limits (``pdserve.engine.validation``)."""
        return RequestLimits(self.context_length, self.max_total_tokens, self.vocab_size)

    def check_limits(self, req: Req) -> None:
        """Reject what the engine could never serve, naming the field and the allowed range (the
        front runs the same check first)."""
        self.limits.check(req.input_ids, req.params, req.top_logprobs_num, req.logprob_start_len)

    def validate(self, req: Req) -> None:
        """:meth:`check_limits`, then resolve ``logprob_start_len`` and the grammar (unless a matcher
        compiled off the loop, :meth:`grammar_matcher` on the worker's grammar thread, is set)."""
        self.check_limits(req)
        if req.logprob_start_len == -1:
            req.logprob_start_len = len(req.input_ids) - 1
        if req.grammar is None:
            req.grammar = self.grammar_matcher(req.params)

    def grammar_matcher(self, params: SamplingParams) -> Any:
        """A fresh matcher of ``params``' grammar (None without one); the compiler is built on first
        use. Thread-safe: a worker calls it on its grammar thread, never on the engine loop."""
        if grammar_field(params) is None:
            return None
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer.to_json(), self.vocab_size,
                                                 self.scheduler.eos_token_ids)
        return self._grammars.matcher(params)

    # ------------------------------------------------------------------ requests
    def add_request(self, req: Req) -> None:
        self.validate(req)
        self.scheduler.add_request(req)

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        return self.scheduler.abort(rid, message)

    def step(self) -> list[StepOutput]:
        return self.scheduler.step()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def check_idle(self) -> bool:
        """The scheduler's integrity check, when idle (see ``Scheduler.check_idle``)."""
        return self.scheduler.check_idle()

    def runnable(self) -> bool:
        """False while everything queued waits for pages that no step of this engine can free."""
        return self.scheduler.runnable()

    def load(self) -> dict[str, int | float]:
        """Load and prefix-cache counters of this rank (``num_used_pages`` excludes pages only the
        cache holds, which are ``num_evictable_pages``, and pages the engine reserves for itself, which
        ``num_total_pages`` excludes too)."""
        s = self.scheduler
        pool = self.kv_pool
        return {
            "num_reqs": s.num_requests(),
            "num_waiting_reqs": len(s.waiting) + len(s.pending_alloc),
            "num_tokens": s.num_tokens(),
            "num_used_pages": pool.num_used,
            "num_total_pages": pool.capacity,
            "num_cached_pages": self.prefix_cache.num_pages if self.prefix_cache is not None else 0,
            "num_evictable_pages": pool.num_evictable,
            "prompt_tokens_total": s.prompt_tokens_total,
            "cached_tokens_total": s.cached_tokens_total,
            "prefill_tokens_computed": s.prefill_tokens_computed,
            "cache_hit_rate": round(s.cached_tokens_total / s.prompt_tokens_total, 6) if s.prompt_tokens_total else 0.0,
            "num_retractions": s.num_retractions,
            "num_preemptions": s.num_preemptions,
            "num_stall_timeouts": s.num_stall_timeouts,
            "num_steps": s.num_steps,
        }

    def flush_cache(self) -> str | None:
        """Empty the prefix cache; refused (the reason returned) while requests are in the engine,
        as SGLang refuses, since their pages could not be dropped anyway."""
        n = self.scheduler.num_requests()
        if n:
            return f"cannot flush the cache while {n} requests are in the engine; retry when idle"
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
        return None


def _kv_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    available = CPU_KV_BUDGET_CAP
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return min(available, CPU_KV_BUDGET_CAP)

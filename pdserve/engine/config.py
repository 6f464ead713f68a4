"""Engine options shared by the offline API, the CLI and server workers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    """Options of one engine (one DP rank). Names follow SGLang's server arguments."""

    model_path: str | None = None  # None: the embedded default model
    # float32 | bfloat16 | float16 | auto (None: auto). auto: the checkpoint's bf16/fp16 where the device runs it
    # natively (CPU: AMX-BF16 or AVX512-BF16, else float32), float32 checkpoints in float32 (CUDA: bfloat16)
    dtype: str | None = "auto"
    device: str | None = None  # cpu | cuda | cuda:N; None: cuda when available
    page_size: int = 16
    max_total_tokens: int | None = None  # KV capacity in tokens; None: from mem_fraction_static
    mem_fraction_static: float = 0.3  # share of free device memory (CPU: of 4 GiB) given to KV when no max_total_tokens
    chunked_prefill_size: int = 512
    max_running_requests: int = 256
    context_length: int | None = None  # None: the model's max_position_embeddings
    random_seed: int = 0
    torch_threads: int | None = None  # None: leave torch's default
    engines_per_device: int = 1  # engines sharing one device's memory (DP ranks on one CPU); splits the KV budget
    num_reserved_decode_tokens: int = 16  # decode headroom kept per running request when admitting new ones
    stall_priority_s: float = 5.0  # a request retracted after its first token this long gets priority
    stall_timeout_s: float = 60.0  # ... and fails alone if it cannot run again within this
    # simulated compute (pdserve.sim): no weights, the forward pass is a cost model's clock
    simulate: str | None = None  # HARDWARE (roofline, e.g. H100-SXM) or profile:FILE
    tp_size: int = 1  # sim only: tensor-parallel GPUs per rank
    time_scale: float = 1.0  # sim only: every simulated duration is multiplied by this
    inject_faults: str | None = None  # sim only: see pdserve.sim.faults
    disable_radix_cache: bool = False  # no prefix cache: every prompt is computed in full
    disable_cuda_graph: bool = False  # CUDA: decode steps run eagerly instead of replaying captured graphs
    cuda_graph_max_bs: int = 64  # CUDA: largest decode batch captured (capped by max_running_requests)
    step_trace: str | None = None  # PATH prefix: one JSON line per forward to PATH.rank<R>.jsonl (pdserve.engine.step_trace)

    def validate(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"max_total_tokens must be >= page_size ({self.page_size}), got {self.max_total_tokens}")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.num_reserved_decode_tokens < 0:
            raise ValueError(f"num_reserved_decode_tokens must be >= 0, got {self.num_reserved_decode_tokens}")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        for name in ("stall_priority_s", "stall_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < 1e9:  # also refuses NaN
                raise ValueError(f"{name} must be a number of seconds in (0, 1e9), got {value}")
        if self.engines_per_device < 1:
            raise ValueError(f"engines_per_device must be >= 1, got {self.engines_per_device}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 < self.time_scale < 1e6:
            raise ValueError(f"time_scale must be in (0, 1e6), got {self.time_scale}")
        if (self.tp_size != 1 or self.inject_faults) and not self.simulate:
            raise ValueError("--tp-size and --inject-faults apply to simulated compute only (add --simulate)")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags for every :class:`EngineConfig` field (``--model-path``, ``--page-size`` ...)."""
    defaults = EngineConfig()
    parser.add_argument("--model-path", default=None, help="HF checkpoint folder (default: embedded tiny model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and KV dtype. auto: a bf16/fp16 checkpoint runs in bfloat16 where the CPU has "
                             "AMX-BF16 or AVX512-BF16 (float32 elsewhere, logged), a float32 checkpoint (the "
                             "embedded model) in float32; on CUDA the checkpoint's half dtype, else bfloat16")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--page-size", type=int, default=defaults.page_size, help="tokens per KV page")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    parser.add_argument("--mem-fraction-static", type=float, default=defaults.mem_fraction_static,
                        help="share of free device memory (CPU: of 4 GiB) given to the KV cache without --max-total-tokens")
    parser.add_argument("--chunked-prefill-size", type=int, default=defaults.chunked_prefill_size,
                        help="most prompt tokens computed in one step (longer prompts are split)")
    parser.add_argument("--max-running-requests", type=int, default=defaults.max_running_requests,
                        help="most requests running at once per DP rank")
    parser.add_argument("--context-length", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--random-seed", type=int, default=defaults.random_seed,
                        help="seed of sampling without a request seed")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch CPU threads per DP rank (default for a server: (cores - 1) / dp-size, at least "
                        "1, leaving a core to the front; in-process engines: torch's own choice)")
    parser.add_argument(
        "--num-reserved-decode-tokens", type=int, default=defaults.num_reserved_decode_tokens,
        help="decode headroom (tokens) kept free per running request when admitting new requests",
    )
    parser.add_argument(
        "--stall-priority-after", dest="stall_priority_s", type=float, default=defaults.stall_priority_s,
        help="seconds a request retracted after its first token waits before it gets priority: it is admitted "
             "first and running requests that waited less are retracted for it, each at most twice "
             f"(default: {defaults.stall_priority_s:g})",
    )
    parser.add_argument(
        "--stall-timeout", dest="stall_timeout_s", type=float, default=defaults.stall_timeout_s,
        help="seconds a request retracted after its first token may wait to run again before it fails alone "
             f"with a named error (default: {defaults.stall_timeout_s:g})",
    )
    sim = parser.add_argument_group("simulated compute (no weights; see docs/simulation.md)")
    sim.add_argument("--simulate", default=None, metavar="HARDWARE|profile:FILE",
                     help="replace the forward pass by a cost model: H100-SXM, H200, A100-80G or profile:FILE")
    sim.add_argument("--tp-size", type=int, default=defaults.tp_size, help="sim: tensor-parallel GPUs per rank")
    sim.add_argument("--time-scale", type=float, default=defaults.time_scale,
                     help="sim: multiply every simulated duration (slows the clock uniformly)")
    sim.add_argument("--inject-faults", default=None, metavar="SPEC",
                     help="sim: e.g. 'prefill=0.1,transfer=0.1,decode=0.1,slow_rank=1:4,transfer_slowdown=3'")
    parser.add_argument(
        "--disable-radix-cache", action="store_true", help="turn off the prefix cache (reuse of shared prompt KV)"
    )
    parser.add_argument("--disable-cuda-graph", action="store_true",
                        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs "
                             "(default: graphs on; CPU never uses them)")
    parser.add_argument("--cuda-graph-max-bs", type=int, default=defaults.cuda_graph_max_bs,
                        help="largest decode batch size captured as a CUDA graph, capped by "
                             "--max-running-requests; larger batches run eagerly")
    parser.add_argument("--step-trace", default=None, metavar="PATH",
                        help="write each forward's shape and timing to PATH.rank<R>.jsonl, one JSON line per step, "
                             "for `pdserve bench profile --from-trace` (default: off)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})

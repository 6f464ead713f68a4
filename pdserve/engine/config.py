"""Engine options shared by the offline API, the CLI and server workers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    """Options of one engine (one DP rank). Names follow SGLang's server arguments."""

    model_path: str | None = None  # None: the embedded default model
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto; None: float32 on CPU, bfloat16 on CUDA
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
    disable_radix_cache: bool = False  # no prefix cache: every prompt is computed in full

    def validate(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"max_total_tokens must be >= page_size ({self.page_size}), got {self.max_total_tokens}")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.engines_per_device < 1:
            raise ValueError(f"engines_per_device must be >= 1, got {self.engines_per_device}")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags for every :class:`EngineConfig` field (``--model-path``, ``--page-size`` ...)."""
    defaults = EngineConfig()
    parser.add_argument("--model-path", default=None, help="HF checkpoint folder (default: embedded tiny model)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--page-size", type=int, default=defaults.page_size)
    parser.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    parser.add_argument("--mem-fraction-static", type=float, default=defaults.mem_fraction_static)
    parser.add_argument("--chunked-prefill-size", type=int, default=defaults.chunked_prefill_size)
    parser.add_argument("--max-running-requests", type=int, default=defaults.max_running_requests)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--random-seed", type=int, default=defaults.random_seed)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument(
        "--disable-radix-cache", action="store_true", help="turn off the prefix cache (reuse of shared prompt KV)"
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})

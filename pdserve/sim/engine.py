"""What :class:`~pdserve.engine.engine_core.EngineCore` builds in sim mode instead of loading weights:
the model's shape from ``config.json``, a storage-less KV pool sized from the simulated device's
memory, the cost model, the transfer link and a :class:`~pdserve.sim.runner.SimRunner`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_pool import KVPool
from pdserve.sim.cost_model import CostModel
from pdserve.sim.faults import FaultPlan
from pdserve.sim.hardware import SimConfigError, get_hardware
from pdserve.sim.model_shape import ModelShape
from pdserve.sim.runner import SimRunner
from pdserve.sim.tokenizer import NullTokenizer, open_tokenizer
from pdserve.sim.transfer import LinkSpec, register_link
from pdserve.sim.validate import check_config

MAX_SIM_PAGES = 1 << 22  # page accounting is a Python list: cap it (4M pages of 16 = 67M tokens)
PROFILE_LINK = "H100-SXM"  # a profiled model's KV link, when no hardware is named


@dataclass
class SimModel:
    """Everything the engine core needs from a simulated model."""

    model_path: str
    shape: ModelShape
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    context_length: int
    cost: CostModel
    pool: KVPool
    runner: SimRunner

    @classmethod
    def build(cls, config: EngineConfig, rank: int = 0) -> SimModel:
        import torch

        folder, raw, shape, cost = check_config(config)
        tokenizer = open_tokenizer(folder, simulate=True)
        eos = _eos_ids(folder, raw, tokenizer)
        context = int(raw.get("max_position_embeddings") or 4096)
        context = min(config.context_length or context, context)
        tokens = config.max_total_tokens if config.max_total_tokens is not None else cost.kv_capacity_tokens()
        num_pages = min(tokens // config.page_size, MAX_SIM_PAGES)
        if num_pages < 1:
            raise SimConfigError("the simulated KV cache has no room for one page; raise --max-total-tokens")
        dtype = torch.bfloat16 if shape.dtype_bytes == 2 else torch.float32
        pool = KVPool(num_pages, config.page_size, shape.num_layers, shape.num_kv_heads, shape.head_dim, dtype,
                      "cpu", storage=False)
        faults = FaultPlan.parse(config.inject_faults)
        hw = get_hardware(PROFILE_LINK if config.simulate.startswith("profile:") else config.simulate)
        register_link(pool, LinkSpec(hw.kv_link_bandwidth * config.tp_size, hw.kv_link_setup_s,
                                     shape.kv_bytes_per_token, config.time_scale, faults))
        runner = SimRunner(cost, pool, shape.vocab_size, eos, config.time_scale, faults, rank)
        return cls(str(folder), shape, tokenizer, eos, context, cost, pool, runner)


def _eos_ids(folder: Path, raw: dict, tokenizer: object) -> tuple[int, ...]:
    for source in (folder / "generation_config.json", None):
        data = raw
        if source is not None:
            try:
                data = json.loads(source.read_text())
            except (OSError, ValueError):
                continue
        eos = data.get("eos_token_id")
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
            return tuple(eos)
    if not isinstance(tokenizer, NullTokenizer) and tokenizer.eos_token_id is not None:
        return (tokenizer.eos_token_id,)
    return ()

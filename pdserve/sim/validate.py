"""Startup checks of a sim engine's settings, torch-free so the front runs them before any worker."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.engine.config import EngineConfig
from pdserve.sim.cost_model import CostModel, make_cost_model
from pdserve.sim.hardware import SimConfigError
from pdserve.sim.model_shape import DTYPE_BYTES, ModelShape

SIM_MEM_FRACTION = 0.9  # share of the simulated GPUs' memory for weights + KV (SGLang's default is ~0.88)


def model_folder(config: EngineConfig) -> Path:
    if config.model_path is None:
        from pdserve.models.tiny import default_model_path

        return Path(default_model_path())
    folder = Path(config.model_path).expanduser().resolve()
    if not folder.is_dir():
        raise SimConfigError(f"--model-path {config.model_path}: not a directory (a sim model needs a folder "
                             "holding config.json)")
    return folder


def check_config(config: EngineConfig) -> tuple[Path, dict, ModelShape, CostModel]:
    """Folder, raw config.json, shape and cost model of a sim engine; SimConfigError names what is wrong."""
    folder = model_folder(config)
    if config.dtype not in (None, "auto", *DTYPE_BYTES):
        raise SimConfigError(f"--dtype {config.dtype}: not one of {', '.join(DTYPE_BYTES)}")
    shape = ModelShape.from_folder(folder, DTYPE_BYTES.get(config.dtype or "bfloat16", 2))
    raw = json.loads((folder / "config.json").read_text())
    cost = make_cost_model(config.simulate, shape, config.tp_size, SIM_MEM_FRACTION)
    if config.max_total_tokens is None and cost.kv_capacity_tokens() is None:
        raise SimConfigError(f"--simulate {config.simulate} does not size the KV cache: give --max-total-tokens")
    return folder, raw, shape, cost

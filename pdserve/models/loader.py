"""Load a Hugging Face checkpoint folder (config, safetensors weights, tokenizer) into pdserve.

The model is built on the meta device and the checkpoint tensors are assigned in place, so
weights are materialised once, directly on the target device and dtype.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdserve.models.config import ModelConfig, ModelConfigError, resolve_dtype
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.rope import RotaryEmbedding
from pdserve.models.tokenizer import Tokenizer, TokenizerError

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the file or tensor at fault."""


@dataclass
class LoadedModel:
    """A ready-to-run model with everything the engine needs to know about its checkpoint."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    model_path: str
    dtype: torch.dtype
    device: torch.device
    context_length: int
    dtype_fallback_reason: str | None = None  # why ``auto`` ran float32 instead of the checkpoint's dtype


def load_model(model_path: str | None = None, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load ``model_path`` (default: the embedded tiny model) onto ``device`` in ``dtype``.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` follows
    :func:`~pdserve.models.config.resolve_dtype` (``None`` or ``"auto"``: the checkpoint's dtype where
    the device runs it natively, else float32, logged once with the reason).
    """
    if model_path is None:
        from pdserve.models.tiny import default_model_path

        model_path = default_model_path()
    folder = Path(model_path).expanduser().resolve()
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a directory")
    raw = _read_json(folder / "config.json", required=True)
    try:
        config = ModelConfig.from_hf(raw)
    except ModelConfigError as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {e}") from e
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    try:
        choice = resolve_dtype(dtype, target, config.dtype)
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from e
    torch_dtype = choice.dtype
    if choice.fallback_reason:
        log.info("dtype auto: float32, %s", choice.fallback_reason)
    try:
        tokenizer = Tokenizer(folder)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from e
    model = _load_weights(folder, config, torch_dtype, target)
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=_eos_ids(folder, config, tokenizer),
        model_path=str(folder),
        dtype=torch_dtype,
        device=target,
        context_length=config.max_position_embeddings,
        dtype_fallback_reason=choice.fallback_reason,
    )


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def weight_files(folder: Path) -> list[Path]:
    """Safetensors files of a checkpoint: the index's shards, ``model.safetensors``, or all ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shard(s) listed in {index.name} not found in {folder}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights found in {folder} (other weight formats are not supported)")
    return files


def _load_weights(folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if name.endswith(IGNORED_SUFFIXES) or name in optional:
                        continue
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != expected[name]:
                        raise ModelLoadError(
                            f"tensor {name!r} in {file.name} has shape {list(tensor.shape)}, "
                            f"expected {list(expected[name])} for this config.json"
                        )
                    state[name] = tensor.to(dtype)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read safetensors file {file}: {e}") from e
    if unexpected:
        raise ModelLoadError(f"unexpected tensor(s) in {folder} for {config.architecture}: {_names(unexpected)}")
    missing = [name for name in expected if name not in state and name not in optional]
    if missing:
        raise ModelLoadError(f"tensor(s) missing from the checkpoint in {folder}: {_names(missing)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    model.requires_grad_(False)
    return model.eval()


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _eos_ids(folder: Path, config: ModelConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    """generation_config.json's ``eos_token_id``, else config.json's, else the tokenizer's EOS."""
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and eos:
        return tuple(int(i) for i in eos)
    if config.eos_token_ids:
        return config.eos_token_ids
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)

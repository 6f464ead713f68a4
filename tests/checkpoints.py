"""Random-weight HF checkpoints built by the tests themselves (no hub access)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Peaked logits (large init std) keep greedy decoding away from near-ties.
ARCHS: dict[str, dict[str, Any]] = {
    "llama-gqa": dict(
        cls="LlamaConfig",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rope_theta=10000.0,
    ),
    "qwen2-tied": dict(
        cls="Qwen2Config",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
    ),
}


def make_checkpoint(folder: Path, arch: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """Save a random transformers model of ``arch`` with the default model's tokenizer into ``folder``.

    Returns the folder and the transformers model (float32, eval mode) for reference outputs.
    """
    import transformers

    from pdserve.models.tiny import default_model_path

    tok_dir = Path(default_model_path())
    spec = dict(ARCHS[arch])
    config_cls = getattr(transformers, spec.pop("cls"))
    spec.update(overrides)
    from pdserve.models.tokenizer import Tokenizer

    vocab = Tokenizer(tok_dir).vocab_size
    config = config_cls(vocab_size=vocab, eos_token_id=Tokenizer(tok_dir).eos_token_id, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    # Biases default to zero in transformers' init; randomise them so Qwen2's q/k/v bias matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, folder / name)
    return folder, model

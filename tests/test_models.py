"""Tokenizer, tiny model, loader and forward-equivalence tests against transformers (all offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.kv_pool import KVPool
from pdserve.models.attention import AttentionMetadata
from pdserve.models.config import ModelConfig, RopeConfig
from pdserve.models.loader import LoadedModel, ModelLoadError, load_model
from pdserve.models.rope import RotaryEmbedding, inverse_frequencies
from pdserve.models.tiny import build_tiny_checkpoint, default_cache_dir, default_model_path
from pdserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MULTIBYTE_TEXTS = (
    "Hello, world! The quick brown fox.",
    "café crème brûlée — naïve façade",
    "emoji 😀🎉👍🏽 and family 👨‍👩‍👧 done",
    "中文字符测试，日本語のテキスト、한국어 문장",
    "mixed: Ωμέγα ∑∫ 🚀 東京 ok\n\tnew line",
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def hf_tok(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    assert tok.vocab_size == len(hf_tok) == 2000
    assert tok.bos_token_id == hf_tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_id == hf_tok.eos_token_id == tok.token_to_id("<|end_of_text|>")
    assert set(tok.all_special_ids) == {tok.token_to_id(t) for t in
                                        ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")}
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == ids[1:]
        assert tok.decode(ids) == text == hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text


def test_tokenizer_config_variants(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = {
        "bos_token": {"content": "<|begin_of_text|>", "special": True, "__type": "AddedToken"},
        "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False,
        "chat_template": [
            {"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
            {"name": "tool_use", "template": "{{ tools | tojson }}|{{ messages[0].content }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer(tmp_path)
    assert t.eos_token_id == t.token_to_id("<|im_end|>")
    assert t.encode("hi there") == t.encode("hi there", add_special_tokens=False)
    msgs = [{"role": "user", "content": "hé"}]
    assert t.apply_chat_template(msgs) == "[hé]"
    tools = [{"type": "function", "function": {"name": "f", "description": "ünïcode <b>"}}]
    assert t.apply_chat_template(msgs, tools=tools) == json.dumps(tools, ensure_ascii=False) + "|hé"
    assert t.apply_chat_template(msgs, tools=tools, chat_template="default") == "[hé]"

    cfg.update(add_bos_token=True, add_eos_token=True)
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}{{ eos_token }}")
    t = Tokenizer(tmp_path)
    ids = t.encode("hi")
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id and ids.count(t.bos_token_id) == 1
    assert t.apply_chat_template(msgs) == "<|begin_of_text|>hé<|im_end|>"


def test_chat_template_renders_like_transformers(tok: Tokenizer, hf_tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? 🤔"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks!"},
    ]
    text = tok.apply_chat_template(msgs)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "str"}}}]
    with_tools = tok.apply_chat_template(msgs[1:2], tools=tools)
    assert json.dumps(tools[0], ensure_ascii=False) in with_tools
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_detokenizer(tok: Tokenizer, chunk: int, skip_special: bool) -> None:
    im_end = tok.token_to_id("<|im_end|>")
    for text in MULTIBYTE_TEXTS:
        out_ids = tok.encode(text, add_special_tokens=False) + [im_end] + tok.encode(" 再见 👋", add_special_tokens=False)
        prompt = tok.encode("Say something: 😀")
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        pieces = [detok.step(out_ids[i:i + chunk]) for i in range(0, len(out_ids), chunk)]
        expected = tok.decode(out_ids, skip_special_tokens=skip_special)
        assert "".join(pieces) == detok.text == expected
        assert all("\ufffd" not in p for p in pieces)
        assert detok.flush() == ""
        if chunk == 1 and any(ord(c) > 0x7FF for c in text):
            assert "" in pieces  # some multi-byte character was split across tokens and held back


def test_incremental_detokenizer_flushes_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    streamed = "".join(detok.step([i]) for i in cut)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(cut) == detok.text


# ----------------------------------------------------------------------------- tiny model


def test_tiny_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    code = "import sys; from pdserve.models.tiny import build_tiny_checkpoint; build_tiny_checkpoint(sys.argv[1])"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONHASHSEED": "7"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=120)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert {"model.safetensors", "tokenizer.json", "config.json", "generation_config.json"} <= set(names)
    for name in names:
        assert (tiny_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other_seed = build_tiny_checkpoint(tmp_path / "seed2", seed=2)
    assert (other_seed / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other_seed / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_default_model_path_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pdserve"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = default_model_path()
    assert path == str(tmp_path / "cache" / "tiny-llama-v1")
    stamp = os.stat(Path(path) / "model.safetensors").st_mtime_ns
    assert default_model_path() == path
    assert os.stat(Path(path) / "model.safetensors").st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-llama-v1"]  # no temp dirs left


def test_tiny_model_loads_and_matches_transformers(tiny_dir: Path, tok: Tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_dir), device="cpu")
    assert isinstance(lm, LoadedModel)
    assert lm.model_path == str(tiny_dir.resolve())
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu") and lm.context_length == 4096
    assert lm.eos_token_ids == (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|im_end|>"))
    assert lm.config.num_kv_heads == 4 and lm.config.vocab_size == tok.vocab_size
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}]), False)
    ours = _prefill_logits(lm, ids, page_size=16)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ours.softmax(-1).max(-1).values.mean() > 0.3  # peaked enough for stable greedy tests
    assert load_model(str(tiny_dir), dtype="auto", device="cpu").dtype == torch.float32
    bf16 = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.rotary.cos.dtype == torch.float32
    assert (_prefill_logits(bf16, ids, page_size=16).argmax(-1) == ours.argmax(-1)).float().mean() > 0.8


# ----------------------------------------------------------------------------- config / loader errors


def test_config_spellings_parse_the_same() -> None:
    base = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    }
    scalings = [
        (None, {"rope_type": "default"}),
        ({"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}),
    ]
    for v4_scaling, v5_params in scalings:
        v4 = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": v4_scaling, "torch_dtype": "bfloat16"})
        v5 = ModelConfig.from_hf({**base, "rope_parameters": {**v5_params, "rope_theta": 500000.0}, "dtype": "bfloat16"})
        assert v4 == v5
        assert v4.rope.theta == 500000.0 and v4.dtype == "bfloat16"
    assert v4.rope.rope_type == "llama3" and v4.rope.original_max_position_embeddings == 64


def _hf_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "llama_bias":
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True, rope_theta=500.0)
    if kind == "llama3_rope":
        return LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if kind == "linear_rope":
        return LlamaConfig(**common, rope_scaling={"type": "linear", "factor": 4.0})
    if kind == "qwen2_tied":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=32)
    if kind == "mistral":
        return MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=None)
    raise AssertionError(kind)


def _save_hf_model(kind: str, folder: Path, tiny_dir: Path, seed: int = 0):
    """A randomly initialised HF model (with larger-than-default weights) saved as a checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    _copy_tokenizer(tiny_dir, folder)
    return model


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _prefill_logits(lm: LoadedModel, ids: list[int], page_size: int) -> torch.Tensor:
    cfg = lm.config
    pool = KVPool(32, page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, lm.dtype, lm.device)
    pages = pool.alloc(pool.pages_for(len(ids)))
    meta = AttentionMetadata.build(page_size, [], [], [(0, len(ids), pages)], lm.device)
    hidden = lm.model(torch.tensor(ids), torch.arange(len(ids)), meta, pool.layers)
    return lm.model.compute_logits(hidden)


def test_loader_errors(tiny_dir: Path, tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_dir, folder)
        return folder

    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(str(tmp_path / "nope"))

    folder = fresh("arch")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as err:
        load_model(str(folder))
    assert all(a in str(err.value) for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                             "MistralForCausalLM"))

    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse .*config.json"):
        load_model(str(folder))

    with pytest.raises(ModelLoadError, match="unsupported dtype 'int8'"):
        load_model(str(tiny_dir), dtype="int8", device="cpu")

    folder = fresh("notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        load_model(str(folder), device="cpu")

    folder = fresh("noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(folder), device="cpu")

    folder = fresh("missing")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(folder), device="cpu")

    tensors = load_file(str(tiny_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 256)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*shape \[3, 256\].*expected \[128, 256\]"):
        load_model(str(folder), device="cpu")

    tensors = load_file(str(tiny_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old checkpoints: ignored
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unexpected.*model\.extra\.weight") as err:
        load_model(str(folder), device="cpu")
    assert "inv_freq" not in str(err.value)


# ----------------------------------------------------------------------------- sharded checkpoints


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint_loads(tiny_dir: Path, tmp_path: Path, with_index: bool) -> None:
    hf = _save_hf_model("llama", tmp_path, tiny_dir, seed=3)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    if with_index:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    lm = load_model(str(tmp_path), device="cpu")
    ids = list(range(1, 12))
    torch.testing.assert_close(_prefill_logits(lm, ids, page_size=4), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    if with_index:
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
        with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
            load_model(str(tmp_path), device="cpu")


# ----------------------------------------------------------------------------- forward equivalence


KINDS = ["llama", "llama_bias", "llama3_rope", "linear_rope", "qwen2_tied", "qwen3", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_transformers(kind: str, tiny_dir: Path, tmp_path: Path) -> None:
    hf = _save_hf_model(kind, tmp_path, tiny_dir)
    lm = load_model(str(tmp_path), device="cpu")
    cfg = lm.config
    if kind == "qwen2_tied":
        assert cfg.tie_word_embeddings and cfg.qkv_bias
        assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
        assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(1)
    seq_a = torch.randint(0, cfg.vocab_size, (23,), generator=gen).tolist()
    seq_b = torch.randint(0, cfg.vocab_size, (9,), generator=gen).tolist()
    ref_a, ref_b = _hf_logits(hf, seq_a), _hf_logits(hf, seq_b)

    def check(ours: torch.Tensor, ref: torch.Tensor) -> None:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    check(_prefill_logits(lm, seq_a, page_size=16), ref_a)

    # Paged, chunked and batched: page size 5 divides none of the lengths; pages are scattered.
    ps = 5
    pool = KVPool(24, ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, lm.dtype, lm.device)
    pool.alloc(3)
    pages_a = pool.alloc(pool.pages_for(len(seq_a)))[::-1]
    pages_b = pool.alloc(pool.pages_for(len(seq_b)))

    def run(decodes: list[tuple[list[int], list[int], int]], extends: list[tuple[list[int], list[int], int, int]]):
        """decodes: (seq, pages, pos); extends: (seq, pages, start, length). Returns logits rows."""
        ids = [s[pos] for s, _, pos in decodes] + [t for s, _, st, n in extends for t in s[st:st + n]]
        positions = [pos for _, _, pos in decodes] + [p for _, _, st, n in extends for p in range(st, st + n)]
        meta = AttentionMetadata.build(
            ps, [pg for _, pg, _ in decodes], [pos + 1 for _, _, pos in decodes],
            [(st, n, pg) for _, pg, st, n in extends], lm.device,
        )
        hidden = lm.model(torch.tensor(ids), torch.tensor(positions), meta, pool.layers)
        return lm.model.compute_logits(hidden)

    # step 1: first chunks of both requests (A: 7 tokens from 0, B: 4 tokens from 0)
    out = run([], [(seq_a, pages_a, 0, 7), (seq_b, pages_b, 0, 4)])
    check(out[:7], ref_a[:7])
    check(out[7:], ref_b[:4])
    # step 2: A's second chunk (prefix 7), B's remaining prefill (prefix 4)
    out = run([], [(seq_a, pages_a, 7, 11), (seq_b, pages_b, 4, 3)])
    check(out[:11], ref_a[7:18])
    check(out[11:], ref_b[4:7])
    # step 3: B decodes one token while A prefills its last chunk
    out = run([(seq_b, pages_b, 7)], [(seq_a, pages_a, 18, 3)])
    check(out[:1], ref_b[7:8])
    check(out[1:], ref_a[18:21])
    # steps 4-5: both decode together with different context lengths
    out = run([(seq_a, pages_a, 21), (seq_b, pages_b, 8)], [])
    check(out, torch.stack([ref_a[21], ref_b[8]]))
    out = run([(seq_a, pages_a, 22)], [])
    check(out, ref_a[22:23])
    pool.check_integrity(expect_used=3 + len(pages_a) + len(pages_b))


def test_loading_a_checkpoint_does_not_import_torch_dynamo():
    """Building the model skeleton on the meta device must stay off PyTorch's Python-implemented meta
    ops: the first one imports torch._dynamo, seconds of every worker's (re)start."""
    code = ("import sys; from pdserve.models.loader import load_model; load_model(None, device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


@pytest.mark.parametrize("rope", [RopeConfig(theta=100000.0), RopeConfig(theta=500000.0, rope_type="llama3",
                                                                          factor=32.0, original_max_position_embeddings=64)])
def test_rope_frequencies_come_from_the_cpu_on_any_device(rope):
    """Built on a GPU (the loader builds the tables under ``torch.device(cuda)``), the inverse
    frequencies are still computed on the CPU as transformers computes them, then the tables on the
    device (``meta`` stands in for CUDA here): CUDA's ``pow`` may differ in the last bit."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        freqs = inverse_frequencies(rope, 64)
        table = RotaryEmbedding(rope, 64, 128)
    assert freqs.device.type == "cpu" and table.cos.device.type == "meta"
    scaling = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type == "llama3":
        scaling |= {"factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                    "high_freq_factor": rope.high_freq_factor,
                    "original_max_position_embeddings": rope.original_max_position_embeddings}
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                          max_position_embeddings=128, rope_parameters=scaling))
    assert torch.equal(freqs, hf.inv_freq)


def test_the_suite_runs_engines_on_cpu_in_float32():
    """conftest hides GPUs from the suite and every server it starts: with one visible, engines would
    default to CUDA in bfloat16 and the float32 identity tests against transformers would not test it."""
    if os.environ.get("PDSERVE_TEST_CUDA") == "1":
        pytest.skip("GPUs made visible on purpose")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    loaded = load_model()
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32

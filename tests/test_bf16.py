"""bfloat16: the run-time dtype choice, the bf16 engine against transformers in bf16, and P/D in bf16.

Runs on any CPU: without AMX-BF16 / AVX512-BF16 the bf16 paths are slow but correct.

Tolerances (bf16 keeps 8 significant bits, so two correct bf16 implementations differ):
- greedy: tokens equal transformers bf16's until the first divergence, which is accepted only where
  transformers bf16 scores our token within ``BF16_TIE_GAP`` logits of its own pick (bf16 logits of size
  ~10 are 0.0625 apart; measured deficits 0-0.125), and at least 40 % of all tokens come before a divergence;
- logprobs: against transformers float32, our mean absolute error is at most 1.5x transformers bf16's
  own (measured 0.9-1.3x) and the largest at most ``BF16_MAX_LOGPROB_ERROR``.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.models import cpu_features
from pdserve.models.config import resolve_dtype
from pdserve.models.loader import load_model
from pdserve.models.tiny import default_model_path
from tests.checkpoints import make_checkpoint
from tests.test_disagg_managers import GREEDY, Cluster, abort_message, prompt, req

BF16_TIE_GAP = 0.25
BF16_MAX_LOGPROB_ERROR = 0.6
NEW_TOKENS = 12
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- the run-time choice

@pytest.mark.parametrize("name", [None, "auto"])
def test_auto_follows_the_checkpoint_where_the_cpu_has_bf16(name):
    has = lambda: "amx_bf16"  # noqa: E731
    lacks = lambda: None  # noqa: E731
    assert resolve_dtype(name, CPU, "bfloat16", has).dtype == torch.bfloat16
    assert resolve_dtype(name, CPU, "float16", has).dtype == torch.bfloat16  # fp16 is emulated on CPUs
    assert resolve_dtype(name, CPU, "float32", has) == resolve_dtype(name, CPU, None, has)
    assert resolve_dtype(name, CPU, "float32", has).dtype == torch.float32
    fallback = resolve_dtype(name, CPU, "bfloat16", lacks)
    assert fallback.dtype == torch.float32
    assert "AMX-BF16" in fallback.fallback_reason and "AVX512-BF16" in fallback.fallback_reason
    assert resolve_dtype(name, CPU, "float32", lacks).fallback_reason is None  # nothing to explain
    cuda = torch.device("cuda", 0)
    assert resolve_dtype(name, cuda, "float16", lacks).dtype == torch.float16
    assert resolve_dtype(name, cuda, "float32", lacks).dtype == torch.bfloat16


def test_explicit_dtypes_are_not_second_guessed():
    lacks = lambda: None  # noqa: E731
    assert resolve_dtype("bfloat16", CPU, "float32", lacks).dtype == torch.bfloat16
    assert resolve_dtype("float32", CPU, "bfloat16", lambda: "amx_bf16").dtype == torch.float32


def test_cpu_bf16_detection_agrees_with_cpuinfo(monkeypatch):
    flags = cpu_features.cpu_flags()
    expected = ("amx_bf16" if {"amx_bf16", "amx_tile"} <= flags
                else "avx512_bf16" if "avx512_bf16" in flags else None)
    assert cpu_features.bf16_isa() == expected
    monkeypatch.setenv("PDSERVE_CPU_BF16", "0")
    assert cpu_features.bf16_isa() is None


@pytest.fixture(scope="module")
def bf16_tiny(tmp_path_factory):
    """The embedded tiny model's checkpoint, re-saved with ``torch_dtype: bfloat16``."""
    import json
    import shutil
    from pathlib import Path

    folder = tmp_path_factory.mktemp("tiny-bf16")
    for item in Path(default_model_path()).iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return folder


def test_loader_logs_the_fallback_once(bf16_tiny, monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_CPU_BF16", "0")
    with caplog.at_level(logging.INFO, logger="pdserve.models.loader"):
        loaded = load_model(str(bf16_tiny), device="cpu")
    assert loaded.dtype == torch.float32 and "AMX-BF16" in loaded.dtype_fallback_reason
    lines = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0] and "bfloat16" in lines[0]
    monkeypatch.delenv("PDSERVE_CPU_BF16")
    native = load_model(str(bf16_tiny), device="cpu")
    assert native.dtype == (torch.bfloat16 if cpu_features.bf16_isa() else torch.float32)
    assert load_model(device="cpu").dtype == torch.float32  # the embedded default model stays float32


def test_engine_reports_its_compute_path(bf16_tiny):
    engine = Engine(str(bf16_tiny), dtype="bfloat16", max_total_tokens=256)
    try:
        path = engine.core.compute_path
        assert path["dtype"] == "bfloat16" and path["device"] == "cpu"
        assert path["cpu_isa"] == cpu_features.cpu_isa()
        assert path["native_attention"] in ("avx512_bf16", "generic", "off")
        assert engine.core.kv_pool.dtype == torch.bfloat16
        assert engine.core.kv_pool.layout.dtype == "bfloat16"
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- bf16 vs transformers bf16

SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, initializer_range=0.05, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["tiny", "llama-gqa", "qwen2-tied", "smollm2-135m-shape"])
def bf16_setup(request, tmp_path_factory):
    """Our bf16 engine and transformers in bf16 and float32 on one checkpoint: the embedded tiny model, the
    suite's two small architectures, and SmolLM2-135M's layer shape (4 of its 30 layers, random weights)."""
    import transformers

    if request.param == "tiny":
        folder = default_model_path()
    elif request.param == "smollm2-135m-shape":
        folder, _ = make_checkpoint(tmp_path_factory.mktemp("smol"), "llama-gqa", **SMOL_SHAPE)
    else:
        folder, _ = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    hf = {dtype: transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
          for dtype in (torch.bfloat16, torch.float32)}
    engine = Engine(str(folder), dtype="bfloat16", page_size=16, chunked_prefill_size=64, max_total_tokens=8192)
    yield request.param, engine, hf
    engine.shutdown()


def _prompts(vocab: int, n: int, seed: int, longest: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, longest))] for _ in range(n)]


def test_bf16_greedy_matches_transformers_bf16(bf16_setup):
    name, engine, hf = bf16_setup
    prompts = _prompts(engine.core.vocab_size, 10, seed=1)
    params = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0}
    results = engine.generate(input_ids=prompts, sampling_params=params)
    agreeing = 0
    for i, (p, result) in enumerate(zip(prompts, results)):
        ids = torch.tensor([p])
        out = hf[torch.bfloat16].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                          min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=0)
        ref, ref_logits = out.sequences[0, len(p):].tolist(), torch.stack(out.logits)[:, 0].float()
        ours = result["output_ids"]
        assert len(ours) == NEW_TOKENS
        k = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), NEW_TOKENS)
        agreeing += k
        if k < NEW_TOKENS:
            deficit = float(ref_logits[k].max() - ref_logits[k, ours[k]])
            assert deficit <= BF16_TIE_GAP, (f"{name} prompt {i}: token {k} is {ours[k]}, which transformers bf16 "
                                             f"scores {deficit:.3f} below its pick {ref[k]}")
    assert agreeing >= 0.4 * NEW_TOKENS * len(prompts), f"{name}: {agreeing} tokens before the first divergences"
    engine.core.kv_pool.check_integrity(expect_used=0)


def test_bf16_logprobs_are_as_close_to_float32_as_transformers_bf16(bf16_setup):
    name, engine, hf = bf16_setup
    ours_err, theirs_err = [], []
    for p in _prompts(engine.core.vocab_size, 3, seed=2, longest=300):
        p = p + p[:40]  # > one 64-token chunk, and a repeat for the attention to find
        result = engine.generate(input_ids=p, sampling_params={"max_new_tokens": 1, "temperature": 0},
                                 return_logprob=True, logprob_start_len=0)
        ours = torch.tensor([value for value, _, _ in result["meta_info"]["input_token_logprobs"][1:]])
        targets = torch.tensor(p[1:])[:, None]
        with torch.no_grad():
            ref = {dtype: torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), -1).gather(1, targets)[:, 0]
                   for dtype, model in hf.items()}
        ours_err.append((ours - ref[torch.float32]).abs())
        theirs_err.append((ref[torch.bfloat16] - ref[torch.float32]).abs())
    ours_err, theirs_err = torch.cat(ours_err), torch.cat(theirs_err)
    assert ours_err.mean() <= 1.5 * theirs_err.mean(), (name, float(ours_err.mean()), float(theirs_err.mean()))
    assert ours_err.max() <= BF16_MAX_LOGPROB_ERROR, (name, float(ours_err.max()))


# ----------------------------------------------------------------------------- P/D in bf16

@pytest.fixture(scope="module")
def pd_engines():
    """A colocated bf16 reference, a bf16 prefill, a bf16 decode and a float32 decode (tiny model)."""
    threads = torch.get_num_threads()
    options = {"page_size": 4, "max_total_tokens": 512, "torch_threads": 1}
    ref = Engine(None, dtype="bfloat16", **options)
    prefill = Engine(None, dtype="bfloat16", chunked_prefill_size=8, **options)
    decode = Engine(None, dtype="bfloat16", **options)
    decode32 = Engine(None, dtype="float32", **options)
    yield {"ref": ref, "prefill": prefill.core, "decode": decode.core, "decode32": decode32.core}
    for engine in (ref, prefill, decode, decode32):
        engine.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def cluster():
    made: list[Cluster] = []

    def make(*args, **kwargs) -> Cluster:
        made.append(Cluster(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_pd_in_bf16_matches_colocated_bf16_and_moves_half_the_bytes(pd_engines, cluster, backend):
    c = cluster(backend, [pd_engines["prefill"]], [pd_engines["decode"]])
    cases = [(f"r{n}", 100 + n, prompt(n, 5 + 11 * n)) for n in range(4)]
    for name, room, ids in cases:
        c.decode[0].add(req("d" + name, ids), room, "127.0.0.1", c.bootstrap.port)
        c.prefill[0].add(req("p" + name, ids), room)
    c.run_until_finished(*(side + name for name, _, _ in cases for side in "pd"))
    pool = pd_engines["decode"].kv_pool
    assert pool.page_bytes() * 2 == pd_engines["decode32"].kv_pool.page_bytes()
    for name, _, ids in cases:
        expected = pd_engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        assert c.tokens("d" + name) == expected, name
        meta = c.meta["d" + name]
        pages = -(-len(ids) // 4) - meta.decode_cached_tokens // 4
        assert meta.kv_transfer_bytes == pages * pool.page_bytes() * len(pool.layers)
    c.run_until_pools_empty()


def test_pd_with_different_kv_dtypes_is_refused_at_the_handshake(pd_engines, cluster):
    c = cluster("tcp", [pd_engines["prefill"]], [pd_engines["decode32"]])
    ids = prompt(3, 20)
    c.decode[0].add(req("d", ids), 90, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(req("p", ids), 90)
    c.run_until_finished("d", "p")
    message = abort_message(c.finished("d"))
    assert "KV layout mismatch" in message and "dtype differs: float32 vs bfloat16" in message
    assert "same --dtype" in message
    assert "decode rank 0 aborted room 90" in abort_message(c.finished("p"))
    c.run_until_pools_empty()

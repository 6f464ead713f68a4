"""Decode step time and its split: one batch of decode rows at a fixed context length, on a
random-weight model of a named shape (default: SmolLM2-135M's). Prints the median step time and how
it divides into attention, GEMMs (projections and LM head), sampling and the rest (norms, RoPE,
activations, metadata, Python), each timed by wrapping the calls in the same steps.

``--workload`` instead runs ``pdserve bench engine``'s throughput workload through the offline
``Engine`` and splits its whole wall time: steps with prefill chunks vs decode-only steps, each
into attention, GEMMs and the rest of the forward, plus sampling and the scheduler around it."""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from pdserve.cli_help import HelpFormatter
from pdserve.engine import model_runner as runner_mod
from pdserve.engine import sampler as sampler_mod
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model_runner import ForwardBatch, ModelRunner
from pdserve.engine.request import Req, ReqState, SamplingParams
from pdserve.models import llama as llama_mod
from pdserve.models.config import ModelConfig, RopeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.packed_linear import PackedLinear, pack_linears

SHAPES: dict[str, dict] = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                 num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope=RopeConfig(theta=100000.0)),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope=RopeConfig(theta=500000.0)),
}


def shape_config(name: str, max_positions: int = 8192) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, max_position_embeddings=max_positions,
                       **SHAPES[name])


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.to(device=device, dtype=dtype).eval()
    model.fuse_projections()
    pack_linears(model)
    return model


class _Timers:
    """Time wrapped calls; on CUDA each timed call is bracketed by a device synchronize (kernels run
    asynchronously: without it a call's time is its launch, and the next sync's caller pays for it)."""

    def __init__(self, clock=time.perf_counter, device: torch.device | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        cuda = device is not None and device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        self.clock = clock

    @contextmanager
    def wrap(self, obj, attr: str, label: str):
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            self.sync()
            start = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.totals[label] += self.clock() - start

        setattr(obj, attr, timed)
        try:
            yield
        finally:
            setattr(obj, attr, original)


def profile_decode(shape: str, batch: int, context: int, steps: int, dtype: torch.dtype,
                   device: torch.device, page_size: int = 16, clock=time.perf_counter) -> dict[str, float]:
    """Median step time and split over ``steps`` decode steps (after two warm-up steps).
    ``clock=time.process_time`` counts the CPU time of all threads instead of wall time, which
    other processes on a shared machine disturb less."""
    cfg = shape_config(shape, max_positions=context + steps + 16)
    model = random_model(cfg, dtype, device)
    pages_per_req = (context + steps + page_size) // page_size
    pool = KVPool(batch * pages_per_req + 1, page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    for layer in pool.layers:
        layer.normal_(std=1.0)
    runner = ModelRunner(model, pool, device)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(batch):
        ids = torch.randint(4, cfg.vocab_size, (context,), generator=gen).tolist()
        req = Req(f"r{i}", ids[:-1], SamplingParams(temperature=0, max_new_tokens=steps + 1))
        req.output_ids = [ids[-1]]
        req.pages = pool.alloc(pages_per_req)
        req.num_computed = context - 1
        req.state = ReqState.DECODING
        reqs.append(req)
    timers = _Timers(clock, device)
    walls: list[float] = []
    split: list[dict[str, float]] = []
    with (timers.wrap(llama_mod, "paged_attention", "attention"),
          timers.wrap(torch.nn.Linear, "forward", "gemm"), timers.wrap(PackedLinear, "forward", "gemm"),
          timers.wrap(runner_mod.ModelRunner, "forward", "forward"),
          timers.wrap(sampler_mod, "sample", "sampling")):
        for step in range(steps + 2):
            timers.totals.clear()
            timers.sync()
            start = clock()
            result = runner.forward(ForwardBatch(decodes=list(reqs)))
            tokens, _ = sampler_mod.sample(result.decode_logits, reqs, ())
            timers.sync()
            wall = clock() - start
            for req, tok in zip(reqs, tokens):
                req.output_ids.append(tok)
                req.num_computed += 1
            if step >= 2:  # warm-up
                walls.append(wall)
                split.append(dict(timers.totals))
    med = statistics.median(walls)
    keys = ("attention", "gemm", "sampling")
    out = {"step_ms": med * 1e3, "step_ms_min": min(walls) * 1e3, "step_ms_max": max(walls) * 1e3}
    for key in keys:
        out[f"{key}_ms"] = statistics.median(s.get(key, 0.0) for s in split) * 1e3
    out["other_ms"] = out["step_ms"] - sum(out[f"{k}_ms"] for k in keys)
    return out


def profile_workload(model: str, num_prompts: int, threads: int, clock=time.perf_counter,
                     dtype: str = "float32") -> dict[str, float]:
    """Run the throughput workload of ``pdserve bench engine`` on ``model`` and split its time."""
    import tempfile
    from pathlib import Path

    from pdserve.bench import engine_throughput as bench
    from pdserve.engine.engine import Engine
    from pdserve.models.loader import load_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = bench.build_model(model, Path(tmp))
        cfg = load_model(path, device="cpu").config
        prompts, outputs = bench.workload(num_prompts, cfg.vocab_size, 0, (128, 512), (64, 128))
        engine = Engine(path, page_size=16, chunked_prefill_size=512, max_running_requests=256, dtype=dtype,
                        device="cpu", max_total_tokens=sum(len(p) + o for p, o in zip(prompts, outputs)) + 1024)
        params = [{"max_new_tokens": o, "ignore_eos": True, "temperature": 0} for o in outputs]
        engine.generate(input_ids=prompts[:2], sampling_params=params[:2])
        timers = _Timers(clock)
        totals: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        original_forward = runner_mod.ModelRunner.forward

        def forward(self, batch):
            kind = "prefill" if batch.extends else "decode"
            before = dict(timers.totals)
            start = clock()
            try:
                return original_forward(self, batch)
            finally:
                totals[f"{kind}_forward"] += clock() - start
                counts[kind] += 1
                for key in ("attention", "gemm"):
                    totals[f"{kind}_{key}"] += timers.totals[key] - before.get(key, 0.0)

        runner_mod.ModelRunner.forward = forward
        try:
            with (timers.wrap(llama_mod, "paged_attention", "attention"),
                  timers.wrap(torch.nn.Linear, "forward", "gemm"), timers.wrap(PackedLinear, "forward", "gemm"),
                  timers.wrap(sampler_mod, "sample", "sampling")):
                start = clock()
                engine.generate(input_ids=prompts, sampling_params=params)
                totals["total"] = clock() - start
        finally:
            runner_mod.ModelRunner.forward = original_forward
            engine.shutdown()
    totals["sampling"] = timers.totals["sampling"]
    totals["prefill_steps"], totals["decode_steps"] = counts["prefill"], counts["decode"]
    return dict(totals)


def _print_workload(r: dict[str, float]) -> None:
    total = r["total"]
    print(f"workload total {total:.2f} s; {int(r['prefill_steps'])} steps with prefill chunks, "
          f"{int(r['decode_steps'])} decode-only steps")
    for kind in ("prefill", "decode"):
        fwd = r.get(f"{kind}_forward", 0.0)
        att, gemm = r.get(f"{kind}_attention", 0.0), r.get(f"{kind}_gemm", 0.0)
        print(f"  {kind:8s} forward {fwd:7.2f} s ({100 * fwd / total:4.1f} %): attention {att:6.2f} s, "
              f"GEMMs {gemm:6.2f} s, rest {fwd - att - gemm:6.2f} s")
    rest = total - r.get("prefill_forward", 0.0) - r.get("decode_forward", 0.0)
    print(f"  sampling {r['sampling']:.2f} s; scheduler and everything outside forward and sampling "
          f"{rest - r['sampling']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shape", default="135m", choices=list(SHAPES), help="model shape (random weights)")
    parser.add_argument("--batch", type=int, default=32, help="requests decoded together")
    parser.add_argument("--context", type=int, default=1024, help="KV tokens per request")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV dtype")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: CPU time of all threads (less disturbed by other processes)")
    parser.add_argument("--workload", default=None, choices=["tiny", "135m"],
                        help="profile bench engine's throughput workload on this model instead (default: off)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests in --workload (default: 64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.workload:
        _print_workload(profile_workload(args.workload, args.num_prompts, args.threads, clock, args.dtype))
        return 0
    r = profile_decode(args.shape, args.batch, args.context, args.steps, getattr(torch, args.dtype),
                       torch.device(args.device), clock=clock)
    print(f"decode step, {args.shape} shape, batch {args.batch} x {args.context} context, {args.dtype}, "
          f"{args.threads} threads, {args.clock} clock: median {r['step_ms']:.1f} ms (min {r['step_ms_min']:.1f}, "
          f"max {r['step_ms_max']:.1f}) over {args.steps} steps")
    for key in ("attention", "gemm", "sampling", "other"):
        print(f"  {key:10s} {r[f'{key}_ms']:8.1f} ms  {100 * r[f'{key}_ms'] / r['step_ms']:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

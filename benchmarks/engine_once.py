"""One offline-engine run of ``pdserve bench engine``'s workload (135M shape, random weights saved in bf16, 32
requests, prompts 128-512, outputs 64-128), 1 torch thread, timed by CPU time: prints tok/s. Run it in
alternation against another checkout to compare two trees in separate processes (docs/benchmarks.md 13b):

    for r in 1 2 3; do for tree in /path/to/main .; do
      PYTHONPATH=$tree python benchmarks/engine_once.py $tree bfloat16; done; done
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pdserve.bench import engine_throughput as bench
from pdserve.models.config import ModelConfig

MODEL_DIR = Path("/tmp/pdserve-engine-once")  # built once, shared by both trees (same seed: same weights)


def main() -> int:
    label, dtype = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    bench.CLOCK = time.process_time
    path = MODEL_DIR / "135m"
    if not (path / "config.json").exists():
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        bench.build_model("135m", MODEL_DIR)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    prompts, outputs = bench.workload(32, cfg.vocab_size, 0, (128, 512), (64, 128))
    secs, _, info = bench.run_pdserve(str(path), prompts, outputs, dtype, "cpu")
    print(f"RESULT {label} {dtype} {sum(outputs) / secs:.1f} tok/s {secs:.2f} s {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

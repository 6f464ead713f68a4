#!/usr/bin/env bash
# Result 4 (docs/benchmarks.md): offline throughput of the pdserve engine vs transformers on this machine,
# and the engine's MFU (model FLOPs / wall time / GEMM peak measured in the same run).
# tiny: with transformers' generate_batch; 135m (SmolLM2-135M's shape, random weights): without it
# (--no-continuous; generate_batch takes many minutes more on 2 cores). Run when the machine is otherwise idle.
# The first three runs are float32 (result 4); the last runs the engine and transformers in bf16 and fp32 in one
# run, rounds interleaved (result 13; bf16 is native only on CPUs with AMX-BF16 or AVX512-BF16).
set -euo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
python -m pdserve.bench.engine_throughput --models tiny --num-prompts 64 --threads 2 --dtype float32 \
  --output-file "$out/engine_tiny.json"
python -m pdserve.bench.engine_throughput --models 135m --num-prompts 64 --threads 2 --no-continuous --dtype float32 \
  --output-file "$out/engine_135m.json"
python -m pdserve.bench.engine_throughput --models 135m --num-prompts 64 --threads 2 --no-continuous --dtype float32 \
  --hf-batch-sizes 16 --chunked-prefill-size 2048 --output-file "$out/engine_135m_chunk2048.json"
python -m pdserve.bench.engine_throughput --models 135m --num-prompts 32 --threads 2 --no-continuous \
  --hf-batch-sizes 16 --dtype bfloat16 float32 --repeats 3 --output-file "$out/engine_135m_bf16.json"
